"""Where the project's own files live (the built-in model and its scorer ship in assets/)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets"
BUILTIN = ASSETS / "builtin"
BUILTIN_MODEL = BUILTIN / "model"
BUILTIN_ORACLE = BUILTIN / "oracle"
BUILTIN_CLIP = BUILTIN / "clip"
BUILTIN_CLASSIFIER = BUILTIN / "classifier"
BUILTIN_DATASET = BUILTIN / "dataset.json"
CACHE = Path(os.environ.get("RETRACK_CACHE", Path.home() / ".cache" / "retrack"))
