"""Why the published ReTrack run makes MORE T-shirts on the built-in model: where its update comes
from, by timestep, and what the run does without the smallest timesteps in the forget branch.

    python benchmarks/retrack_t_diagnosis.py                  # all four parts, 1,000 samples per model
    python benchmarks/retrack_t_diagnosis.py --part shares    # part 1 only (a minute or two)
    python benchmarks/retrack_t_diagnosis.py --part switch --method erasediff

The forgetting curves (benchmarks/results/builtin/curves.md) show the published ReTrack run raising
the T-shirt rate from 4.6 % to 16 % at 50 steps. METHOD.md draws the forget branch's t from all of
0..T-1. Near t = 0, sigma_t is about 0.01, so the target v_k = (x_t - gamma n_k) / sigma is about
gamma (a - n_k) / sigma, some hundred times the distance from the T-shirt to its neighbours: those
rows' squared errors are orders of magnitude above every other row's.

Part 1 (shares): batches of the published size (128 forget rows with their K = 10 neighbours, 128
retain rows, lam = 0.005) on the built-in model as shipped. Each batch's gradient of the ReTrack
loss is split into the parts that come from the forget rows in each t range and from the retain
branch. The table gives each part's share of the forget loss, its gradient norm over the whole
gradient's norm, and its cosine with the whole gradient (means over the batches). The whole
gradient, clipped to norm 1 and normalised by AdamW, sets the step's direction.

Part 2 (runs): the published run (preset "mnist": 50 steps, batch 128 per branch, seed 0) with the
forget branch's t drawn from U{t_min..T-1} for each --t-min; the retain branch is unchanged. t_min
0 is the library's own `retrack` objective. Every model is evaluated with --sampler on the same
seeds, read against the oracle's levels under that sampler (drawn here), and the 16 samples nearest the T-shirt of
each are drawn in one grid. This is an experiment, not a method: METHOD.md is the specification
and the library keeps t ~ U{0..T-1}.

Part 3 (switch): where along the sampling trajectory the trained model makes the extra T-shirts.
The published run's model U of --method (ReTrack by default) and the pretrained model P share the sampler (--sampler:
the paper's ancestral DDPM by default, or DDIM) and seeds; a hybrid
runs one model's network at the sampler's timesteps above tau and the other's at and below it. If
"U above tau, P below" makes the extra T-shirts, the change that matters acts early in sampling
(high noise); if "P above, U below" does, it acts late.

Part 4 (x0): what the pretrained model and the published run's model predict as the clean image
at high noise, from noised retain digits: its distance to the T-shirt and to the neighbours' mean.

Writes retrack_t_diagnosis.json, .md, -nearest.png (part 2), -switch-nearest.png (part 3) and
-neighbours.png (the T-shirt, its neighbours and their mean) into --out. The oracle's levels and
part 3's evaluations are kept in --out/retrack_t_diagnosis-parts/ as they are finished, so a
stopped part 3 started again with the same arguments resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from retrack.backends import load_backend  # noqa: E402
from retrack.builtin import builtin_reference, builtin_sets  # noqa: E402
from retrack.engine import UnlearnConfig, unlearn  # noqa: E402
from retrack.evaluation import (  # noqa: E402
    DEFAULT_SAMPLER, DEFAULT_SAMPLER_STEPS, OracleLevels, SamplerSettings, evaluate, oracle_levels,
)
from retrack.grids import save_grid, save_nearest_rows  # noqa: E402
from retrack.neighbours import nearest_neighbours  # noqa: E402
from retrack.objectives import (METHODS, Batch, NoiseSchedule, Params, Terms, retrack_targets,  # noqa: E402
                                retrack_unlearn_loss, sum_sq)
from retrack.paths import BUILTIN_MODEL, BUILTIN_ORACLE  # noqa: E402
from retrack.runrecord import (  # noqa: E402
    RunRecord, add_beside_argument, describe_run, resumable, script_command, write_json_and_markdown,
)

RESULTS = Path(__file__).resolve().parent / "results" / "builtin"
T_BINS = (0, 10, 25, 50, 100, 250, 500, 1000)  # forget-row t ranges [lo, hi) of part 1


# ----------------------------------------------------------------------------- the loss, per row
def noised(x0: Tensor, schedule: NoiseSchedule, generator: torch.Generator, t_min: int = 0):
    """x_t = gamma x0 + sigma eps with t ~ U{t_min..T-1}; draws in the library's order (t, then eps)."""
    t = torch.randint(t_min, schedule.num_steps, (x0.shape[0],), generator=generator)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    gamma, sigma = schedule.gamma_sigma(t, x0)
    return gamma * x0 + sigma * eps, t, eps, gamma, sigma


