"""The raw measures of memorisation and quality: features, distances, intervals, Fréchet distance.

Whether a sample counts as a copy, given these measures and a threshold, is said in one place,
`retrack.copies`; the evaluation (`retrack.evaluation`) combines both.

Memorisation
    ``ClipScorer`` wraps any open_clip model: the tiny built-in one trained on the digits +
    T-shirt data (``assets/builtin/clip``, the offline default), a local open_clip folder, or a
    real CLIP by name and pretrained tag. ``memorisation_scores`` gives each generated sample its
    highest cosine similarity to the forget images, and ``calibrate_threshold`` chooses the CLIP
    copy threshold from data. ``nearest_l2_distances`` is the pixel-L2 distance of the paper's
    MNIST benchmark, with ``calibrated_l2_threshold``; ``wilson_interval`` the interval of a rate.

Quality (computed, as in the paper, on the samples that are NOT memorised)
    ``frechet_distance`` between two feature sets (FID when the features are Inception's; here
    usually CLIP image features), ``inception_style_score`` exp(E KL(p(y|x) || p(y))) from class
    probabilities (e.g. ``ClipScorer.zero_shot``), and ``class_shares``; on the project's classifier
    (``retrack.classifier``), ``digit_inception_score`` (the paper's MNIST IS) and
    ``confident_digit_rate``.
"""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import paths
from .data import TSHIRT_LABEL
from .images import to_unit_nchw
from .loading import MODEL_LOADING

log = logging.getLogger(__name__)

