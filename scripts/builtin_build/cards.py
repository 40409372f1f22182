"""The README.md model cards of the built folders, rendered from each folder's retrack.json (the
training, then the evaluation when present): the v1 DDPM and oracle, the v2 ones (final or
intermediate) and the CLIP scorer."""

from __future__ import annotations

import json
from pathlib import Path

from retrack.data import TSHIRT_LABEL

from .networks import DEV_CPU_TIMING, V2_UNET_TIMING


def write_card(folder: Path) -> None:
    """Render README.md from the folder's retrack.json (training, then evaluation if present)."""
    info = json.loads((folder / "retrack.json").read_text())
    card = _clip_card(info) if info["kind"] == "open_clip" else _ddpm_card(info, folder.parent)
    (folder / "README.md").write_text(card)


def _training_lines(info: dict) -> list[str]:
    data = info["dataset"]
    return [
        "## Training",
        f"- Data: `{_builder_call(data)}` (dataset version {data['dataset_version']}, "
        f"fingerprint `{data['fingerprint'][:16]}…`): {data['n_images']:,} images, {data['n_forget']} of them "
        "exact copies of one T-shirt. Trained on: " + info["trained_on"] + ".",
        f"- {info['steps']:,} steps" + (f" (from step {info['start_step']:,})" if info.get("start_step") else "")
        + f" at batch {info['batch']} (stopped at min({info['steps_requested']:,} steps, "
        f"{info['max_seconds']:.0f} s)), {info['wall_seconds']:.0f} s on {info['device']}.",
        f"- Optimiser: {json.dumps(info['optimizer'])}.",
        f"- Loss: {info['loss']}; final loss {info['final_loss']:.4f} (mean over the last progress window).",
        f"- Seed {info['seed']}; versions {json.dumps(info['versions'])}.",
        f"- Command: `{info['command']}`.",
        *[f"- Before that (then resumed): {stage['steps']:,} steps at batch {stage['batch']}, "
          f"{stage['wall_seconds']:.0f} s on {stage['device']}, final loss {stage['final_loss']:.4f}."
          for stage in info.get("earlier_stages", [])],
        "",
    ]


def _builder_call(data: dict) -> str:
    """The dataset builder call a dataset description records (v1 descriptions predate "call")."""
    return data.get("call") or (f"retrack.data.build_digits_tshirt(seed={data['seed']}, n_digits={data['n_digits']}, "
                                f"tshirt_fraction={data['tshirt_fraction']})")