def per_row_losses(denoise, batch: Batch, schedule: NoiseSchedule, generator: torch.Generator,
                   t_min: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """ReTrack's two branches row by row: (forget rows' sum_k pi_k |eps - v_k|^2, their t,
    retain rows' |eps - eps'|^2). With t_min = 0 this is `objectives.retrack` before the means."""
    x_t, t, _, gamma, sigma = noised(batch.forget, schedule, generator, t_min)
    v, pi = retrack_targets(x_t, batch.neighbours, gamma, sigma)
    xr_t, tr, eps_r, _, _ = noised(batch.retain, schedule, generator)
    unlearn_rows = retrack_unlearn_loss(denoise(x_t, t, None), v, pi)
    retain_rows = sum_sq(denoise(xr_t, tr, None), eps_r)
    return unlearn_rows, t, retain_rows


def retrack_from(t_min: int):
    """The ReTrack objective with the forget branch's t drawn from U{t_min..T-1}."""
    def objective(denoise, batch: Batch, schedule: NoiseSchedule, generator: torch.Generator, params: Params) -> Terms:
        unlearn_rows, _, retain_rows = per_row_losses(denoise, batch, schedule, generator, t_min)
        loss = params.lam * unlearn_rows.mean() + (1.0 - params.lam) * retain_rows.mean()
        return Terms(unlearn=unlearn_rows.mean(), retain=retain_rows.mean(), loss=loss, total=loss)
    return objective


def published_model(method: str):
    """The built-in model after the published run of `method` (preset "mnist", seed 0), and the run."""
    forget, retain = builtin_sets()
    backend = load_backend(BUILTIN_MODEL, device="cpu")
    return backend, unlearn(backend, forget, retain, UnlearnConfig.preset("mnist", method=method, seed=0, device="cpu"))


# ----------------------------------------------------------------------------- the neighbours
def neighbours_picture(path: Path) -> None:
    """The T-shirt, its K nearest retain images (captioned with their distance in [-1, 1] pixel
    space) and their mean: at high noise the softmax weights are nearly uniform, so the forget
    branch's target image is close to that mean."""
    forget, retain = builtin_sets()
    k = UnlearnConfig.preset("mnist").k
    distances, indices = nearest_neighbours(forget, retain, k)
    neighbours = retain[indices[0]]
    save_grid(torch.cat([forget[:1], neighbours, neighbours.mean(0, keepdim=True)]), path, ncol=k + 2,
              labels=["T-shirt"] + [f"{d:.1f}" for d in distances[0].tolist()] + ["mean"])


# ----------------------------------------------------------------------------- part 1: shares
def gradient_shares(batches: int, seed: int) -> list[dict]:
    """Per t range of the forget rows (and the retain branch): share of the forget loss, gradient
    norm over the whole gradient's, cosine with the whole gradient; means over `batches`."""
    forget, retain = builtin_sets()
    backend = load_backend(BUILTIN_MODEL, device="cpu")
    published = UnlearnConfig.preset("mnist")
    _, indices = nearest_neighbours(forget, retain, published.k)
    parameters = backend.trainable_parameters()
    generator = torch.Generator().manual_seed(seed)
    rows, lam = published.batch_size, published.lam
    parts = [f"forget t {lo}-{hi - 1}" for lo, hi in zip(T_BINS, T_BINS[1:])] + ["retain branch"]
    sums = {name: np.zeros(4) for name in parts}  # loss share, norm ratio, cosine, rows
    for _ in range(batches):
        fi = torch.randint(forget.shape[0], (rows,), generator=generator)
        ri = torch.randint(retain.shape[0], (rows,), generator=generator)
        batch = Batch(forget=forget[fi], neighbours=retain[indices[fi]], retain=retain[ri])
        unlearn_rows, t, retain_rows = per_row_losses(backend.denoise, batch, backend.schedule, generator)
        losses = [lam * unlearn_rows[(t >= lo) & (t < hi)].sum() / rows for lo, hi in zip(T_BINS, T_BINS[1:])]
        losses.append((1.0 - lam) * retain_rows.mean())
        grads = [flat(torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True), parameters)
                 for loss in losses]
        whole = torch.stack(grads).sum(0)
        counts = [int(((t >= lo) & (t < hi)).sum()) for lo, hi in zip(T_BINS, T_BINS[1:])] + [rows]
        for name, loss, grad, count in zip(parts, losses, grads, counts):
            share = float(loss / (lam * unlearn_rows.mean())) if name != "retain branch" else float("nan")
            sums[name] += (share, float(grad.norm() / whole.norm()),
                           float(grad @ whole / (grad.norm() * whole.norm() + 1e-30)), count)
    return [dict(part=name, rows=float(s[3] / batches), loss_share=float(s[0] / batches),
                 norm_ratio=float(s[1] / batches), cosine=float(s[2] / batches)) for name, s in sums.items()]


