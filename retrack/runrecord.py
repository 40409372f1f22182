"""The one run record of a benchmark: what ran, on what, beside what, when, and for how long.

    parser = argparse.ArgumentParser()
    add_beside_argument(parser)                      # --beside "the test suite" (default "not recorded")
    args = parser.parse_args(argv)
    record = RunRecord.start(script_command(__file__, argv), args.beside, device="cpu")
    ...                                              # the measurements
    data = {**record.finish(), "rows": rows}         # finish() may be called again after each partial write
    write_json_and_markdown(out / "speed.json", data, describe_run(data) + "\n\n" + table)

`RunRecord.finish()` gives the record's fields under the keys every result file of the project
uses: `command`, `device` (the machine: a GPU's name, or the CPU model and its threads; with the
torch version), `beside` (what else ran on the machine, which the caller says: a shared machine's
seconds mean little without it), `load_average_at_start` and `load_average_at_end` (the 1-minute
load average, rounded to 0.01; None where the platform has none), `created` (UTC, `timestamp()`)
and `total_seconds` since `start`. The library's benchmarks (`bench`, `curves`) keep these keys in
their files' `meta`; the scripts under benchmarks/ at the top of theirs. `describe_run` writes
the same record as one Markdown sentence, from a record or any dict that holds its keys (a file
read back), and `write_json_and_markdown` writes both files atomically
(`atomic.write_file_atomically`). `resumable` keeps a long script's finished parts on disk, so
that a stopped run picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar, Union

from .atomic import write_file_atomically

NOT_RECORDED = "not recorded"  # what --beside says when the caller did not say
Part = TypeVar("Part")


def add_beside_argument(parser: argparse.ArgumentParser) -> None:
    """The shared `--beside TEXT` option: what else ran on the machine meanwhile, for the record."""
    parser.add_argument("--beside", default=NOT_RECORDED,
                        help="what else ran on the machine meanwhile (recorded with the results; default: "
                             f"{NOT_RECORDED!r})")


def timestamp() -> str:
    """Now in UTC, the one format of every record: '2025-01-31T12:00:00Z'."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def load_average() -> Optional[float]:
    """The 1-minute load average, rounded to 0.01; None where the platform has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def cpu_model() -> str:
    """The CPU's model name ('Intel(R) Xeon(R) ...') where /proc/cpuinfo says it, else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_machine(device: str = "cpu") -> str:
    """The machine a run used, in words: 'NVIDIA H200 (cuda:0), torch 2.5.1' or
    'CPU (Intel(R) Xeon(R) ..., 2 threads), torch 2.5.1' (the threads torch uses now)."""
    import torch

    if device == "auto":
        from .devices import resolve_device

        device = resolve_device(device)
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        return f"{torch.cuda.get_device_name(index)} (cuda:{index}), torch {torch.__version__}"
    threads = torch.get_num_threads()
    return f"CPU ({cpu_model()}, {threads} thread{'' if threads == 1 else 's'}), torch {torch.__version__}"


def script_command(script: Union[str, Path], argv: Optional[Sequence[str]] = None) -> str:
    """'python benchmarks/eval_speed.py --n 500': a script (its folder and name) and its arguments
    (`argv`, or this process's own when None), quoted for a shell."""
    path = Path(script)
    arguments = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", f"{path.parent.name}/{path.name}" if path.parent.name else path.name, *arguments])