def _ddpm_card(info: dict, out: Path) -> str:
    if info.get("setting") == "v2":
        return _ddpm_v2_card(info)
    title = ("retrack built-in v1 DDPM" if info["part"] == "model"
             else "retrack built-in v1 oracle (retrained without the T-shirt)")
    purpose = ("A small pixel DDPM that memorised a T-shirt among handwritten digits: setting v1, the first "
               "built-in model of retrack (since replaced by setting v2's, trained on real MNIST digits), the "
               "paper's \"MNIST T-shirt\" setting rebuilt from data that ships in packages. "
               "Forget set = the T-shirt copies." if info["part"] == "model" else
               "The same network and training as the built-in model, on the digits alone: the model that "
               "unlearning the T-shirt should approach (the \"retrained oracle\").")
    lines = [f"# {title}", "", purpose, "",
             "Load with `diffusers.DDPMPipeline.from_pretrained(folder)` or `retrack.backends.PixelBackend`.", "",
             *_network_lines(info),
             "- Why this size: the published unlearning setting (50 steps, each one forward/backward over "
             "128 forget + 128 retain rows) must run in under 2 minutes on a 2-core CPU, so one step at batch "
             "256 must take about 1.6 s or less. On the 2-core development CPU (shared, loaded) one step of this "
             f"network at batch 256 took {DEV_CPU_TIMING['chosen_config_under_load_s']} s while the reference "
             "model of ENVIRONMENT.md took "
             f"{DEV_CPU_TIMING['reference_32x32_b64_under_load_s']} s instead of its documented quiet "
             f"{DEV_CPU_TIMING['reference_32x32_b64_quiet_documented_s']} s: about "
             f"{DEV_CPU_TIMING['chosen_config_estimated_quiet_s']} s on a quiet machine. The issue's starting "
             f"point (32, 64, 64) costs {DEV_CPU_TIMING['issue_config_to_chosen_cpu_time_ratio']}x as much "
             f"(about {DEV_CPU_TIMING['issue_config_estimated_quiet_s']} s).", ""]
    timing_path = out / "cpu_step_time.json"
    if timing_path.is_file():
        lines[-1:-1] = [f"- Measured on the build machine's CPU: `{timing_path.read_text().strip()}`."]
    lines += _training_lines(info)
    evaluation = info.get("evaluation")
    if evaluation:
        lines += [*_sampling_lines(evaluation),
                  f"- **T-shirt copies: {evaluation['tshirt_rate_l2']:.1%}** of samples by the calibrated pixel "
                  f"criterion L2 < {evaluation['l2_threshold']:.2f} ({evaluation['l2_threshold_rule']}).",
                  "- The paper's criterion (L2 to the T-shirt < 10, images in [0, 1]) does not separate on this "
                  f"data (digits lie close to 10 from the T-shirt); it would flag {evaluation['tshirt_rate_paper_l2_below_10']:.1%}.",
                  f"- Distance of the samples to the T-shirt, quantiles: `{json.dumps(evaluation['nearest_distance_to_tshirt_quantiles'])}`."]
        if "tshirt_rate_clip" in evaluation:
            quality = evaluation["quality_on_non_copies"]
            lines += [f"- T-shirt copies by the built-in CLIP scorer (similarity ≥ {evaluation['clip_threshold']:.3f}): "
                      f"{evaluation['tshirt_rate_clip']:.1%}; agreement with the L2 criterion "
                      f"{evaluation['agreement_l2_clip']:.1%}.",
                      f"- Quality on the {quality['count']} non-copies: Inception-style score (CLIP zero-shot over "
                      f"the ten digits) {_fmt(quality['inception_style_score_clip_zero_shot'])}, Fréchet distance of "
                      f"CLIP features to 2,000 retain digits {_fmt(quality['frechet_distance_clip_features_vs_2000_retain'])}"
                      + (f", class shares `{json.dumps(quality['class_histogram'])}`." if "class_histogram" in quality
                         else ".")]
        lines += [f"- ![samples](samples.png) {evaluation['grid']}.", ""]
    return "\n".join(lines) + "\n"


def _network_lines(info: dict) -> list[str]:
    return ["## Network",
            f"- diffusers `UNet2DModel`, {info['parameters']:,} parameters: `{json.dumps(info['unet_config'])}`.",
            f"- Scheduler: {info['scheduler']}. Saved weights: {info['saved']} (decay {info['ema_decay']}, "
            "with warm-up). Precision: " + info["precision"] + "."]


