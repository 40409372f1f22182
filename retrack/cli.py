"""Command line: `python -m retrack unlearn | sample | bench ...` (or the `retrack` script).

    python -m retrack unlearn --model builtin --out outputs/no-tshirt
    python -m retrack unlearn --model my-ddpm --forget bad1.png bad2.png --retain train/ --out my-ddpm-clean
    python -m retrack sample --model outputs/no-tshirt --n 64 --out grid.png
    python -m retrack renoise --model builtin outputs/no-tshirt --t 300 500 --out renoise.png
    python -m retrack nll --model outputs/no-tshirt --images tshirt.png digit.png
    python -m retrack evaluate --model outputs/no-tshirt

Argument and input errors print one line (`retrack: error: ...`) and exit with status 2; a
diverged or cancelled run, or one that runs out of memory, prints `retrack: stopped: ...` and exits
with status 1. Nothing is written unless the run succeeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from . import __version__
from .presets import GUIDANCE
from .runrecord import add_beside_argument

if TYPE_CHECKING:  # torch is imported inside the commands, so that --help answers at once
    from torch import Tensor

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def _model_path(name: str) -> Path:
    """The local folder of --model: 'builtin', a folder, or a Hub id (downloaded when online, e.g.
    google/ddpm-cifar10-32; offline, the message says to use a local folder)."""
    from .backends import resolve_model_path
    from .paths import BUILTIN_MODEL

    return BUILTIN_MODEL if name == "builtin" else resolve_model_path(name)


def refuse_existing_out(args: argparse.Namespace) -> Path:
    """--out, refused up front when it exists and --overwrite is not given (before any long work;
    the atomic write would refuse it only at the end)."""
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; choose a new --out folder or pass --overwrite")
    return out

def load_sets(args: argparse.Namespace, backend, model_path: Path) -> tuple:
    """Forget and retain x0 for a run: the built-in sets, or images the user names (the retain
    images without the near-duplicates of the forget images: `leave_out_near_duplicates`)."""
    from .images import expand_paths, load_images
    from .paths import BUILTIN_MODEL

    builtin = Path(model_path).resolve() == BUILTIN_MODEL.resolve()
    if builtin and not args.forget:
        from .builtin import builtin_sets

        forget, retain = builtin_sets()
        if args.retain:
            raise ValueError("--retain is only used together with --forget")
        return backend.encode(forget), backend.encode(retain), []
    if not args.forget:
        raise ValueError("--forget is required (image files or folders) unless --model builtin")
    if args.retain:
        retain_files = expand_paths([args.retain])
        retain_images = load_images(retain_files, backend.image_size, backend.channels).tensor
        retain_names = [f.name for f in retain_files]
    elif builtin:
        from .builtin import builtin_sets

        retain_images = builtin_sets()[1]
        retain_names = [f"digit #{i}" for i in range(len(retain_images))]
    else:
        raise ValueError("--retain is required: a folder of the images to keep (the model's training data)")
    forget = load_images(expand_paths(args.forget), backend.image_size, backend.channels)
    retain_images, left_out = leave_out_near_duplicates(args, backend, model_path, forget.tensor, retain_images,
                                                        retain_names)
    return backend.encode(forget.tensor), backend.encode(retain_images), forget.notes + left_out


def leave_out_near_duplicates(args: argparse.Namespace, backend, model_path: Path, forget: "Tensor", retain: "Tensor",
                              names: Sequence[str]) -> tuple["Tensor", list[str]]:
    """The retain images without the near-duplicates of a forget image unless
    --keep-near-duplicates (`near_duplicates.search`: pixel L2, and CLIP when the model has its
    own scorer beside it), and a note naming each one. Exact copies stay for the engine to
    refuse (`checks.check_sets`: the user removes them)."""
    import numpy as np

    from .images import tensor_to_uint8
    from .metrics import load_scorer
    from .models import own_scorer
    from .near_duplicates import search

    folder = own_scorer(model_path)
    scorer = None if folder is None else load_scorer(str(folder), str(backend.device))[0]
    found = search(tensor_to_uint8(forget), tensor_to_uint8(retain), scorer)
    notes = list(found.notes)
    if not found.items:
        return retain, notes
    listing = found.summary(limit=None, names=names)
    if args.keep_near_duplicates:
        return retain, notes + [f"kept in the retain set (--keep-near-duplicates): {listing}"]
    keep = np.ones(len(retain), dtype=bool)
    keep[found.indices] = False
    if not keep.any():
        raise ValueError("every retain image is a near-duplicate of a forget image: nothing would be left to keep "
                         "(--keep-near-duplicates keeps them)")
    return retain[np.flatnonzero(keep)], notes + [f"left out of the retain set (keep them with "
                                                  f"--keep-near-duplicates): {listing}"]


def cmd_unlearn(args: argparse.Namespace) -> int:
    """Fine-tune a model to forget images. Under `accelerate launch --num_processes N` it runs
    data parallel with no other change: every process loads the model and the images and draws
    its own rows, the engine averages gradients across processes before each update (so all
    copies stay identical, and retrack.json records each process's weight digest), and the main
    process alone reports progress and saves. --batch is the total over all processes."""
    from accelerate import PartialState
    from tqdm import tqdm

    from .backends import load_backend
    from .devices import training_device
    from .engine import UnlearnConfig, save_model, unlearn
    from .presets import preset_for
    from .sd_cli import sd_conditioning, sd_load_options

    out = refuse_existing_out(args)
    # Loaded straight onto the training device: Stable Diffusion's VAE and text encoder then encode
    # the images and the prompt there (on a GPU, not the CPU) before the UNet trains.
    model_path = _model_path(args.model)
    backend = load_backend(model_path, device=training_device(args.device), **sd_load_options(args, model_path))
    preset = args.preset or preset_for(backend)
    overrides = {name: getattr(args, name) for name in ("k", "lam", "lr", "steps", "batch_size", "grad_accum", "seed")
                 if getattr(args, name) is not None}
    config = UnlearnConfig.preset(preset, method=args.method, device=args.device,
                                  mixed_precision=args.mixed_precision, **overrides)
    config.validate()
    forget, retain, notes = load_sets(args, backend, model_path)
    main_process = PartialState().is_main_process  # (training_device started accelerate's state)
    for note in notes if main_process else []:
        print(f"note: {note}", file=sys.stderr)
    if main_process:
        print(f"{config.method}: {forget.shape[0]} forget / {retain.shape[0]} retain items, preset {preset}, "
              f"{config.steps} steps x batch {config.batch_size} x accum {config.grad_accum}", file=sys.stderr)
    with tqdm(total=config.steps, desc=config.method, unit="step", disable=not main_process) as bar:
        def on_step(event):
            bar.set_postfix(loss=f"{event.loss:.4g}", unlearn=f"{event.unlearn:.4g}", retain=f"{event.retain:.4g}",
                            grad=f"{event.grad_norm:.3g}")
            bar.update(1)

        until = until_forgotten(args, backend, forget, retain) if args.until_forgotten else None
        result = unlearn(backend, forget, retain, config, on_step=on_step, until=until, **sd_conditioning(args, backend))
    if not main_process:
        return 0  # under `accelerate launch` every process holds the same weights; one writes them
    prompts = {name: getattr(args, name) for name in ("prompt", "train_prompt") if getattr(args, name)}
    extra = {} if until is None else {"until_forgotten": until.record()}
    if until is not None:
        print(until.outcome(config.steps))
    saved = save_model(backend, out, result.metadata(**prompts, **extra), overwrite=args.overwrite)
    print(f"saved {saved}: {result.world_size} process(es), mixed precision {result.config.mixed_precision}, "
          f"{result.seconds:.1f} s, k-NN {result.knn_seconds:.1f} s, {result.seconds_per_step:.3f} s/step")
    return 0


def until_forgotten(args: argparse.Namespace, backend, forget: "Tensor", retain: "Tensor"):
    """The --until-forgotten check (`stopping.UntilForgotten`) of a pixel model, measured now,
    before training: the built-in reference and oracle for builtin, else thresholds calibrated
    on --retain and the --oracle given (if any)."""
    from .backends import load_backend
    from .builtin import builtin_reference
    from .evaluation import Reference
    from .paths import BUILTIN_ORACLE
    from .stopping import UntilForgotten

    if backend.family != "pixel":
        raise ValueError("--until-forgotten measures pixel models only for now (not Stable Diffusion)")
    builtin = args.model == "builtin"
    reference = builtin_reference(str(backend.device)) if builtin else Reference.build(forget.cpu(), retain.cpu())
    oracle_path = args.oracle or (BUILTIN_ORACLE if builtin else None)
    oracle = None if oracle_path is None else load_backend(_model_path(str(oracle_path)), device=backend.device)
    print("--until-forgotten: measuring the level before training", file=sys.stderr)
    return UntilForgotten(backend, reference, oracle, every=args.check_every, samples=args.check_samples)


def cmd_sample(args: argparse.Namespace) -> int:
    from .backends import load_backend
    from .devices import resolve_device
    from .grids import save_grid
    from .sampling import sample

    backend = load_backend(_model_path(args.model), device=resolve_device(args.device))
    cond = None
    if args.prompt is not None:
        if backend.family != "latent":
            raise ValueError("--prompt is only for text-conditioned (Stable Diffusion) models")
        cond = backend.encode_prompt([args.prompt])
    samples = sample(backend, args.n, seed=args.seed, steps=args.steps, scheduler=args.sampler, cond=cond,
                     guidance=args.guidance)
    path = save_grid(samples.images, args.out, ncol=args.ncol, labels=[str(s) for s in samples.seeds])
    print(f"wrote {path} ({args.n} samples, seeds {args.seed}..{args.seed + args.n - 1})")
    return 0


def teaching_images(model: str, files: Optional[Sequence[str]], backend) -> tuple[list[str], Tensor]:
    """(names, x0) of the images named on the command line; the built-in T-shirt by default."""
    from .images import expand_paths, load_images

    if files:
        paths = expand_paths(files)
        loaded = load_images(paths, backend.image_size, backend.channels)
        for note in loaded.notes:
            print(f"note: {note}", file=sys.stderr)
        return [p.name for p in paths], backend.encode(loaded.tensor)
    if model != "builtin":
        raise ValueError("--image is required (or --images for nll) unless --model builtin (default: the T-shirt)")
    from .builtin import builtin_sets

    return ["t-shirt"], backend.encode(builtin_sets()[0][:1])


def cmd_renoise(args: argparse.Namespace) -> int:
    from .backends import load_backend
    from .devices import resolve_device
    from .grids import renoise_grid, save_png
    from .sampling import pixel_l2, renoise

    device = resolve_device(args.device)
    backends = [load_backend(_model_path(name), device=device) for name in args.model]
    if any(b.family != "pixel" for b in backends):
        raise ValueError("noise-and-denoise is for pixel models (DDPM folders)")
    names, x0 = teaching_images(args.model[0], [args.image] if args.image else None, backends[0])
    image = x0[:1].cpu()
    rows = []
    for t in args.t:
        row = [(Path(name).name or name, renoise(b, image, t, seed=args.seed, steps=args.steps))
               for name, b in zip(args.model, backends)]
        if row[0][1].t != t:
            print(f"note: t={row[0][1].t} (nearest DDIM timestep to {t})", file=sys.stderr)
        for name, result in row:
            print(f"t={result.t} {name}: L2 to the image {float(pixel_l2(result.denoised, image)[0]):.2f} "
                  f"(pixels in [0, 1])")
        rows.append(row)
    path = save_png(renoise_grid(image, rows), args.out)
    print(f"wrote {path} (rows: t = {', '.join(str(row[0][1].t) for row in rows)}; columns: the image, its noised "
          f"version, then each model's denoised result from the same noise)", file=sys.stderr)
    return 0


def cmd_nll(args: argparse.Namespace) -> int:
    from .backends import load_backend
    from .devices import resolve_device
    from .likelihood import NLLSettings, model_likelihoods

    base = NLLSettings.cheap() if args.cheap else NLLSettings()
    overrides = {name: getattr(args, name) for name in ("rtol", "atol", "repeats", "probe", "seed")
                 if getattr(args, name) is not None}
    settings = NLLSettings(**{**base.__dict__, **overrides})
    settings.validate()
    backend = load_backend(_model_path(args.model), device=resolve_device(args.device))
    names, x0 = teaching_images(args.model, args.images, backend)
    print(f"probability-flow ODE, dopri5 rtol {settings.rtol:g} atol {settings.atol:g}, {settings.repeats} "
          f"{settings.probe} probes and dequantisations per image, seed {settings.seed}", file=sys.stderr)
    for name, result in zip(names, model_likelihoods(backend, x0, settings)):
        print(f"{name}: {result} ({settings.repeats} repeats, {result.evaluations} evaluations, "
              f"{result.seconds:.1f} s)", flush=True)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Measure saved models' copies of the forget images and their quality under both samplers, read
    against the oracle (`retrack.model_eval`)."""
    import shlex

    from .backends import load_backend
    from .devices import resolve_device
    from .model_eval import Candidate, EvaluateSettings, evaluate_models
    from .presets import preset_for
    from .runrecord import RunRecord

    refuse_existing_out(args)
    settings = EvaluateSettings(samples=args.samples, deterministic_samples=args.ddim_samples,
                                sample_steps=args.sample_steps, deterministic_steps=args.ddim_steps, seed=args.seed,
                                compiled=args.compiled)
    settings.validate()
    device = resolve_device(args.device)
    record = RunRecord.start(shlex.join(["python", "-m", "retrack", *args.argv]), args.beside, str(device))
    paths = [_model_path(name) for name in args.model]
    first = load_backend(paths[0], device=device)
    if first.family != "pixel":
        raise ValueError("evaluate measures pixel models (DDPM folders); for Stable Diffusion use sd-eval")
    reference, before, oracle = evaluation_reference(args, first, paths[0])
    rows = [Candidate(name, path, "before" if before and path == before[1] else "model")
            for name, path in zip(args.model, paths)]
    if before and before[1] not in paths:
        rows.insert(0, Candidate(*before, "before"))
    if oracle:
        rows.append(Candidate(*oracle, "oracle"))
    if len({row.path for row in rows}) < len(rows):
        raise ValueError("a model is named twice (among --model, --before and --oracle): each row must be its own folder")
    evaluate_models(rows, reference, settings, preset_for(first), str(device), Path(args.out), record,
                    log=lambda line: print(line, file=sys.stderr, flush=True), overwrite=args.overwrite,
                    progress=sample_bar)
    print(Path(args.out, "evaluation.md").read_text())
    return 0


def sample_bar(label: str):
    """A tqdm bar for one draw, as an `on_batch(done, total)` callback (opened at the first batch)."""
    from tqdm import tqdm

    bar = None

    def on_batch(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or tqdm(total=total, desc=label, unit="sample", leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return on_batch


def evaluation_reference(args: argparse.Namespace, backend, model_path: Path) -> tuple:
    """`evaluate`'s reference and its (name, folder) of the model before unlearning and of the
    oracle (None when not given): from --forget and --retain (less the forget images'
    near-duplicates, as `unlearn` leaves them out) with --scorer or the model's own, or, without
    --forget, the built-in T-shirt's, with the built-in model and its oracle by default."""
    from .builtin import builtin_reference
    from .checks import check_sets
    from .evaluation import Reference
    from .metrics import load_scorer
    from .models import own_scorer
    from .paths import BUILTIN_MODEL, BUILTIN_ORACLE

    named = lambda name: (name, _model_path(name)) if name else None  # noqa: E731
    if not args.forget:
        if backend.x0_shape != (1, 28, 28):
            raise ValueError("--forget and --retain are required (image files or folders) unless the models are the "
                             "built-in model's")
        return (builtin_reference(str(backend.device)), named(args.before) or ("builtin", BUILTIN_MODEL),
                named(args.oracle) or ("builtin oracle", BUILTIN_ORACLE))
    forget, retain, notes = load_sets(args, backend, model_path)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    forget, retain = forget.cpu(), retain.cpu()
    check_sets(forget, retain)
    scorer_spec = args.scorer or own_scorer(model_path)
    scorer, note = load_scorer(str(scorer_spec), str(backend.device)) if scorer_spec else (None, "")
    return Reference.build(forget, retain, scorer=scorer, note=note), named(args.before), named(args.oracle)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.curves:
        return cmd_curves(args)
    settings = bench.BenchSettings.quick() if args.quick else bench.BenchSettings()
    overrides = {name: getattr(args, name) for name in ("steps", "batch_size", "samples", "sample_steps", "seed",
                                                         "deterministic_samples", "sample_batch")
                 if getattr(args, name) is not None}
    if args.eager:
        overrides["compiled"] = False
    settings = bench.BenchSettings(**{**settings.__dict__, **overrides, "device": args.device,
                                      "methods": tuple(args.methods.split(",")) if args.methods else settings.methods})
    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.nll:
        from .likelihood import NLLSettings

        nll = NLLSettings.cheap() if args.quick else NLLSettings()
        overrides = {name: value for name, value in (("rtol", args.nll_tol), ("atol", args.nll_tol),
                                                     ("repeats", args.nll_repeats)) if value is not None}
        nll = NLLSettings(**{**nll.__dict__, **overrides})
        bench.run_likelihood(settings, Path(args.out), nll, n_retain=args.nll_retain, log=log, beside=args.beside)
        print(f"wrote {args.out}/nll.md, nll.json")
        return 0
    bench.run(settings, Path(args.out), log=log, beside=args.beside)
    print(f"wrote {args.out}/results.md, results.json, tradeoff.png")
    return 0


def cmd_curves(args: argparse.Namespace) -> int:
    """`bench --curves`: every method's memorisation and quality at checkpoints (retrack.curves)."""
    from .curves import CurveSettings, run_curves

    settings = CurveSettings.quick() if args.quick else CurveSettings()
    overrides = {name: getattr(args, name) for name in ("batch_size", "samples", "sample_steps", "seed",
                                                         "deterministic_samples", "confirm_samples")
                 if getattr(args, name) is not None}
    if args.methods:
        overrides["methods"] = tuple(args.methods.split(","))
    if args.eager:
        overrides["compiled"] = False
    if args.checkpoints:
        try:
            overrides["checkpoints"] = tuple(int(step) for step in args.checkpoints.split(","))
        except ValueError:
            raise ValueError(f"--checkpoints must be comma-separated step counts, got {args.checkpoints!r}") from None
    settings = CurveSettings(**{**settings.__dict__, **overrides, "device": args.device})
    run_curves(settings, Path(args.out), log=lambda line: print(line, flush=True), beside=args.beside)
    print(f"wrote {args.out}/curves.json, curves.md, curves.png")
    return 0


def add_unlearn_command(sub) -> None:
    """The `unlearn` command and its options (defaults: the presets')."""
    from .objectives import METHODS
    from .presets import DEFAULTS, PRESETS
    from .sd_cli import add_sd_arguments

    p = sub.add_parser("unlearn", help="fine-tune a model to forget images", description=cmd_unlearn.__doc__)
    p.add_argument("--model", default="builtin",
                   help="diffusers model folder, Hub id (when online) or 'builtin' (default)")
    p.add_argument("--forget", nargs="+", help="images or folders to forget (default for builtin: the T-shirt)")
    p.add_argument("--retain", help="folder of images to keep (the training data without the forget images)")
    p.add_argument("--keep-near-duplicates", action="store_true",
                   help="keep retain images that are a forget image up to small changes (brightness, a pixel's shift; "
                        "found by calibrated pixel-L2 and CLIP search); by default they are left out like exact copies")
    p.add_argument("--method", default="retrack", choices=sorted(METHODS))
    p.add_argument("--preset", choices=list(PRESETS),
                   help="published settings (default: sd for Stable Diffusion; for pixel models by image size: "
                        "mnist for 1 channel up to 32 px, cifar up to 64 px, celeba above)")
    p.add_argument("--k", type=int, help=f"neighbours per forget item (ReTrack; default {DEFAULTS['k']})")
    p.add_argument("--lam", type=float, help="weight of the unlearning term, in [0, 1]")
    p.add_argument("--lr", type=float, help="AdamW learning rate")
    p.add_argument("--steps", type=int, help="optimiser steps")
    p.add_argument("--batch", dest="batch_size", type=int, help="rows per branch per step")
    p.add_argument("--accum", dest="grad_accum", type=int, help="gradient accumulation micro-batches")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"],
                   help="autocast precision; fp16 adds gradient scaling (default: what `accelerate launch "
                        "--mixed_precision` chose, else no, i.e. fp32 as published)")
    p.add_argument("--until-forgotten", action="store_true",
                   help="check every --check-every steps and stop when the model has forgotten (retrack.stopping: "
                        "noise-and-denoise return at the oracle's level, no copies, quality held); --steps is the cap")
    p.add_argument("--check-every", type=int, default=10, help="--until-forgotten: steps between checks (default 10)")
    p.add_argument("--check-samples", type=int, default=256,
                   help="--until-forgotten: samples per check under each sampler (default 256)")
    p.add_argument("--oracle", help="--until-forgotten: the model retrained without the forget images (default for "
                                    "builtin: its shipped oracle; without one the level is the model's own retain images)")
    p.add_argument("--out", required=True, help="new folder for the unlearned model")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_sd_arguments(p)  # --prompt, --train-prompt, --lora-rank, ... (Stable Diffusion models)
    p.set_defaults(run=cmd_unlearn)


def add_bench_command(sub) -> None:
    """The `bench` command: all methods side by side on the built-in model."""
    from .presets import PRESETS

    p = sub.add_parser("bench", help="compare all methods on the built-in model (table + plot)")
    p.add_argument("--methods", help="comma-separated subset of pretrained,vanilla,neggrad,erasediff,siss,retrack,oracle")
    p.add_argument("--steps", type=int, help=f"unlearning steps (default {PRESETS['mnist']['steps']})")
    p.add_argument("--batch", dest="batch_size", type=int, help=f"rows per branch (default {PRESETS['mnist']['batch_size']})")
    p.add_argument("--samples", type=int, help="evaluation samples per model under the paper's sampler, ancestral "
                                                "DDPM (default 5000; --curves: 1000 per checkpoint)")
    p.add_argument("--ddim-samples", dest="deterministic_samples", type=int,
                   help="evaluation samples per model under the deterministic DDIM-50 (default 1000; --curves: 500)")
    p.add_argument("--sample-steps", type=int, help="steps of the paper's sampler (default 50, the released code's)")
    p.add_argument("--sample-batch", type=int, help="samples drawn at once (default 100; a GPU takes thousands); "
                                                    "the samples do not depend on it")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--eager", action="store_true", help="draw with the eager network, not the compiled one (which "
                   "needs a C++ compiler on a CPU and about 30 s to compile once; see retrack/compiled.py)")
    p.add_argument("--quick", action="store_true", help="a few steps and samples (for CI); with --nll, the cheap "
                                                           "likelihood setting")
    p.add_argument("--curves", action="store_true", help="instead: forgetting curves of vanilla, NegGrad, EraseDiff, "
                                                         "SISS and ReTrack at --checkpoints (curves.json, .md, .png)")
    p.add_argument("--checkpoints", help="--curves: comma-separated steps to evaluate at (default "
                                         "0,5,10,15,20,25,30,40,50,75,100,200)")
    p.add_argument("--confirm-samples", type=int, help="--curves: samples under the paper's sampler that re-read a "
                                                       "method's first step at the oracle's level (default 5000; 0: off)")
    p.add_argument("--nll", action="store_true", help="instead: likelihood (bits/dim) of the T-shirt and a few "
                                                      "retain digits per method (nll.json, nll.md)")
    p.add_argument("--nll-retain", type=int, default=3, help="retain digits in the likelihood table (default 3)")
    p.add_argument("--nll-tol", type=float, help="ODE rtol = atol for --nll (default 1e-5, Song et al.'s)")
    p.add_argument("--nll-repeats", type=int, help="dequantisation + probe draws per image for --nll (default 4)")
    p.add_argument("--out", default="benchmarks/results/builtin", help="folder for the table, JSON and plots")
    add_beside_argument(p)
    p.set_defaults(run=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    from .sd_cli import add_sd_commands

    parser = argparse.ArgumentParser(prog="retrack", description="Make a diffusion model forget specific training images.")
    parser.add_argument("--version", action="version", version=f"retrack {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    add_unlearn_command(sub)

    p = sub.add_parser("sample", help="draw a seeded grid of samples")
    p.add_argument("--model", default="builtin")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--sampler", default="ddpm", choices=["ddim", "ddpm", "dpm++"],  # sampling.SAMPLERS (torch loads lazily)
                   help="ddpm: ancestral, the paper's evaluation sampler and the evaluation's default; ddim: "
                        "deterministic; dpm++: DPM-Solver++")
    p.add_argument("--prompt", help="text prompt (Stable Diffusion models)")
    p.add_argument("--guidance", type=float, default=GUIDANCE,
                   help=f"classifier-free guidance scale (Stable Diffusion; default {GUIDANCE})")
    p.add_argument("--ncol", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(run=cmd_sample)

    add_bench_command(sub)

    p = sub.add_parser("renoise", help="noise an image to timestep t and denoise it with each model (same noise)")
    p.add_argument("--model", nargs="+", default=["builtin"], help="model folders to compare, e.g. before and after")
    p.add_argument("--image", help="the image (default for builtin: the T-shirt)")
    p.add_argument("--t", type=int, nargs="+", default=[500], help="timestep(s) to noise to, 0..T-1 (default 500)")
    p.add_argument("--steps", type=int, default=50, help="DDIM grid (t moves to its nearest timestep)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(run=cmd_renoise)

    p = sub.add_parser("nll", help="likelihood of images in bits/dim (probability-flow ODE)")
    p.add_argument("--model", default="builtin")
    p.add_argument("--images", nargs="+", help="image files or folders (default for builtin: the T-shirt)")
    p.add_argument("--repeats", type=int, help="dequantisation + probe draws per image (default 4)")
    p.add_argument("--probe", choices=["rademacher", "gaussian"], help="Hutchinson probe (default rademacher)")
    p.add_argument("--rtol", type=float, help="ODE relative tolerance (default 1e-5)")
    p.add_argument("--atol", type=float, help="ODE absolute tolerance (default 1e-5)")
    p.add_argument("--cheap", action="store_true", help="the app's setting: rtol = atol = 1e-3, 2 repeats")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto")
    p.set_defaults(run=cmd_nll)

    p = sub.add_parser("evaluate", help="did a saved model forget? copies and quality under both samplers, "
                                        "read against the oracle")
    p.add_argument("--model", nargs="+", required=True, help="model folders to evaluate ('builtin' for the built-in model)")
    p.add_argument("--forget", nargs="+", help="images or folders that should be forgotten (default: the built-in T-shirt)")
    p.add_argument("--retain", help="folder of images kept (the training data): calibrates the copy threshold and is "
                                    "the quality reference")
    p.add_argument("--keep-near-duplicates", action="store_true",
                   help="keep retain images that are a forget image up to small changes (left out by default)")
    p.add_argument("--before", help="the model before unlearning, drawn too (default for the built-in T-shirt: the "
                                    "built-in model)")
    p.add_argument("--oracle", help="the model retrained without the forget images, which the verdict reads against "
                                    "(default for the built-in T-shirt: its shipped oracle)")
    p.add_argument("--scorer", help="CLIP scorer for CLIP copies and quality: a folder or name:pretrained-tag (default: "
                                    "the model's own beside it, if any)")
    p.add_argument("--samples", type=int, default=1000, help="samples per model under the paper's sampler (default 1000)")
    p.add_argument("--ddim-samples", type=int, default=1000, help="samples per model under DDIM (default 1000)")
    p.add_argument("--sample-steps", type=int, help="steps of the paper's sampler (default: the released code's for "
                                                    "the model family, 50 for MNIST-like models)")
    p.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i, for every model")
    p.add_argument("--compiled", action="store_true", help="draw with the compiled network (needs a C++ compiler on "
                                                           "a CPU; pays from about a thousand samples)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="folder for evaluation.json, evaluation.md and the nearest-sample grids")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    add_beside_argument(p)
    p.set_defaults(run=cmd_evaluate)

    add_sd_commands(sub)  # split, sd-eval (Stable Diffusion models)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for run records
    from .errors import Cancelled, Diverged, OutOfMemory, is_out_of_memory
    from .images import ImageError

    try:
        return args.run(args)
    except (ImageError, *USER_ERRORS) as exc:
        print(f"retrack: error: {exc}", file=sys.stderr)
        return 2
    except (Diverged, Cancelled, OutOfMemory) as exc:
        print(f"retrack: stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("retrack: interrupted; nothing was saved", file=sys.stderr)
        return 130
    except Exception as exc:  # out of memory outside training (sampling, evaluation): said, not a traceback
        if not is_out_of_memory(exc):
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"retrack: stopped: out of memory ({reason}); try fewer or smaller images at a time", file=sys.stderr)
        return 1
