"""The one run record of the benchmarks (retrack/runrecord.py): its keys, the shared --beside
option, its Markdown sentence, the atomic JSON + Markdown write and the resumable parts."""

import argparse
import json
import re

import pytest
import torch

from retrack import atomic, runrecord
from retrack.runrecord import (
    NOT_RECORDED, RunRecord, add_beside_argument, describe_run, resumable, runs_of, script_command, timestamp,
    write_json_and_markdown,
)

KEYS = {"command", "device", "beside", "load_average_at_start", "load_average_at_end", "created", "total_seconds"}


def test_record_has_the_keys_result_files_read():
    record = RunRecord.start(["python", "benchmarks/x.py", "--n", "two words"], "the test suite", device="cpu")
    data = record.finish()
    assert set(data) == KEYS
    assert data["command"] == "python benchmarks/x.py --n 'two words'"  # quoted for a shell
    assert data["beside"] == "the test suite"
    assert re.fullmatch(r"CPU \(.+, \d+ threads?\), torch .+", data["device"])
    for when in (data["created"], timestamp()):  # UTC, the one format
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", when)
    assert data["total_seconds"] >= 0
    for key in ("load_average_at_start", "load_average_at_end"):  # one number (1-minute), or None
        assert data[key] is None or isinstance(data[key], float)
    assert json.loads(json.dumps(data)) == data
    assert RunRecord.start("python -m retrack bench", None).finish()["beside"] == NOT_RECORDED


def test_load_average_is_none_where_the_platform_has_none(monkeypatch):
    def missing():
        raise OSError("no load average here")

    monkeypatch.setattr(runrecord.os, "getloadavg", missing)
    assert runrecord.load_average() is None
    data = RunRecord.start("x").finish()
    assert data["load_average_at_start"] is None and data["load_average_at_end"] is None
    assert "Load average not recorded at the start, not recorded at the end." in describe_run(data)


def test_beside_argument_is_shared_and_defaults_to_not_recorded():
    parser = argparse.ArgumentParser()
    add_beside_argument(parser)
    assert parser.parse_args([]).beside == NOT_RECORDED
    assert parser.parse_args(["--beside", "bench --curves, 1 thread"]).beside == "bench --curves, 1 thread"


def test_script_command_names_the_script_under_its_folder():
    assert script_command("/any/where/benchmarks/eval_speed.py", ["--n", "5"]) == "python benchmarks/eval_speed.py --n 5"
    assert script_command("/any/where/benchmarks/eval_speed.py", []) == "python benchmarks/eval_speed.py"


def test_describe_run_reads_a_record_or_an_older_meta():
    data = {"command": "python -m retrack bench --quick", "device": "CPU (x, 2 threads), torch 2", "beside": "nothing",
            "load_average_at_start": 1.5, "load_average_at_end": 2.25, "created": "2025-01-02T03:04:05Z",
            "total_seconds": 61.6}
    assert describe_run(data) == ("Command: `python -m retrack bench --quick`. Machine: CPU (x, 2 threads), torch 2. "
                                  "Beside it: nothing. Load average 1.50 at the start, 2.25 at the end. 62 s in all. "
                                  "Written 2025-01-02T03:04:05Z.")
    # A file written before the record: the load average as os.getloadavg's triple, keys missing.
    assert describe_run({"device": "CPU", "load_average_at_start": [0.5, 0.4, 0.3]}) == \
        "Machine: CPU. Load average 0.50 at the start, not recorded at the end."


def test_json_and_markdown_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "out" / "speed.json"
    data = {**RunRecord.start("x").finish(), "rows": [1, 2]}
    assert write_json_and_markdown(path, data, describe_run(data)) == path
    assert json.loads(path.read_text()) == data and path.read_text().endswith("\n")
    assert path.with_suffix(".md").read_text() == describe_run(data) + "\n"
    write_json_and_markdown(tmp_path / "only.json", {"a": 1})  # no Markdown: none written
    assert not (tmp_path / "only.md").exists()

    # A write that fails leaves the old file whole and no temporary file beside it.
    def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        write_json_and_markdown(path, {"new": True}, "new")
    assert json.loads(path.read_text()) == data
    assert sorted(p.name for p in path.parent.iterdir()) == ["speed.json", "speed.md"]


def test_a_gpu_is_described_by_its_name_and_index(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: f"Some GPU #{index}")
    assert runrecord.describe_machine("cuda:1") == f"Some GPU #1 (cuda:1), torch {torch.__version__}"
    assert runrecord.describe_machine("cuda") == f"Some GPU #0 (cuda:0), torch {torch.__version__}"


def test_resumable_computes_a_part_once_and_loads_it_after(tmp_path):
    calls = []

    def part():
        calls.append(1)
        return {"rows": [1, 2]}, torch.arange(3)

    first = resumable(tmp_path / "cell.pt", part)
    again = resumable(tmp_path / "cell.pt", part)  # as a resumed run would: loaded, not computed
    assert len(calls) == 1
    assert again[0] == first[0] == {"rows": [1, 2]} and torch.equal(again[1], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["cell.pt"]  # no temporary left beside it


def test_resumable_writes_nothing_when_the_part_fails(tmp_path):
    def failing():
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError):
        resumable(tmp_path / "cell.pt", failing)
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_run_lists_every_run_and_their_seconds_together():
    first = {"command": "python -m retrack bench", "total_seconds": 500.0, "created": "2025-01-01T00:00:00Z"}
    assert runs_of(first) == [first]  # a result measured in one run: its own record
    last = {**first, "total_seconds": 60.0, "created": "2025-01-02T00:00:00Z"}
    resumed = {**last, "measured_in": [first, last]}
    assert runs_of(resumed) == [first, last]
    assert "Resumed: measured in 2 runs of 560 s together (meta.measured_in); the last took 60 s." in describe_run(resumed)