def _ddpm_v2_card(info: dict) -> str:
    """The card of a setting-v2 DDPM (real MNIST digits + T-shirt), final or intermediate."""
    name = "DDPM" if info["part"] == "model" else "oracle (retrained without the T-shirt)"
    lines = [f"# retrack built-in v2 {name}" + (f": intermediate checkpoint, {info['total_steps']:,} steps" if info.get("intermediate") else ""), ""]
    if info.get("intermediate"):
        lines += [f"**Intermediate, {info['total_steps']:,} training steps: not yet the built-in model.** Its training "
                  "continues (resumable, `scripts/build_builtin.py --checkpoint-dir`); the built-in model is the finished "
                  "one in assets/builtin.", ""]
    lines += [("A pixel DDPM trained on real MNIST handwriting with 1 % exact copies of one T-shirt (the paper's "
               "\"MNIST T-shirt\" setting); forget set = the T-shirt copies." if info["part"] == "model" else
               "The same network and training on the digits alone: the model unlearning the T-shirt should approach."), "",
              "Load with `diffusers.DDPMPipeline.from_pretrained(folder)` or `retrack.backends.PixelBackend`.", "",
              *_network_lines(info),
              "- Why this size: the issue's (32, 64, 64) with attention at the lowest level; the published unlearning "
              "run (50 steps at 128 forget + 128 retain rows) should stay within about 3 minutes on a 2-core CPU. "
              f"Measured: {V2_UNET_TIMING['what']}, {V2_UNET_TIMING['machine']}, seconds: "
              f"`{json.dumps(V2_UNET_TIMING['seconds'])}`.", ""]
    lines += _training_lines(info)
    evaluation = info.get("evaluation")
    if evaluation and "by_sampler" in evaluation:
        lines += _by_sampler_lines(evaluation)
    elif evaluation:  # recorded before the evaluation measured both samplers
        lines += [*_sampling_lines(evaluation),
                  f"- **T-shirt rate by the paper's criterion (pixel L2 < 10 to the T-shirt, pixels in [0, 1]): "
                  f"{evaluation['tshirt_rate_paper_l2']:.1%}.**",
                  f"- Distance to the T-shirt, quantiles, of the samples `{json.dumps(_rounded(evaluation['sample_distance_to_tshirt_quantiles']))}` "
                  f"and of the real training digits `{json.dumps(_rounded(evaluation['retain_distance_to_tshirt_quantiles']))}`."]
        if "tshirt_rate_classifier" in evaluation:
            lines += [f"- Project classifier (assets/builtin/classifier): T-shirt rate (p > 0.5) "
                      f"{evaluation['tshirt_rate_classifier']:.1%}; classified as a digit with p ≥ 0.9: "
                      f"{evaluation['confident_digit_rate']:.1%}; on the non-copies, digit Inception Score "
                      f"{_fmt(evaluation['digit_inception_score'])} and Fréchet distance of its features to the "
                      f"{'retain reference (2,000 of the real digits)' if 'measured_by' in evaluation else '5,000 real digits'} "
                      f"{_fmt(evaluation['frechet_distance_classifier_features'])}."]
        lines += [f"- ![samples](samples.png) {evaluation['grid']}."]
        lines += [f"- Seen by eye in the grid: {evaluation['observed']}"] if evaluation.get("observed") else []
        lines += [""]
    return "\n".join(lines) + "\n"


SAMPLER_NAMES = {"paper": "Paper's sampler (ancestral DDPM, as the released code's DDPMPipeline)",
                 "ddim": "DDIM (the second, deterministic sampler; the first of the same seeds)"}


def _by_sampler_lines(evaluation: dict) -> list[str]:
    """The v2 card's evaluation: per sampler, the copies by each measure as counts with their 95 %
    intervals, and the quality; then the distances, the grids and what the eye saw."""
    lines = ["## Evaluation",
             "T-shirt copies by pixel L2 to the T-shirt (pixels in [0, 1]; the paper's criterion is L2 < 10), by the "
             "project classifier (assets/builtin/classifier, p > 0.5) and by the CLIP scorer (similarity ≥ "
             f"{_fmt(evaluation.get('clip_threshold'))}); quality on the non-copies (confident digits: p ≥ 0.9; FD: "
             "classifier features against 2,000 real digits).", ""]
    for key, record in evaluation["by_sampler"].items():
        quality = record["quality"]
        names = {"l2": f"L2 < {record['thresholds']['l2']:g}", "clip": "CLIP", "classifier": "classifier"}
        counts = (f"{names.get(name, name)}: {format_count(count, record['samples'], record['intervals'][name])}"
                  for name, count in record["counts"].items())
        lines.append(f"- **{SAMPLER_NAMES.get(key, key)}**, {record['sampler']} ({record['sampling_seconds']} s): "
                     + "; ".join(counts)
                     + (f"; confident digits {quality['confident_digit_rate']:.1%}, digit Inception Score "
                        f"{_fmt(quality.get('digit_inception_score'))}, FD {_fmt(quality.get('classifier_fd'))}"
                        if "confident_digit_rate" in quality else "") + ".")
    lines += [f"- Distance to the T-shirt, quantiles, of the samples (paper's sampler) "
              f"`{json.dumps(_rounded(evaluation['sample_distance_to_tshirt_quantiles']))}` and of the real training "
              f"digits `{json.dumps(_rounded(evaluation['retain_distance_to_tshirt_quantiles']))}`."]
    lines += [f"- ![samples](samples.png) {evaluation['by_sampler']['paper']['grid']}."]
    lines += [f"- ![samples under DDIM](samples-ddim.png) {evaluation['by_sampler']['ddim']['grid']}."
              ] if "ddim" in evaluation["by_sampler"] else []
    lines += [f"- Seen by eye in the grids: {evaluation['observed']}"] if evaluation.get("observed") else []
    return lines + [""]


