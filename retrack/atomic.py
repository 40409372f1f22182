"""Atomic writes: a file or a folder appears complete under its name, or not at all.

    write_file_atomically("out/grid.png", lambda tmp: picture.save(tmp))
    write_file_atomically("out/info.json", b"{}")
    write_folder_atomically("out/model", lambda tmp: pipeline.save_pretrained(tmp))

Both write into a hidden sibling (`.NAME.<random>...`) in the same folder, so the final
`os.replace` is one rename on one file system, and delete it when the writing fails, so an
interrupted or failed write leaves neither a half-written file under the real name nor litter
beside it. Every write-to-temporary-then-rename in the project goes through here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Literal, Union

# What write_folder_atomically does when the folder already exists.
IfExists = Literal["refuse", "replace", "keep"]


def write_file_atomically(path: Union[str, Path], content: Union[bytes, str, Callable[[Path], object]]) -> Path:
    """Write `content` (bytes, text, or a function that writes the file at the path it is given)
    to `path` in one rename; the file is readable by all (0644), as a plain write would leave it.

    The temporary file keeps `path`'s suffix, so writers that choose the format by the suffix
    (PIL's `save`, `torch.save`, `numpy.savez`) write the right one. Unique temporary names let
    several processes write the same file at once: the last rename wins, whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        elif isinstance(content, str):
            tmp.write_text(content)
        else:
            content(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_folder_atomically(out_dir: Union[str, Path], write: Callable[[Path], None], overwrite: bool = False,
                            *, if_exists: IfExists | None = None) -> Path:
    """Let `write` create and fill a new folder (the path it gets), then put it at `out_dir` in one rename.

    It is written to a hidden `.NAME.<id>.partial` sibling and renamed into place; an interrupted
    save leaves no half-written folder under the real name, and a failed one no partial folder.
    An existing `out_dir` is refused (FileExistsError, before anything is written) unless
    `overwrite` (or `if_exists="replace"`): then the old folder is moved aside and deleted only
    after the new one is in place. `if_exists="keep"` keeps an existing folder (also one that
    appeared while `write` ran, e.g. from an identical request) and discards the new one.
    """
    mode: IfExists = if_exists or ("replace" if overwrite else "refuse")
    out = Path(out_dir).absolute()
    if out.exists():
        if mode == "refuse":
            raise FileExistsError(f"{out} already exists; choose a new folder (or pass overwrite)")
        if mode == "keep":
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        write(tmp)
        if out.exists() and mode == "keep":
            shutil.rmtree(tmp, ignore_errors=True)
        elif out.exists():
            old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
