"""Evaluation of what the build made, through retrack.evaluation (the one evaluation the app, CLI
and benchmark use): the CLIP scorer's zero-shot accuracy and threshold, each DDPM's T-shirt rates
(counts, 95 % intervals) and quality under the paper's sampler and under DDIM, the requirements of
each setting (exit status 3 when unmet), `--what snapshot` (a checkpoint copied out as an evaluated
intermediate model) and `--what describe`. Results go into the folder's retrack.json and card."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from retrack.backends.pixel import PixelBackend
from retrack.data import CLASS_NAMES, TSHIRT_LABEL, BuiltinDataset, build_digits_tshirt
from retrack.engine import save_model
from retrack.evaluation import DDIM, PAPER, Evaluation, Reference, SamplerSettings, draw, evaluate_samples
from retrack.images import uint8_to_tensor
from retrack.grids import save_grid

from .cards import write_card
from .runtime import log, write_json
from .train_ddpm import TRAINING_STATE

DIGIT_WORDS = CLASS_NAMES[:TSHIRT_LABEL]
GRIDS = {PAPER: "samples.png", DDIM: "samples-ddim.png"}  # each sampler's grid of its first 100 samples


def evaluate_clip(args: argparse.Namespace, dataset: BuiltinDataset, device: torch.device) -> dict | None:
    """Zero-shot accuracy on unseen jitter and the calibrated memorisation threshold."""
    from retrack.metrics import ClipScorer, calibrate_threshold, max_cosine_similarity

    folder = args.out / "clip"
    if not (folder / "open_clip_config.json").is_file():
        return None
    scorer = ClipScorer.load(str(folder), device=device)
    held_out = build_digits_tshirt(seed=args.seed + 1000, n_digits=2000, tshirt_fraction=args.tshirt_fraction,
                                   cache=False) if args.data is None and args.setting == "v1" else None
    # Without the builder (a machine given --data), use a slice of the training digits instead.
    digits = held_out.retain_images if held_out is not None else dataset.retain_images[:2000]
    digit_labels = (held_out.labels[~held_out.is_forget] if held_out is not None
                    else dataset.labels[~dataset.is_forget][:2000])
    probs = scorer.zero_shot(np.concatenate([digits, dataset.tshirt[None]]), list(CLASS_NAMES))
    accuracy = float((probs[:-1].argmax(axis=1) == digit_labels).mean())

    forget_features = scorer.image_features(dataset.tshirt[None])
    retain_features = scorer.image_features(dataset.retain_images)
    threshold = calibrate_threshold(forget_features, retain_features)
    retain_scores = max_cosine_similarity(retain_features, forget_features)
    result = {
        "zero_shot_digit_accuracy": accuracy,
        "zero_shot_set": "2,000 digits built with seed + 1000 (unseen jitter)" if held_out is not None
                         else "the first 2,000 training digits",
        "zero_shot_prompt": "a photo of a {}.",
        "tshirt_classified_as_tshirt": bool(probs[-1].argmax() == TSHIRT_LABEL),
        "retain_max_similarity_to_tshirt": float(retain_scores.max()),
        "retain_p99_similarity_to_tshirt": float(np.quantile(retain_scores, 0.99)),
        "memorisation_threshold": threshold,
        "memorisation_threshold_rule": "retrack.metrics.calibrate_threshold: midpoint between the forget "
                                       "images' self-similarity (1.0, identical copies) and the highest "
                                       "similarity of any retain image to the T-shirt, over all retain images; "
                                       "the app and `retrack bench` calibrate against a seeded 2,000-image "
                                       "subset instead, which gives a lower threshold",
    }
    record_evaluation(folder, result)
    log("eval", f"clip: zero-shot digit accuracy {accuracy:.3f}, retain max similarity to the T-shirt "
                f"{retain_scores.max():.3f}, threshold {threshold:.3f}")
    return result


def evaluate_model(folder: Path, args: argparse.Namespace, dataset: BuiltinDataset, device: torch.device) -> dict:
    """Sample a saved DDPM under the paper's sampler (ancestral DDPM, --eval-steps, default the
    released code's 50; --eval-samples seeds from --eval-seed) and under DDIM (--eval-ddim-samples
    of the same seeds, --eval-ddim-steps; 0 samples: skipped), and measure both with
    retrack.evaluation, the one evaluation the app, CLI and benchmark use: T-shirt rates with counts
    and 95 % Wilson intervals by pixel L2 (the paper's L2 < 10 where it separates the T-shirt from
    the digits, as on real MNIST; else calibrated), by the CLIP scorer built beside the model and by
    the project's classifier when shipped; quality on the non-copies. The record keeps, for the
    paper's sampler, the keys both settings' model cards (and older readers) read, and each
    sampler's figures under "by_sampler"; samples.png (paper's sampler) and samples-ddim.png show the
    first 100 samples, copies framed in red."""
    from retrack.classifier import DigitClassifier
    from retrack.copies import PAPER_L2_THRESHOLD, copy_rate, pixel_copies
    from retrack.metrics import ClipScorer, distance_quantiles, nearest_l2_distances
    from retrack.paths import BUILTIN_CLASSIFIER

    clip_folder = args.out / "clip"
    scorer = ClipScorer.load(str(clip_folder), device=device) if (clip_folder / "open_clip_config.json").is_file() else None
    classifier = (DigitClassifier.load(BUILTIN_CLASSIFIER, device=device)
                  if (BUILTIN_CLASSIFIER / "model.safetensors").is_file() else None)
    # (copies: the dataset's arrays may be read-only, which torch.from_numpy warns about)
    reference = Reference.build(uint8_to_tensor(dataset.tshirt[None].copy()), uint8_to_tensor(dataset.retain_images.copy()),
                                scorer=scorer, classifier=classifier, forget_class=TSHIRT_LABEL, class_names=DIGIT_WORDS)
    paper = replace(SamplerSettings.paper("mnist", n_samples=args.eval_samples, seed=args.eval_seed,
                                          batch_size=1000 if device.type == "cuda" else 250), steps=args.eval_steps)
    samplers = {PAPER: paper}
    if args.eval_ddim_samples > 0:
        samplers[DDIM] = replace(paper.deterministic(), n_samples=args.eval_ddim_samples, steps=args.eval_ddim_steps)
    backend = PixelBackend.from_pretrained(folder, device=device)
    by_sampler, measured = {}, {}
    for key, settings in samplers.items():
        by_sampler[key], measured[key] = _evaluate_under(backend, settings, reference, folder, GRIDS[key], device)

    main = measured[PAPER]
    rates, quality, copies = main.rates(), main.quality_figures, main.copies()
    result = {
        "samples": main.n,
        "sampler": by_sampler[PAPER]["sampler"],
        "sampling_seconds": by_sampler[PAPER]["sampling_seconds"],
        "measured_by": "retrack.evaluation (Reference.build thresholds; quality on the pixel-L2 non-copies)",
        "tshirt_rate_l2": rates["l2"],
        "l2_threshold": reference.l2_threshold,
        "l2_threshold_rule": reference.l2_rule,
        "tshirt_rate_paper_l2": copy_rate(pixel_copies(main.l2, PAPER_L2_THRESHOLD)),
        "tshirt_rate_paper_l2_below_10": copy_rate(pixel_copies(main.l2, PAPER_L2_THRESHOLD)),
        "nearest_distance_to_tshirt_quantiles": distance_quantiles(main.l2),
        "sample_distance_to_tshirt_quantiles": distance_quantiles(main.l2),
        "retain_distance_to_tshirt_quantiles": distance_quantiles(
            nearest_l2_distances(dataset.retain_images / 255.0, dataset.tshirt[None] / 255.0)),
    }
    if scorer is not None:
        result.update({
            "tshirt_rate_clip": rates["clip"],
            "clip_threshold": reference.clip_threshold,
            "agreement_l2_clip": float((copies["clip"] == copies["l2"]).mean()),
            "quality_on_non_copies": {
                "count": int((~copies["l2"]).sum()),
                "inception_style_score_clip_zero_shot": quality.get("clip_class_score"),
                "frechet_distance_clip_features_vs_2000_retain": quality.get("clip_fd"),
            },
        })
    if classifier is not None:
        result.update({
            "tshirt_rate_classifier": rates["classifier"],
            "confident_digit_rate": quality["confident_digit_rate"],
            "digit_inception_score": quality["digit_inception_score"],
            "frechet_distance_classifier_features": quality["classifier_fd"],
        })
    result["grid"] = by_sampler[PAPER]["grid"]
    result["by_sampler"] = by_sampler
    record_evaluation(folder, result)
    for key, record in by_sampler.items():
        log("eval", f"{folder.name}, {record['sampler']}: T-shirt copies "
                    + ", ".join(f"{name} {count} of {record['samples']}" for name, count in record["counts"].items())
                    + f" (L2 < {reference.l2_threshold:.2f}: {reference.l2_rule})"
                    + (f", confident digits {record['quality']['confident_digit_rate']:.1%}" if classifier is not None else ""))
    return result


def _evaluate_under(backend: PixelBackend, settings: SamplerSettings, reference: Reference, folder: Path, grid: str,
                    device: torch.device) -> tuple[dict, Evaluation]:
    """Draw `settings`' samples, measure them, and save the grid of the first 100 as `grid` in
    `folder`: the record of one sampler (samples, sampler, seconds, rates, counts, 95 % intervals,
    quality, thresholds, grid) and the evaluation."""
    started = time.perf_counter()
    samples = draw(backend, settings)
    seconds = time.perf_counter() - started
    measured = evaluate_samples(samples, reference, sampler=settings.describe(str(device)))
    copies = measured.copies()
    flags = copies["l2"] | copies.get("classifier", False)
    save_grid(samples.images[:100], folder / grid, ncol=10, flags=flags[:100].tolist())
    summary = measured.summary()
    record = {key: summary[key] for key in ("samples", "sampler", "rates", "counts", "intervals", "thresholds", "quality")}
    record["sampling_seconds"] = round(seconds, 1)
    record["grid"] = (f"{grid}: the first {min(100, measured.n)} samples; framed in red: pixel-L2 T-shirt copies"
                      + (" or classified as the T-shirt (p > 0.5)" if "classifier" in copies else ""))
    return record, measured


def record_evaluation(folder: Path, result: dict) -> None:
    """Store ``result`` as the evaluation in the folder's retrack.json and render its card again."""
    info_path = folder / "retrack.json"
    info = json.loads(info_path.read_text())
    info["evaluation"] = result
    write_json(info_path, info)
    write_card(folder)


