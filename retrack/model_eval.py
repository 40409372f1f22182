"""Did a saved model forget? Models drawn under both samplers and read against the oracle.

    python -m retrack evaluate --model outputs/no-tshirt          # the built-in T-shirt, model and oracle
    python -m retrack evaluate --model ddpm-clean/ --before ddpm/ --oracle ddpm-oracle/ \\
        --forget secret.png --retain train/ --out evaluation/

The benchmark's measurement for models someone has already unlearned. Every model draws the same
seeded samples under the paper's sampler (ancestral DDPM with the released code's steps for its
family) and under the deterministic DDIM-50, and `retrack.evaluation` measures them: copies of the
forget images by pixel L2 (by CLIP too with a scorer; by the classifier on the built-in model),
each with its count and 95 % interval, and quality on the samples that are not copies. With an
oracle (the model retrained without the forget images), each model is also read against it: the
excess over the oracle's 1 % quantile and the verdict of `evaluation.at_oracle_level`, under each
sampler and under both. The model before unlearning (`before`), when given, is drawn as well and
bounds the quality a verdict allows together with the oracle's, as in the benchmark; without it the
oracle's quality alone does. Writes a new folder (complete, or not at all): evaluation.json,
evaluation.md and, per row and sampler, the 16 samples nearest the forget images
(nearest-<row>-<role>-<sampler>.png).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

from .atomic import write_folder_atomically
from .backends import load_backend
from .bench import rate_with_interval
from .evaluation import (
    COMPILED_BATCH, DDIM, PAPER, SECOND_SAMPLER_STEPS, OracleLevels, Reference, SamplerSettings, at_oracle_level,
    copies_beyond_oracle, evaluate, forget_measures_at_oracle, quality_figure,
)
from .grids import save_nearest_rows
from .runrecord import RunRecord, describe_run, write_json_and_markdown


OnBatch = Callable[[int, int], None]  # (samples done, samples in all)


@dataclass(frozen=True)
class EvaluateSettings:
    samples: int = 1000  # under the paper's sampler
    deterministic_samples: int = 1000  # under DDIM
    sample_steps: Optional[int] = None  # the paper's sampler's steps; None: the released code's for the family
    deterministic_steps: int = SECOND_SAMPLER_STEPS
    seed: int = 0
    compiled: bool = False  # draw with the compiled network (retrack.compiled): worth it from about a thousand

    def validate(self) -> None:
        counts = (self.samples, self.deterministic_samples, self.sample_steps or 1, self.deterministic_steps)
        if min(counts) < 1:
            raise ValueError("samples and sampler steps must be at least 1")

    def samplers(self, preset: str) -> dict[str, SamplerSettings]:
        """The two draws every row is measured under, from the same seeds."""
        paper = SamplerSettings.paper(preset, n_samples=self.samples, seed=self.seed, compiled=self.compiled,
                                      **({"batch_size": COMPILED_BATCH} if self.compiled else {}))
        if self.sample_steps is not None:
            paper = replace(paper, steps=self.sample_steps)
        ddim = replace(replace(paper, n_samples=self.deterministic_samples).deterministic(),
                       steps=self.deterministic_steps)
        return {PAPER: paper, DDIM: ddim}


@dataclass(frozen=True)
class Candidate:
    """One row of the report: a model folder and its part (`before`, `model` or `oracle`)."""

    name: str  # as the user named it
    path: Path
    role: str = "model"


def evaluate_models(rows: Sequence[Candidate], reference: Reference, settings: EvaluateSettings, preset: str,
                    device: str, out: Path, record: RunRecord, log: Callable[[str], None] = print,
                    overwrite: bool = False, progress: Optional[Callable[[str], OnBatch]] = None) -> dict:
    """Draw and measure every row under both samplers (the oracle's first: its levels are what the
    others are read against), then write the folder `out` in one piece (`atomic`): evaluation.json,
    evaluation.md and each row's nearest-samples grids. `progress(label)` gives each draw's
    `on_batch(done, total)`. Returns the data written."""
    samplers = settings.samplers(preset)
    levels: dict[str, OracleLevels] = {}
    measured: dict[str, dict] = {}
    grids: dict[str, tuple] = {}  # file name -> (caption, Evaluation.nearest)
    for row in sorted(rows, key=lambda row: row.role != "oracle"):
        backend = load_backend(row.path, device=device)
        measured[row.name] = {}
        for key, sampler in samplers.items():
            started = time.perf_counter()
            on_batch = progress(f"{row.name}, {sampler.sampler.upper()}") if progress else None
            result = evaluate(backend, sampler, reference, oracle=levels.get(key), on_batch=on_batch)
            if row.role == "oracle":
                levels[key] = result.oracle = OracleLevels.from_evaluation(result, source=f"{row.name}, {result.sampler}")
            measured[row.name][key] = {**result.summary(), "seconds": round(time.perf_counter() - started, 1)}
            grids[f"nearest-{rows.index(row)}-{row.role}-{key}.png"] = (None, result.nearest(16))  # named by file
            quality = ", ".join(f"{name} {value:.3g}" for name, value in result.quality_figures.items() if value is not None)
            log(f"{row.name}, {result.sampler}: copies {result.counts()} of {result.n}; quality {quality or '–'}")
    data = dict(meta=dict(settings=asdict(settings), thresholds=reference.thresholds(), note=reference.note,
                          samplers={key: sampler.describe(device) for key, sampler in samplers.items()},
                          **record.finish()),
                rows=[dict(name=row.name, role=row.role, path=str(row.path), by_sampler=measured[row.name])
                      for row in rows])
    data["verdicts"] = verdicts(data["rows"])

    def write(folder: Path) -> None:
        folder.mkdir()
        for name, grid in grids.items():
            save_nearest_rows([grid], folder / name)
        write_json_and_markdown(folder / "evaluation.json", data, report_table(data))

    write_folder_atomically(out, write, overwrite=overwrite)
    return data


def verdicts(rows: Sequence[dict]) -> dict[str, dict]:
    """Per row but the oracle's (the yardstick) and per sampler, whether it is at the oracle's level
    (`evaluation.at_oracle_level`), with the quality ceiling from the oracle and the `before` row
    (when there is one), and under "both"; under "short", per sampler where it is not, what falls
    short: "copies" (the memorisation half, `forget_measures_at_oracle`) or else "quality".
    {} without an oracle."""
    oracle = next((row for row in rows if row["role"] == "oracle"), None)
    if oracle is None:
        return {}
    before = next((row for row in rows if row["role"] == "before"), oracle)
    out = {}
    for row in (row for row in rows if row["role"] != "oracle"):
        out[row["name"]], short = {}, {}
        for key in (PAPER, DDIM):
            mine, theirs = row["by_sampler"][key], oracle["by_sampler"][key]
            more = copies_beyond_oracle(mine["counts"], mine["samples"], theirs["rates"], theirs["samples"])
            excess = mine.get("excess_over_oracle", {})
            out[row["name"]][key] = at_oracle_level(excess, mine["quality"], theirs["quality"],
                                                    before["by_sampler"][key]["quality"], more)
            if not out[row["name"]][key]:
                short[key] = "copies" if not forget_measures_at_oracle(excess, more) else "quality"
        out[row["name"]]["both"] = out[row["name"]][PAPER] and out[row["name"]][DDIM]
        out[row["name"]]["short"] = short
    return out


def report_table(data: dict) -> str:
    """evaluation.md from evaluation.json's data alone."""
    meta, verdict = data["meta"], data["verdicts"]
    figure = quality_figure(data["rows"][0]["by_sampler"][PAPER]["quality"])
    lines = [f"Each row drawn under the paper's sampler ({meta['samplers'][PAPER]}) and under the deterministic DDIM "
             f"({meta['samplers'][DDIM]}), the same seeds for every row. {describe_run(meta)}", "",
             f"| model | copies, paper's sampler (count; 95 % CI) | {figure or 'quality'}, paper | copies, DDIM "
             f"(count; 95 % CI) | {figure or 'quality'}, DDIM | at the oracle's level: paper / DDIM / both |",
             "|---|---|---|---|---|---|"]
    for row in data["rows"]:
        cells = []
        for key in (PAPER, DDIM):
            measured = row["by_sampler"][key]
            value = measured["quality"].get(figure) if figure else None
            cells += [rate_with_interval(measured), "–" if value is None else f"{value:.3g}"]
        said = verdict.get(row["name"], {})
        lines.append(f"| {row['name']} ({row['role']}) | {' | '.join(cells)} | "
                     f"{' / '.join(_reading(said, key) for key in (PAPER, DDIM, 'both'))} |")
    thresholds = meta["thresholds"]
    lines += ["", f"Copies: pixel L2 below {thresholds['l2']:.3f} ({thresholds['l2_rule']}); every measure's counts, "
              "the excess over the oracle and every quality figure are in evaluation.json. "
              + ("'At the oracle's level' (evaluation.at_oracle_level): no more samples near the forget images than the "
                 "oracle's 1 % quantile allows, no more copies than the oracle beyond sampling error, and quality no "
                 "worse than the oracle's and the model's before unlearning (where given)."
                 if verdict else "No oracle was given, so no verdict: name the model retrained without the forget "
                 "images with --oracle.")
              + (f" Quality: {figure}, on the samples that are not copies (lower is better)." if figure else
                 " Quality: not measured (no CLIP scorer: give --scorer).")]
    if meta.get("note"):
        lines += ["", f"Note: {meta['note']}"]
    return "\n".join(lines)


def _reading(said: dict, key: str) -> str:
    """'yes', 'no (copies)', 'no (quality)', 'no' (under both) or '–' (no verdict)."""
    if said.get(key) is None:
        return "–"
    if said[key]:
        return "yes"
    return f"no ({said['short'][key]})" if key in said.get("short", {}) else "no"