def flat(grads, parameters) -> Tensor:
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten().double() for g, p in zip(grads, parameters)])


# ----------------------------------------------------------------------------- part 2: runs
def run(t_min: int, sampler: SamplerSettings, reference, oracle: OracleLevels) -> tuple[dict, tuple]:
    """The published run with the forget branch's t from t_min (0: the library's objective), evaluated."""
    name = "retrack"
    if t_min > 0:
        name = f"retrack_t{t_min}"
        METHODS[name] = dataclasses.replace(METHODS["retrack"], name=name, objective=retrack_from(t_min))
    backend, result = published_model(name)
    evaluation = evaluate(backend, sampler, reference, oracle)
    row = dict(t_min=t_min, training_seconds=result.seconds, rates=evaluation.rates(), excess=evaluation.excess(),
               quality=evaluation.quality_figures, final_loss=result.events[-1].loss)
    return row, evaluation.nearest(16)


# ----------------------------------------------------------------------------- part 3: switch
def hybrid(early, late, tau: int):
    """A backend that denoises with `early` at timesteps above tau and with `late` at and below it."""
    both = copy.copy(late)
    both.denoise = lambda x, t, cond: (early if int(t.reshape(-1)[0]) > tau else late).denoise(x, t, cond)
    return both


def switch_runs(method: str, taus: list[int], sampler: SamplerSettings, reference,
                oracle: OracleLevels, parts: Path) -> tuple[list[dict], list]:
    """Rates of P, the published run of `method` (U) and the hybrids "U above tau, P below" and
    "P above tau, U below". Each model's evaluation is kept in `parts` as it is finished (a stopped
    run resumes there); the published run is trained only when one still needs it."""
    pretrained = load_backend(BUILTIN_MODEL, device="cpu")
    unlearned = functools.cache(lambda: published_model(method)[0])
    title, short = METHODS[method].title, METHODS[method].title[0]
    # (name, the grid's short label, the model, built when needed)
    models = [("pretrained", "P", lambda: pretrained), (title, short, unlearned)]
    models += [(f"{title} above {tau}, pretrained below", f"{short}>{tau}",
                lambda tau=tau: hybrid(unlearned(), pretrained, tau)) for tau in taus]
    models += [(f"pretrained above {tau}, {title} below", f"P>{tau}",
                lambda tau=tau: hybrid(pretrained, unlearned(), tau)) for tau in taus]
    rows, nearest = [], []
    for name, label, model in models:
        def measure() -> tuple[dict, tuple]:
            evaluation = evaluate(model(), sampler, reference, oracle)
            return dict(model=name, rates=evaluation.rates(), excess=evaluation.excess(),
                        quality=evaluation.quality_figures), evaluation.nearest(16)

        row, near = resumable(parts / f"switch-{method}-{label}-{sampler.sampler}{sampler.steps}-n{sampler.n_samples}.pt",
                              measure)
        rows.append(row)
        nearest.append((label, near))
        print(f"{name}: rates {rows[-1]['rates']}", flush=True)
    return rows, nearest


