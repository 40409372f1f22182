"""Forget and retain sets for a text-to-image model when its training data is not available.

The protocol of the Stable Diffusion experiments (METHOD.md): for a prompt the model memorised,

1. generate N images with fixed seeds (`generate`);
2. embed them with a CLIP image encoder (any scorer with `.image_features(images)`);
3. split them with k-means into 2 clusters; the memorised cluster is the one closest to a
   reference image when the user has one, else the tighter one (near-copies of one training
   image sit closer together than varied generations) (`cluster_split`);
4. let the user move images between the two sets (`Split.with_memorised`);
5. unlearn: forget set = the memorised cluster, retain set = the rest, both conditioned on the
   prompt or a user-given modified prompt (`unlearn_prompt`, which calls the shared engine).

    split = generate_and_split(backend, "a memorised prompt", scorer, seed=0)  # 128 images on a GPU, 16 on a CPU
    split = split.with_memorised([0, 2, 5])          # optional: the user's correction
    result = unlearn_prompt(backend, split.forget_images(), split.retain_images(),
                            "a memorised prompt", UnlearnConfig.preset("sd"))

Uploaded forget images and a retain folder skip steps 1-4: load them with `images.load_images`
at `backend.image_size` and pass them to `unlearn_prompt` directly.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .backends.latent import LatentBackend
from .checks import check_request
from .engine import UnlearnConfig, unlearn
from .evaluation import Evaluation, OracleLevels, Reference, SamplerSettings, evaluate, evaluate_samples
from .grids import image_grid
from .images import tensor_to_pil
from .presets import GUIDANCE
from .reports import UnlearnResult
from .sampling import Samples, sample

MIN_GENERATIONS = 4  # two clusters need a few members each to say which one is tighter
# The paper generates 128 images per memorised prompt before splitting. At 512 px on a CPU that
# takes hours, so without a GPU the default is 16: enough for two clusters of a few images each.
PAPER_GENERATIONS = 128
CPU_GENERATIONS = 16


def default_generations(device: Union[str, torch.device]) -> int:
    """How many images of a prompt to generate for the split by default: the paper's 128 on a
    GPU (or other accelerator), 16 on the CPU."""
    return CPU_GENERATIONS if torch.device(device).type == "cpu" else PAPER_GENERATIONS


class ImageEmbedder(Protocol):
    """What the split needs from a CLIP scorer: image embeddings of (N, 3, H, W) images in [-1, 1]."""

    def image_features(self, images: Tensor) -> Tensor: ...


# ----------------------------------------------------------------------------- generation
def generate(
    backend: LatentBackend,
    prompt: str,
    n: int = 16,
    seed: int = 0,
    steps: int = 50,
    guidance: float = GUIDANCE,
    batch_size: int = 8,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> Samples:
    """n images for `prompt`, image i from seed `seed + i` (DDIM, classifier-free guidance), so
    the same call always returns the same images."""
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty: give the prompt whose generations should be split")
    cond = backend.encode_prompt([prompt])
    return sample(backend, n, seed=seed, steps=steps, scheduler="ddim", cond=cond, guidance=guidance,
                  batch_size=batch_size, on_batch=on_batch)


# ----------------------------------------------------------------------------- clustering
def _unit(x: Tensor) -> np.ndarray:
    x = x.detach().double().cpu().numpy()
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _tightness(unit: np.ndarray) -> float:
    """Mean pairwise cosine similarity of a cluster's members; -inf for a single member (one
    image is no evidence of memorisation, and would otherwise always count as tightest)."""
    n = unit.shape[0]
    if n < 2:
        return float("-inf")
    sims = unit @ unit.T
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))


@dataclass
class ClusterInfo:
    size: int
    tightness: float  # mean pairwise cosine similarity inside the cluster
    reference_similarity: Optional[float]  # cosine of the cluster's mean direction to the reference


def cluster_split(
    embeddings: Tensor,
    reference: Optional[Tensor] = None,
    seed: int = 0,
) -> tuple[list[int], list[int], str, list[ClusterInfo]]:
    """k-means (2 clusters, cosine geometry) on image embeddings (N, D).

    Returns (labels per image, indices of the memorised cluster, the rule that chose it:
    'reference' or 'tighter', info per cluster). `reference` is the embedding (D,) or (1, D) of
    an image known to be memorised: the cluster whose mean direction is closest to it is chosen.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    n = embeddings.shape[0]
    if n < MIN_GENERATIONS:
        raise ValueError(f"{n} images are too few to split into a memorised and a non-memorised cluster; "
                         f"use at least {MIN_GENERATIONS} (the paper uses {PAPER_GENERATIONS})")
    unit = _unit(embeddings)
    with warnings.catch_warnings():
        # Identical embeddings give one distinct cluster; handled below, not warned about.
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(unit)
    ref = None if reference is None else _unit(reference.reshape(1, -1))[0]
    infos = []
    for c in (0, 1):
        members = unit[labels == c]
        mean_direction = members.mean(0) if len(members) else np.zeros(unit.shape[1])
        mean_direction /= max(np.linalg.norm(mean_direction), 1e-12)
        ref_sim = None if ref is None or not len(members) else float(mean_direction @ ref)
        infos.append(ClusterInfo(size=int(len(members)), tightness=_tightness(members), reference_similarity=ref_sim))
    if ref is not None:
        rule = "reference"
        chosen = max((0, 1), key=lambda c: -np.inf if infos[c].reference_similarity is None else infos[c].reference_similarity)
    else:
        rule = "tighter"
        chosen = max((0, 1), key=lambda c: infos[c].tightness)
    memorised = [i for i in range(n) if labels[i] == chosen]
    return [int(x) for x in labels], memorised, rule, infos