def run_evaluation(args: argparse.Namespace, dataset: BuiltinDataset, device: torch.device) -> int:
    """Evaluate whatever has been built; exit status 3 if the model does not memorise enough."""
    if args.setting == "v2":
        evaluate_clip(args, dataset, device)
        return evaluate_v2_models(args, dataset, device)
    evaluate_clip(args, dataset, device)
    status = 0
    for part in ("model", "oracle"):
        if (args.out / part / "model_index.json").is_file():
            result = evaluate_model(args.out / part, args, dataset, device)
            if part == "model" and result["tshirt_rate_l2"] < 0.02:
                log("eval", f"REQUIREMENT NOT MET: the built-in model makes T-shirts in "
                            f"{result['tshirt_rate_l2']:.1%} of samples (needs at least 2%)")
                status = 3
    return status


def evaluate_v2_models(args: argparse.Namespace, dataset: BuiltinDataset, device: torch.device) -> int:
    """Evaluate the v2 model and oracle in --out; exit status 3 unless the setting's criteria hold:

    - model: L2 < 10 T-shirt rate under the paper's sampler within 0.5-5 % (it memorised the
      T-shirt at about the data's 1 %);
    - oracle: the classifier counts no T-shirt under either sampler, its L2 < 10 rate under the
      paper's sampler is at most a tenth of the model's, and >= 90 % of its samples are confident
      digits (p >= 0.9).

    Issue 10's rule asked for an oracle L2 < 10 rate of 0. It held on 1,000 DDIM samples, but on
    5,000 ancestral samples (the paper's protocol, issue 24) one oracle sample is a bold 8 at pixel
    L2 9.8 from the T-shirt: the classifier and the CLIP scorer count no T-shirt, and the oracle
    never saw the T-shirt, so it is a digit that the pixel criterion catches, not a copy. A rate of
    exactly 0 then tests how many samples are drawn; the classifier's count and the ratio to the
    model's rate test what the oracle is for."""
    results = {}
    for part in ("model", "oracle"):
        if (args.out / part / "model_index.json").is_file():
            results[part] = evaluate_model(args.out / part, args, dataset, device)
    failures = v2_failures(results.get("model"), results.get("oracle"))
    for failure in failures:
        log("eval", f"REQUIREMENT NOT MET: {failure}")
    return 3 if failures else 0