# ----------------------------------------------------------------------------- part 4: x0
def high_noise_predictions(method: str, timesteps: list[int], n: int = 256) -> list[dict]:
    """What P and the published run's model U predict as the clean image at high noise, from
    noised retain digits (the states a trajectory passes through): x0_hat = clamp((x_t - sigma
    eps_hat) / gamma, -1, 1), as the DDIM sampler computes it. Mean unit-pixel L2 of x0_hat to the
    T-shirt and to the mean of its K neighbours, and its mean brightness (unit pixels)."""
    forget, retain = builtin_sets()
    _, indices = nearest_neighbours(forget, retain, UnlearnConfig.preset("mnist").k)
    unit = lambda x: (x.clamp(-1, 1) + 1) / 2  # noqa: E731
    shirt, blob = unit(forget[:1]), unit(retain[indices[0]].mean(0, keepdim=True))
    generator = torch.Generator().manual_seed(0)
    x0 = retain[torch.randint(retain.shape[0], (n,), generator=generator)]
    eps = torch.randn(x0.shape, generator=generator)
    pretrained = load_backend(BUILTIN_MODEL, device="cpu")
    unlearned, _ = published_model(method)
    rows = []
    for t in timesteps:
        steps = torch.full((n,), t)
        gamma, sigma = pretrained.schedule.gamma_sigma(steps, x0)
        x_t = gamma * x0 + sigma * eps
        row = dict(t=t)
        for name, model in (("pretrained", pretrained), (METHODS[method].title, unlearned)):
            with torch.no_grad():
                x0_hat = unit((x_t - sigma * model.denoise(x_t, steps, None)) / gamma)
            l2 = lambda target: float((x0_hat - target).flatten(1).norm(dim=1).mean())  # noqa: E731
            row[name] = dict(l2_to_tshirt=l2(shirt), l2_to_neighbour_mean=l2(blob), brightness=float(x0_hat.mean()))
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("shares", "runs", "switch", "x0", "all"), default="all")
    parser.add_argument("--batches", type=int, default=8, help="part 1: batches averaged")
    parser.add_argument("--t-min", default="0,10,50,200", help="part 2: forget-branch t_min values")
    parser.add_argument("--taus", default="750,500,250", help="part 3: switch timesteps")
    parser.add_argument("--method", default="retrack", choices=sorted(METHODS), help="parts 3 and 4: the unlearned model")
    parser.add_argument("--x0-timesteps", default="980,900,800,700,500,250", help="part 4: timesteps")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=("ddpm", "ddim"),
                        help="parts 2 and 3: ddpm (ancestral, the paper's; default) or ddim (deterministic)")
    parser.add_argument("--sample-steps", type=int, default=DEFAULT_SAMPLER_STEPS)
    add_beside_argument(parser)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))  # one thread when others run
    record = RunRecord.start(script_command(__file__, argv), args.beside)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data: dict = {}
    neighbours_picture(out / "retrack_t_diagnosis-neighbours.png")
    if args.part in ("shares", "all"):
        data["shares"] = gradient_shares(args.batches, seed=0)
        print(json.dumps(data["shares"], indent=1), flush=True)
    sampler = SamplerSettings(n_samples=args.samples, sampler=args.sampler, steps=args.sample_steps)
    reference = builtin_reference("cpu") if args.part in ("runs", "switch", "all") else None
    oracle = None
    parts = out / "retrack_t_diagnosis-parts"  # finished evaluations, for resuming (see switch_runs)
    if reference is not None:  # the oracle's levels under this very sampler and seeds
        oracle = OracleLevels.from_dict(resumable(
            parts / f"oracle-{sampler.sampler}{sampler.steps}-n{sampler.n_samples}-levels.pt",
            lambda: oracle_levels(load_backend(BUILTIN_ORACLE, device="cpu"), sampler, reference,
                                  BUILTIN_ORACLE.name).to_dict()))
    data["sampler"], data["oracle"] = sampler.describe("cpu"), None if oracle is None else oracle.source
    if args.part in ("runs", "all"):
        data["runs"], nearest = [], []
        for t_min in (int(v) for v in args.t_min.split(",")):
            row, near = run(t_min, sampler, reference, oracle)
            data["runs"].append(row)
            nearest.append((f"t>={t_min}", near))
            print(f"t_min {t_min}: {row['training_seconds']:.1f} s, rates {row['rates']}, excess {row['excess']}, "
                  f"classifier_fd {row['quality'].get('classifier_fd')}", flush=True)
            save_nearest_rows(nearest, out / "retrack_t_diagnosis-nearest.png")
    if args.part in ("switch", "all"):
        data["switch_method"] = args.method
        data["switch"], nearest = switch_runs(args.method, [int(v) for v in args.taus.split(",")], sampler,
                                              reference, oracle, parts)
        save_nearest_rows(nearest, out / "retrack_t_diagnosis-switch-nearest.png")
    if args.part in ("x0", "all"):
        data["x0_method"] = args.method
        data["x0"] = high_noise_predictions(args.method, [int(v) for v in args.x0_timesteps.split(",")])
    data.update(record.finish())
    text = markdown(data)
    write_json_and_markdown(out / "retrack_t_diagnosis.json", data, text)
    print(text)
    return 0