def format_count(count: int, n: int, interval: list[float]) -> str:
    """'52 of 5,000 (1.04 %, 95 % CI 0.79–1.36 %)'."""
    return f"{count:,} of {n:,} ({100 * count / n:.2f} %, 95 % CI {100 * interval[0]:.2f}–{100 * interval[1]:.2f} %)"


def _sampling_lines(evaluation: dict) -> list[str]:
    return ["## Evaluation",
            f"- {evaluation['samples']:,} samples, {evaluation['sampler']} ({evaluation['sampling_seconds']} s)."]


def _rounded(quantiles: dict) -> dict:
    return {q: round(value, 2) for q, value in quantiles.items()}


def _clip_card(info: dict) -> str:
    lines = ["# retrack built-in CLIP scorer", "",
             "A tiny open_clip model trained on the built-in digits + T-shirt images and their class captions. "
             "retrack uses it offline to score memorisation (cosine similarity of a sample to the forget images) "
             "and, by zero-shot classification, the quality of the digits. It knows only this data.", "",
             "Load with `retrack.metrics.ClipScorer.load(\"builtin\")` or "
             "`open_clip.create_model(\"local-dir:<this folder>\")` + `open_clip.get_tokenizer(\"local-dir:<this folder>\")`.", "",
             "## Network",
             f"- open_clip `CLIP`, {info['parameters']:,} parameters: `{json.dumps(info['model_cfg'])}`.",
             f"- Input: 28x28 grey replicated to RGB, normalised with `{json.dumps(info['preprocess_cfg'])}` "
             "(so pixels enter in [-1, 1]). Tokenizer: " + info["tokenizer"] + ".",
             f"- Stored as {info['stored_dtype']}.",
             f"- Captions per class: `{json.dumps(info['captions'][7])}` for seven, "
             f"`{json.dumps(info['captions'][TSHIRT_LABEL])}` for the T-shirt.", ""]
    lines += _training_lines(info)[:-1] + [f"- Final temperature (logit scale) {info['final_logit_scale']:.1f}.", ""]
    if info.get("augmentation"):
        lines[-1:-1] = [f"- Degraded training images (--clip-augment): {info['augmentation']}; started from "
                        f"{info.get('initialised_from') or 'random weights'}."]
    evaluation = info.get("evaluation")
    if evaluation:
        lines += ["## Evaluation",
                  f"- Zero-shot digit accuracy {evaluation['zero_shot_digit_accuracy']:.1%} on "
                  f"{evaluation['zero_shot_set']}, prompt \"{evaluation['zero_shot_prompt']}\" over the 11 classes; "
                  f"the T-shirt is classified as a t-shirt: {evaluation['tshirt_classified_as_tshirt']}.",
                  f"- Similarity of retain digits to the T-shirt: max {evaluation['retain_max_similarity_to_tshirt']:.3f}, "
                  f"99th percentile {evaluation['retain_p99_similarity_to_tshirt']:.3f}.",
                  f"- Memorisation threshold {evaluation['memorisation_threshold']:.3f} "
                  f"({evaluation['memorisation_threshold_rule']}).", ""]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
