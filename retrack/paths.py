"""Where the project's own files live (the built-in model and its scorers ship in assets/).

In a checkout they are the repository's assets/ folder. An installed package (`pip install .`)
carries them as retrack/assets (pyproject.toml maps assets/ there), which is used when present.
"""

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent  # the checkout's root, when running from one
ASSETS = PACKAGE / "assets" if (PACKAGE / "assets").is_dir() else REPO / "assets"
BUILTIN = ASSETS / "builtin"
BUILTIN_MODEL = BUILTIN / "model"
BUILTIN_ORACLE = BUILTIN / "oracle"
BUILTIN_CLIP = BUILTIN / "clip"
BUILTIN_CLASSIFIER = BUILTIN / "classifier"
BUILTIN_DATASET = BUILTIN / "dataset.json"
CACHE = Path(os.environ.get("RETRACK_CACHE", Path.home() / ".cache" / "retrack"))