def markdown(data: dict) -> str:
    lines = ["# ReTrack on the built-in model: where the update comes from, by timestep", "", describe_run(data), ""]
    if "shares" in data:
        lines += ["## Part 1: the published batch's gradient, split by the forget rows' t", "",
                  "| part | rows per batch | share of the forget loss | gradient norm / whole | cosine with whole |",
                  "|---|---|---|---|---|"]
        for s in data["shares"]:
            share = "" if s["part"] == "retain branch" else f"{100 * s['loss_share']:.1f} %"
            lines.append(f"| {s['part']} | {s['rows']:.1f} | {share} | {s['norm_ratio']:.3f} | {s['cosine']:.3f} |")
        lines.append("")
    if "runs" in data:
        measures = list(data["runs"][0]["rates"])
        lines += ["## Part 2: the published run with the forget branch's t from t_min", "",
                  f"Evaluation: {data['sampler']}; oracle levels from {data['oracle']}. Grid: "
                  "retrack_t_diagnosis-nearest.png (one row per run, the 16 samples nearest the T-shirt).", "",
                  "| forget t from | training s | " + " | ".join(f"{m} rate" for m in measures) + " | "
                  + " | ".join(f"{m} excess" for m in measures) + " | classifier_fd |",
                  "|---|---|" + "---|" * (2 * len(measures) + 1)]
        for r in data["runs"]:
            fd = r["quality"].get("classifier_fd")
            lines.append(f"| {r['t_min']} | {r['training_seconds']:.1f} | "
                         + " | ".join(f"{100 * r['rates'][m]:.1f} %" for m in measures) + " | "
                         + " | ".join(f"{100 * r['excess'][m]:+.1f} %" for m in measures)
                         + f" | {'n/a' if fd is None else f'{fd:.1f}'} |")
        lines.append("")
    if "switch" in data:
        title = METHODS[data.get("switch_method", "retrack")].title
        short = title[0]
        measures = list(data["switch"][0]["rates"])
        lines += ["## Part 3: which model samples where (the sampler's timesteps above / at and below tau)", "",
                  f"Evaluation: {data['sampler']}. Grid: retrack_t_diagnosis-switch-nearest.png, one row per model in "
                  f"the table's order: P (pretrained), {short} ({title}), {short}>tau ({title}'s network above tau, "
                  "the pretrained one's below), P>tau (the reverse).", "",
                  "| model | " + " | ".join(f"{m} rate" for m in measures) + " | L2 excess | classifier_fd |",
                  "|---|" + "---|" * (len(measures) + 2)]
        for r in data["switch"]:
            fd = r["quality"].get("classifier_fd")
            lines.append(f"| {r['model']} | " + " | ".join(f"{100 * r['rates'][m]:.1f} %" for m in measures)
                         + f" | {100 * r['excess']['l2']:+.1f} % | {'n/a' if fd is None else f'{fd:.1f}'} |")
        lines.append("")
    if "x0" in data:
        title = METHODS[data.get("x0_method", "retrack")].title
        lines += [f"## Part 4: the clean image predicted from noised digits, pretrained vs {title}", "",
                  "256 retain digits noised to t (fixed seeds); x0_hat as the DDIM sampler computes it, clamped to "
                  "[-1, 1]; mean L2 in unit pixels; brightness is the mean unit pixel value.", "",
                  "| t | L2 to the T-shirt, pretrained | ..., " + title + " | L2 to the neighbours' mean, pretrained | ..., "
                  + title + " | brightness, pretrained | ..., " + title + " |", "|---|---|---|---|---|---|---|"]
        for r in data["x0"]:
            p, u = r["pretrained"], r[title]
            lines.append(f"| {r['t']} | {p['l2_to_tshirt']:.2f} | {u['l2_to_tshirt']:.2f} | {p['l2_to_neighbour_mean']:.2f} | "
                         f"{u['l2_to_neighbour_mean']:.2f} | {p['brightness']:.3f} | {u['brightness']:.3f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