# ----------------------------------------------------------------------------- the split
@dataclass
class Split:
    """N generations of a prompt divided into a memorised set (to forget) and the rest (to keep)."""

    prompt: str
    seeds: list[int]
    images: Tensor  # (N, 3, H, W) in [-1, 1]
    memorised: list[int]  # indices into images, sorted
    rule: str  # 'reference', 'tighter' or 'user'
    labels: list[int] = field(default_factory=list)  # k-means cluster of each image
    clusters: list[ClusterInfo] = field(default_factory=list)

    @property
    def retained(self) -> list[int]:
        chosen = set(self.memorised)
        return [i for i in range(len(self.seeds)) if i not in chosen]

    def forget_images(self) -> Tensor:
        return self.images[self.memorised]

    def retain_images(self) -> Tensor:
        return self.images[self.retained]

    def with_memorised(self, indices: Sequence[int]) -> "Split":
        """The user's correction: exactly these images form the forget set, all others are kept."""
        chosen = sorted({int(i) for i in indices})
        n = len(self.seeds)
        bad = [i for i in chosen if not 0 <= i < n]
        if bad:
            raise ValueError(f"image numbers {bad} do not exist; there are {n} images, numbered 0..{n - 1}")
        if not chosen:
            raise ValueError("the forget set would be empty: mark at least one image as memorised")
        if len(chosen) == n:
            raise ValueError("every image is marked memorised: nothing would be left to keep")
        return replace(self, memorised=chosen, rule="user")

    def grid(self, **kwargs):
        """All images with their seeds; memorised ones framed in red."""
        chosen = set(self.memorised)
        flags = [i in chosen for i in range(len(self.seeds))]
        return image_grid(self.images, labels=[f"seed {s}" for s in self.seeds], flags=flags, **kwargs)

    def save(self, folder: Union[str, Path]) -> Path:
        """Write forget/ and retain/ image folders, split.json and grid.png. The folders are what
        `retrack unlearn --forget DIR/forget --retain DIR/retain` reads: move files between them to
        correct the split by hand."""
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} already exists and is not empty; choose a new folder")
        pictures = tensor_to_pil(self.images)
        for name, indices in (("forget", self.memorised), ("retain", self.retained)):
            (folder / name).mkdir(parents=True, exist_ok=True)
            for i in indices:
                pictures[i].save(folder / name / f"{i:03d}_seed{self.seeds[i]}.png")
        self.grid().save(folder / "grid.png")
        record = {"prompt": self.prompt, "seeds": self.seeds, "memorised": self.memorised, "retained": self.retained,
                  "rule": self.rule, "labels": self.labels,
                  "clusters": [_finite(vars(c)) for c in self.clusters]}
        (folder / "split.json").write_text(json.dumps(record, indent=2))
        return folder



def _finite(record: dict) -> dict:
    """JSON has no infinity: a single-member cluster's tightness is written as null."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in record.items()}


def split_samples(samples: Samples, prompt: str, scorer: ImageEmbedder, reference: Optional[Tensor] = None, seed: int = 0) -> Split:
    """Steps 2-3 of the protocol on generations already made: embed them with `scorer` and split
    them with 2-means. `reference`: an image (3, H, W) or (1, 3, H, W) in [-1, 1] known to be
    memorised (any size the scorer accepts); without it the tighter cluster is taken as memorised."""
    with torch.no_grad():
        embeddings = scorer.image_features(samples.images)
        ref_embedding = None if reference is None else scorer.image_features(reference.reshape(-1, *reference.shape[-3:]))[0]
    labels, memorised, rule, clusters = cluster_split(embeddings, ref_embedding, seed=seed)
    return Split(prompt=prompt, seeds=list(samples.seeds), images=samples.images, memorised=memorised, rule=rule,
                 labels=labels, clusters=clusters)


def generate_and_split(
    backend: LatentBackend,
    prompt: str,
    scorer: ImageEmbedder,
    reference: Optional[Tensor] = None,
    **generation,
) -> Split:
    """Steps 1-3 of the protocol: `generate(backend, prompt, **generation)` (n, seed, steps,
    guidance, batch_size, on_batch), then `split_samples`. n defaults to
    `default_generations(backend.device)`: the paper's 128 on a GPU, 16 on the CPU."""
    n = generation.setdefault("n", default_generations(backend.device))
    if n < MIN_GENERATIONS:
        raise ValueError(f"generate at least {MIN_GENERATIONS} images to split (the paper uses {PAPER_GENERATIONS}), "
                         f"not {n}")
    samples = generate(backend, prompt, **generation)
    return split_samples(samples, prompt, scorer, reference, seed=generation.get("seed", 0))