@dataclass
class RunRecord:
    """A run from `start` on; `finish()` reads the clock and the load again and returns the record."""

    command: str
    device: str  # describe_machine's words
    beside: str = NOT_RECORDED
    load_average_at_start: Optional[float] = None
    started: float = field(default_factory=time.perf_counter, repr=False)  # perf_counter at the start

    @classmethod
    def start(cls, command: Union[str, Sequence[str]], beside: Optional[str] = NOT_RECORDED,
              device: str = "cpu") -> "RunRecord":
        """Start the record now: `command` as a string or an argument list (quoted for a shell),
        `beside` as the caller's --beside says, `device` the device the run uses ("cpu", "cuda",
        "cuda:1", "auto"), described now (start it after setting torch's threads)."""
        text = command if isinstance(command, str) else shlex.join(command)
        return cls(command=text, device=describe_machine(device), beside=beside or NOT_RECORDED,
                   load_average_at_start=load_average())

    def finish(self) -> dict[str, Any]:
        """The record as a dict, with the load average, the time and the seconds read now: call it
        again before each write of a run that writes as it goes."""
        return {"command": self.command, "device": self.device, "beside": self.beside,
                "load_average_at_start": self.load_average_at_start, "load_average_at_end": load_average(),
                "created": timestamp(), "total_seconds": round(time.perf_counter() - self.started, 1)}


RECORD_KEYS = ("command", "device", "beside", "load_average_at_start", "load_average_at_end", "created",
               "total_seconds")


def runs_of(meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The runs a stored result was measured in: its `measured_in` list when it was resumed before,
    else its own record (the `RunRecord.finish()` keys of `meta`), so a resumed run can list them all."""
    return list(meta.get("measured_in") or [{k: meta[k] for k in RECORD_KEYS if k in meta}])


def describe_run(record: Mapping[str, Any]) -> str:
    """The record as one Markdown sentence, from `RunRecord.finish()` or a dict holding its keys
    (what is missing is left out): command, machine, what ran beside, load, seconds, time."""
    parts = []
    if record.get("command"):
        parts.append(f"Command: `{record['command']}`.")
    if record.get("device"):
        parts.append(f"Machine: {record['device']}.")
    if record.get("beside"):
        parts.append(f"Beside it: {record['beside']}.")
    if "load_average_at_start" in record or "load_average_at_end" in record:
        parts.append(f"Load average {_load(record.get('load_average_at_start'))} at the start, "
                     f"{_load(record.get('load_average_at_end'))} at the end.")
    runs = record.get("measured_in") or []
    if len(runs) > 1:
        timed = [run["total_seconds"] for run in runs if run.get("total_seconds") is not None]
        together = f" of {sum(timed):.0f} s together" if len(timed) == len(runs) else ""
        parts.append(f"Resumed: measured in {len(runs)} runs{together} (meta.measured_in); "
                     f"the last took {record.get('total_seconds', 0):.0f} s.")
    elif record.get("total_seconds") is not None:
        parts.append(f"{record['total_seconds']:.0f} s in all.")
    if record.get("created"):
        parts.append(f"Written {record['created']}.")
    return " ".join(parts)


def _load(value: Any) -> str:
    """A load average as stored: a number, None, or (in files from before this module) a triple."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return "not recorded" if value is None else f"{value:.2f}"


def write_json_and_markdown(path: Union[str, Path], data: Mapping[str, Any], markdown: Optional[str] = None) -> Path:
    """`data` as indented JSON at `path` and, when given, `markdown` beside it (the same name, .md),
    each written atomically; returns the JSON's path."""
    path = Path(path)
    write_file_atomically(path, json.dumps(data, indent=2, default=str) + "\n")
    if markdown is not None:
        write_file_atomically(path.with_suffix(".md"), markdown if markdown.endswith("\n") else markdown + "\n")
    return path


def resumable(path: Union[str, Path], compute: Callable[[], Part]) -> Part:
    """`compute()`, kept at `path` (torch.save, written atomically): a later call with the same path
    loads it instead of computing it again. For the parts of a long benchmark (one cell of a
    table, one model's evaluation), so that a run stopped part-way resumes at the first part it had
    not finished. The caller names the path after everything the part depends on. A part is plain
    data (tensors, numbers, strings, and lists, tuples and dicts of them): it is read back with
    `weights_only=True`, as every file the project loads, so nothing in it can run code."""
    import torch  # here: the run record itself needs no torch

    path = Path(path)
    if path.exists():
        return torch.load(path, weights_only=True)
    part = compute()
    write_file_atomically(path, lambda tmp: torch.save(part, tmp))
    return part
