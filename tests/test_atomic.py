"""The one atomic-write helper: a file or folder appears whole or not at all, a failed write
leaves the old content as it was and no temporary files beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrack.atomic import write_file_atomically, write_folder_atomically


def test_file_is_written_whole_with_its_suffix_and_readable_by_all(tmp_path):
    target = tmp_path / "sub" / "info.json"
    write_file_atomically(target, json.dumps({"a": 1}))
    assert json.loads(target.read_text()) == {"a": 1}
    assert target.stat().st_mode & 0o777 == 0o644
    seen = []
    write_file_atomically(target, lambda tmp: (seen.append(tmp.suffix), tmp.write_bytes(b"new")))
    assert seen == [".json"] and target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["info.json"]


def test_failed_file_write_keeps_the_old_file_and_leaves_no_litter(tmp_path):
    target = tmp_path / "grid.png"
    target.write_bytes(b"old")

    def fail_half_way(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_file_atomically(target, fail_half_way)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def fill(text: str):
    def write(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "weights.bin").write_text(text)
    return write


def test_folder_is_refused_replaced_or_kept_as_asked(tmp_path):
    out = tmp_path / "model"
    assert write_folder_atomically(out, fill("first")) == out.absolute()
    with pytest.raises(FileExistsError, match="already exists"):
        write_folder_atomically(out, fill("second"))
    assert (out / "weights.bin").read_text() == "first"
    write_folder_atomically(out, fill("second"), if_exists="keep")
    assert (out / "weights.bin").read_text() == "first"
    write_folder_atomically(out, fill("third"), overwrite=True)
    assert (out / "weights.bin").read_text() == "third"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_folder_that_appears_while_writing_is_kept(tmp_path):
    out = tmp_path / "split"

    def racing(tmp: Path) -> None:
        fill("other request")(out)  # an identical request finished first
        fill("ours")(tmp)

    write_folder_atomically(out, racing, if_exists="keep")
    assert (out / "weights.bin").read_text() == "other request"
    assert [p.name for p in tmp_path.iterdir()] == ["split"]


def test_failed_folder_write_keeps_the_old_folder_and_leaves_no_litter(tmp_path):
    out = tmp_path / "model"
    write_folder_atomically(out, fill("old"))

    def fail_half_way(tmp: Path) -> None:
        fill("half")(tmp)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(out, fail_half_way, overwrite=True)
    assert (out / "weights.bin").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
