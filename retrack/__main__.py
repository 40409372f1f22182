"""`python -m retrack ...`: see retrack/cli.py."""

import sys

from .cli import main

sys.exit(main())