LOCAL_DIR_PREFIX = "local-dir:"
DEFAULT_PROMPT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ClipScorer:
    """Image and text features, and zero-shot probabilities, from an open_clip model.

    Build it with ``ClipScorer.load``. Features come back L2-normalised, float32, on the CPU.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device | str,
                 image_size: int, mean: Sequence[float], std: Sequence[float], name: str = "") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.name = name

    @classmethod
    def load(cls, model: str = "builtin", pretrained: str | None = None,
             device: torch.device | str | None = None) -> "ClipScorer":
        """Load a scorer.

        ``model`` is "builtin" (the tiny CLIP in ``assets/builtin/clip``), a folder path or
        ``local-dir:<folder>`` holding ``open_clip_config.json`` and weights, or an open_clip
        model name with a ``pretrained`` tag or file (e.g. "ViT-B-32", "laion2b_s34b_b79k"),
        which needs network access or an already-filled cache.
        """
        import open_clip

        device = torch.device(device) if device is not None else _default_device()
        if model == "builtin":
            if not (paths.BUILTIN_CLIP / "open_clip_config.json").is_file():
                raise FileNotFoundError(
                    f"the built-in CLIP scorer is missing from {paths.BUILTIN_CLIP}; build it with "
                    "`python scripts/build_builtin.py --what clip`")
            model = LOCAL_DIR_PREFIX + str(paths.BUILTIN_CLIP)
        elif not model.startswith(LOCAL_DIR_PREFIX) and Path(model).is_dir():
            model = LOCAL_DIR_PREFIX + str(Path(model).resolve())
        if model.startswith(LOCAL_DIR_PREFIX):
            pretrained = None  # open_clip ignores it for local folders; say so by not passing it
            folder = Path(model[len(LOCAL_DIR_PREFIX):])
            if folder.is_dir() and not any(folder.glob("*.safetensors")):
                # open_clip would fall back to a pickle checkpoint, or to random weights without one.
                raise ValueError(f"{folder}: no .safetensors weights in this CLIP folder; retrack loads "
                                 "safetensors only (a pickle file can run code when it is loaded)")

        with MODEL_LOADING:
            clip_model = open_clip.create_model(model, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(model)
        preprocess = clip_model.visual.preprocess_cfg
        size = preprocess["size"]
        size = size if isinstance(size, int) else size[0]
        return cls(clip_model, tokenizer, device, size, preprocess["mean"], preprocess["std"], name=model)

    # ---------------------------------------------------------------------------------------
    def to_model_input(self, images) -> torch.Tensor:
        """Bring images to the model's normalised NCHW RGB input at its resolution.

        Accepts: float tensors or arrays NCHW in [-1, 1] (1 or 3 channels, the library's pixel
        convention); uint8 arrays (H, W), (N, H, W), (N, H, W, C) or (N, C, H, W) with C in
        {1, 3}; a PIL image or a list of them.
        """
        pixels01 = to_unit_nchw(images)
        if pixels01.shape[1] == 1:
            pixels01 = pixels01.expand(-1, 3, -1, -1)
        if pixels01.shape[-2:] != (self.image_size, self.image_size):
            pixels01 = F.interpolate(pixels01, size=(self.image_size, self.image_size), mode="bicubic",
                                     align_corners=False, antialias=True).clamp(0.0, 1.0)
        return (pixels01 - self.mean) / self.std

    @torch.no_grad()
    def image_features(self, images, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised image embeddings (N, D) on the CPU."""
        inputs = self.to_model_input(images)
        chunks = [
            self.model.encode_image(inputs[i:i + batch_size].to(self.device), normalize=True).float().cpu()
            for i in range(0, len(inputs), batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.empty(0, 0)

    @torch.no_grad()
    def text_features(self, texts: str | Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (M, D) on the CPU."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float().cpu()

    @torch.no_grad()
    def zero_shot(self, images, class_names: Sequence[str],
                  templates: Sequence[str] = DEFAULT_PROMPT_TEMPLATES) -> np.ndarray:
        """Class probabilities (N, C): softmax of the model's scaled image-text similarities.

        Each class is described by every template (``"{}"`` replaced by its name); their text
        features are averaged and renormalised (CLIP's prompt ensembling).
        """
        class_features = []
        for name in class_names:
            prompts = self.text_features([template.format(name) for template in templates])
            class_features.append(F.normalize(prompts.mean(dim=0), dim=0))
        text = torch.stack(class_features)
        image = self.image_features(images)
        logit_scale = self.model.logit_scale.exp().float().cpu()
        return torch.softmax(logit_scale * image @ text.T, dim=-1).numpy()


def save_open_clip_folder(model: torch.nn.Module, model_cfg: dict, folder: str | Path,
                          preprocess_cfg: dict | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Save an open_clip model as a folder that ``ClipScorer.load(folder)`` reads offline.

    The layout is open_clip's ``local-dir:`` schema: ``open_clip_config.json`` with
    ``model_cfg`` (and ``preprocess_cfg``: mean/std/size of the input normalisation) next to
    ``open_clip_model.safetensors``. ``dtype`` lets small checkpoints be stored in float16;
    open_clip copies them into its float32 parameters on load.
    """
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": dict(preprocess_cfg or {})}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {name: tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
             for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


# --------------------------------------------------------------------------------------------
# Memorisation by CLIP similarity
# --------------------------------------------------------------------------------------------

# A scorer per (spec, device), loaded once per process (the app's jobs and splits share them).
_SCORERS: dict[tuple[str, str], tuple[ClipScorer, str]] = {}
_SCORERS_LOCK = threading.Lock()


def load_scorer(spec: str, device: str) -> tuple[object, str]:
    """The CLIP scorer for `spec` (a folder or "name:pretrained"), loaded once per device.

    Returns (scorer, note). A named CLIP whose weights cannot be fetched (no network, empty
    cache) is replaced by the built-in tiny CLIP, and the note says so: its scores are rough
    outside the digits it was trained on.
    """
    with _SCORERS_LOCK:
        if (spec, device) not in _SCORERS:
            if Path(spec).is_dir():
                _SCORERS[(spec, device)] = (ClipScorer.load(spec, device=device), "")
            else:
                import open_clip

                name, _, tag = spec.partition(":")
                try:  # fetch (or find in the cache) first: it fails fast, building the model does not
                    open_clip.pretrained.download_pretrained(open_clip.pretrained.get_pretrained_cfg(name, tag))
                    _SCORERS[(spec, device)] = (ClipScorer.load(name, pretrained=tag, device=device), "")
                except Exception as exc:
                    log.warning("CLIP scorer %s unavailable (%s); using the built-in one", spec, exc)
                    note = (f"The CLIP scorer {spec} could not be loaded (offline?), so memorisation is scored "
                            "with the built-in tiny CLIP, trained on digits: treat the scores as rough.")
                    _SCORERS[(spec, device)] = (ClipScorer.load("builtin", device=device), note)
        return _SCORERS[(spec, device)]


def max_cosine_similarity(features, reference_features) -> np.ndarray:
    """For each row of ``features``, its highest cosine similarity to any reference row."""
    queries = F.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float32), dim=-1)
    references = F.normalize(torch.as_tensor(np.asarray(reference_features), dtype=torch.float32), dim=-1)
    return (queries @ references.T).max(dim=1).values.numpy()


def memorisation_scores(scorer: ClipScorer, samples, forget_images) -> np.ndarray:
    """Per generated sample, its highest CLIP cosine similarity to any forget image (N,)."""
    return max_cosine_similarity(scorer.image_features(samples), scorer.image_features(forget_images))


def calibrate_threshold(forget_features, retain_features, retain_quantile: float = 1.0) -> float:
    """Choose the CLIP memorisation threshold from data (features from ``image_features``).

    Rule: the midpoint between
      * the forget band: the lowest similarity of a forget image to its nearest OTHER forget
        image (1.0 when there is one forget image or all are identical copies), i.e. how close a
        true copy looks; and
      * the retain ceiling: the ``retain_quantile`` quantile (default: the maximum) over retain
        images of their highest similarity to the forget set, i.e. how close legitimate,
        never-memorised data gets.
    A sample above the midpoint is nearer to "a copy" than any retain image is. Warns when the
    two bands overlap, because then the scorer cannot tell copies from retain data.
    """
    forget = F.normalize(torch.as_tensor(np.asarray(forget_features), dtype=torch.float32), dim=-1)
    if len(forget) > 1:
        pairwise = forget @ forget.T
        pairwise.fill_diagonal_(-np.inf)
        forget_band = float(pairwise.max(dim=1).values.min())
    else:
        forget_band = 1.0
    retain_ceiling = float(np.quantile(max_cosine_similarity(retain_features, forget), retain_quantile))
    if retain_ceiling >= forget_band:
        warnings.warn(f"retain images reach similarity {retain_ceiling:.3f} to the forget set, at or above "
                      f"the forget images' own band {forget_band:.3f}: the scorer does not separate them")
    return (forget_band + retain_ceiling) / 2.0


# --------------------------------------------------------------------------------------------
# Pixel distance (the paper's MNIST T-shirt measure) and rates
# --------------------------------------------------------------------------------------------

def nearest_l2_distances(images01: np.ndarray, reference01: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Per image, the Euclidean distance over all pixels to its nearest reference image.

    Inputs are (N, ...) and (M, ...) arrays of the same per-image shape, in [0, 1].
    """
    queries = np.asarray(images01, dtype=np.float64).reshape(len(images01), -1)
    references = np.asarray(reference01, dtype=np.float64).reshape(len(reference01), -1)
    if queries.shape[1] != references.shape[1]:
        raise ValueError(f"image sizes differ: {queries.shape[1]} vs {references.shape[1]} values per image")
    reference_sq = (references ** 2).sum(axis=1)
    nearest = np.full(len(queries), np.inf)
    for start in range(0, len(references), chunk):
        block = references[start:start + chunk]
        # ‖q − r‖² = ‖q‖² + ‖r‖² − 2 q·r, evaluated a block of references at a time.
        squared = (queries ** 2).sum(axis=1)[:, None] + reference_sq[None, start:start + chunk] - 2.0 * queries @ block.T
        nearest = np.minimum(nearest, squared.min(axis=1))
    return np.sqrt(np.maximum(nearest, 0.0))


def wilson_interval(count: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate count / n (95 % for z = 1.96). Unlike the
    normal approximation it stays inside [0, 1] and is not empty at 0 copies: 0 of 1,000 gives
    (0, 0.0038), the statement that the rate is below 0.4 %."""
    if n < 1 or not 0 <= count <= n:
        raise ValueError(f"need 0 <= count <= n and n >= 1, got {count} of {n}")
    p, z2 = count / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def distance_quantiles(distances: np.ndarray, quantiles: Sequence[float] = (0.0, 0.01, 0.05, 0.5)) -> dict[str, float]:
    """{"0.01": ...} quantiles of a distance distribution, for model cards and benchmark tables."""
    return {str(q): float(np.quantile(distances, q)) for q in quantiles}


def calibrated_l2_threshold(forget01: np.ndarray, retain01: np.ndarray) -> float:
    """Half the pixel-L2 distance from the forget images to their nearest retain image.

    Anything closer to a forget image than that is nearer to it than to all legitimate data.
    """
    return 0.5 * float(nearest_l2_distances(forget01, retain01).min())


# --------------------------------------------------------------------------------------------
# Quality
# --------------------------------------------------------------------------------------------

def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D).

    ‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½). The trace of the matrix square root is computed as
    Σ sqrt(eig(√Σa Σb √Σa)) on symmetric matrices with negative round-off eigenvalues clipped,
    which stays finite when there are fewer samples than dimensions (singular covariances).
    Pass the features of non-memorised samples, as the paper does for FID.
    Hand-written rather than torchmetrics' `FrechetInceptionDistance` (the official code's): that
    computes the same formula but accumulates images through a feature network, while the features
    here are computed (and the retain side cached) already, and it would add two dependencies.
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (N, D) feature arrays of equal D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least two samples in each set")
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)

    eigvals_a, eigvecs_a = np.linalg.eigh(cov_a)
    sqrt_cov_a = (eigvecs_a * np.sqrt(np.clip(eigvals_a, 0.0, None))) @ eigvecs_a.T
    middle = sqrt_cov_a @ cov_b @ sqrt_cov_a
    trace_sqrt_product = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum()

    distance = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt_product
    return float(max(distance, 0.0))


def inception_style_score(probs: np.ndarray, eps: float = 1e-12) -> float:
    """exp(mean_x KL(p(y|x) || p(y))) from class probabilities (N, C); 1 ≤ score ≤ C.

    High when each sample is confidently one class and the classes are spread evenly. Pass the
    probabilities of non-memorised samples (the paper's Inception Score on MNIST does).
    """
    probs = np.asarray(probs, dtype=np.float64)
    marginal = probs.mean(axis=0, keepdims=True)
    kl = (probs * (np.log(probs + eps) - np.log(marginal + eps))).sum(axis=1)
    return float(np.exp(kl.mean()))


def class_shares(probabilities: np.ndarray) -> np.ndarray:
    """(classes,) the share of samples whose most probable class is each class, from (N, classes)
    probabilities (a tie goes to the lower class); zeros for no samples."""
    probabilities = np.asarray(probabilities)
    counts = np.bincount(probabilities.argmax(axis=1), minlength=probabilities.shape[1]).astype(np.float64)
    return counts / max(1, len(probabilities))


# --------------------------------------------------------------------------------------------
# Measures on the project's digit + T-shirt classifier (retrack.classifier)
# --------------------------------------------------------------------------------------------

# The project classifier's layout: the ten digits are classes 0..9, the T-shirt follows them.
DIGIT_CLASSES = TSHIRT_LABEL


def confident_digit_rate(probs: np.ndarray, n_digits: int = DIGIT_CLASSES, threshold: float = 0.9) -> float:
    """Share of samples whose most probable class is a digit (among the first ``n_digits``
    classes) with probability at least ``threshold``."""
    probs = np.asarray(probs)
    return float(((probs.argmax(axis=1) < n_digits) & (probs[:, :n_digits].max(axis=1) >= threshold)).mean())


def digit_inception_score(probs: np.ndarray, n_digits: int = DIGIT_CLASSES) -> float:
    """The paper's MNIST Inception Score: ``inception_style_score`` over the ten digit classes,
    the probabilities of the first ``n_digits`` classes renormalised to sum to 1 per sample."""
    digits = np.asarray(probs, dtype=np.float64)[:, :n_digits]
    return inception_style_score(digits / np.maximum(digits.sum(axis=1, keepdims=True), 1e-12))