# ----------------------------------------------------------------------------- unlearning
def unlearn_prompt(
    backend: LatentBackend,
    forget_images: Tensor,
    retain_images: Tensor,
    prompt: str,
    config: UnlearnConfig,
    **engine_kwargs,
) -> UnlearnResult:
    """Step 5: encode both image sets to latents and run the shared engine with every row
    conditioned on `prompt` (the original prompt, or a modified one the user chose).

    The request is checked by the one check (`checks.check_request`: settings, set
    sizes, K) before the images are encoded. `engine_kwargs` go to `engine.unlearn` (on_step,
    cancel, knn_cache, ...).
    """
    if not prompt or not prompt.strip():
        raise ValueError("the training prompt is empty: give the prompt (or a modified prompt) to fine-tune on")
    check_request(config, forget_images.shape[0], retain_images.shape[0])
    forget, retain = backend.encode(forget_images), backend.encode(retain_images)
    cond = backend.encode_prompt([prompt])  # one row, broadcast by the engine to every batch row
    return unlearn(backend, forget, retain, config, forget_cond=cond, retain_cond=cond, **engine_kwargs)


# ----------------------------------------------------------------------------- evaluation
@dataclass
class PromptEvaluation(Evaluation):
    """An `Evaluation` of one prompt's generations, as the Stable Diffusion tools report it.

    A sample is a copy by CLIP (`Evaluation.clip_flags`: its highest similarity to a memorised image at
    or above the prompt's threshold); the prompt is unlearned (`success`) when no sample is one.
    `text_score` is the mean CLIP cosine between the samples and the prompt (fidelity). With the
    split's retained generations as the oracle, the excess says how many more near-copies the
    model makes than those generations hold by chance.
    """

    prompt: str = ""

    @property
    def success(self) -> bool:
        return not bool(self.clip_flags.any())

    def summary(self) -> dict:
        """The record `retrack sd-eval` writes per model: every sample's similarity and the verdict."""
        similarity = self.clip_similarity
        return {"prompt": self.prompt, "seeds": self.samples.seeds, "similarity": [round(float(s), 4) for s in similarity],
                "mean_similarity": float(similarity.mean()), "max_similarity": float(similarity.max()),
                "threshold": self.clip_threshold, "memorisation_rate": self.clip_rate, "success": self.success,
                "text_score": self.text_score, "excess_over_oracle": self.excess()}


def prompt_reference(scorer, memorised_images: Tensor, threshold: float,
                     retained_images: Optional[Tensor] = None) -> tuple[Reference, Optional[OracleLevels]]:
    """The evaluation reference of a prompt (its memorised images, the CLIP `threshold` kept for
    before and after) and, when the split's retained generations are given, the oracle levels they
    set: for Stable Diffusion they play the part of a model that never saw the memorised image."""
    retained = retained_images if retained_images is not None else memorised_images[:0]
    reference = Reference.build(memorised_images, retained, scorer=scorer, clip_threshold=threshold)
    if retained_images is None or len(retained_images) == 0:
        return reference, None
    generations = Samples(retained_images, list(range(len(retained_images))))
    return reference, OracleLevels.from_evaluation(evaluate_samples(generations, reference),
                                                   source="the split's retained generations")


def evaluate_prompt(
    backend: LatentBackend,
    prompt: str,
    scorer,
    memorised_images: Tensor,
    threshold: float,
    seed: int = 1000,
    retained_images: Optional[Tensor] = None,
    n: int = 16,
    steps: int = 50,
    guidance: float = GUIDANCE,
    batch_size: int = 8,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> PromptEvaluation:
    """Generate n samples of `prompt` (seeds from 1000, i.e. other seeds than the split's, so the
    check is on fresh generations) and measure them with `retrack.evaluation` against the
    memorised images, scored by `scorer` (a metrics.ClipScorer). Choose `threshold` once per
    prompt, e.g. with `metrics.calibrate_threshold` on the split's forget and retain images, and
    keep it for the before and after evaluations; `retained_images` (the split's retain set) add
    the pixel criterion and the excess over them as the oracle."""
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty: give the prompt whose generations should be evaluated")
    reference, oracle = prompt_reference(scorer, memorised_images, threshold, retained_images)
    settings = SamplerSettings(n_samples=n, seed=seed, steps=steps, prompt=prompt, guidance=guidance,
                               batch_size=batch_size)
    return PromptEvaluation(prompt=prompt, **vars(evaluate(backend, settings, reference, oracle, on_batch)))