def v2_failures(model: dict | None, oracle: dict | None) -> list[str]:
    """The criteria of `evaluate_v2_models` unmet by the evaluations (`evaluate_model` records) of
    the model and the oracle (None: not built; the oracle's ratio then cannot be checked)."""
    failures = []
    if model is not None:
        rate = model["tshirt_rate_paper_l2"]
        if not 0.005 <= rate <= 0.05:
            failures.append(f"model: L2 < 10 T-shirt rate {rate:.2%} under the paper's sampler, not within 0.5-5 %")
    if oracle is None:
        return failures
    rate = oracle["tshirt_rate_paper_l2"]
    if model is None:
        failures.append(f"oracle: L2 < 10 T-shirt rate {rate:.2%}, but no model to compare it with")
    elif rate > model["tshirt_rate_paper_l2"] / 10:
        failures.append(f"oracle: L2 < 10 T-shirt rate {rate:.2%}, above a tenth of the model's "
                        f"{model['tshirt_rate_paper_l2']:.2%}")
    for key, record in oracle.get("by_sampler", {}).items():
        count = record["counts"].get("classifier")
        if count is None:
            failures.append(f"oracle ({key}): no classifier to count T-shirts")
        elif count > 0:
            failures.append(f"oracle ({key}): the classifier counts {count} T-shirts of {record['samples']:,}, not 0")
    if oracle.get("confident_digit_rate", 0.0) < 0.9:
        failures.append(f"oracle: {oracle.get('confident_digit_rate', 0.0):.1%} confident digits (p >= 0.9), "
                        "needs 90 % (and the classifier)")
    return failures


def snapshot_checkpoints(args: argparse.Namespace, dataset: BuiltinDataset, device: torch.device) -> None:
    """Copy each checkpoint's EMA pipeline to --out/<part>-wip (without the training state), marked
    intermediate, and evaluate it unless --no-eval."""
    if args.checkpoint_dir is None:
        raise SystemExit("--what snapshot needs --checkpoint-dir")
    for part in ("model", "oracle"):
        source = args.checkpoint_dir / part
        if not (source / TRAINING_STATE).is_file():
            log("snapshot", f"no checkpoint in {source}")
            continue
        info = {**json.loads((source / "retrack.json").read_text()), "intermediate": True}
        folder = save_model(PixelBackend.from_pretrained(source), args.out / f"{part}-wip", info, overwrite=True)
        write_card(folder)
        log("snapshot", f"{source} ({info['total_steps']} steps) -> {folder}")
        if not args.no_eval:
            evaluate_model(folder, args, dataset, device)


def describe(args: argparse.Namespace) -> None:
    """Add --observed (what the sample grid of --out shows, by eye) to its evaluation and card."""
    info = json.loads((args.out / "retrack.json").read_text())
    record_evaluation(args.out, {**info["evaluation"], "observed": args.observed})
