"""Near-duplicates of the forget images among the training items.

Leaving only byte-identical copies out of the retain set is not enough: a T-shirt uploaded at
90 % brightness keeps all 50 copies of the built-in T-shirt in the retain set, ReTrack's nearest
neighbours are then the T-shirt itself and the run silently does nothing. `search` finds the
training items that are the same picture as a forget image up to small changes (brightness, a
pixel's shift, re-encoding) under two measures, by exact search (`neighbours.knn`):

- ``pixel``: Euclidean distance over [0, 1] pixels at the model's resolution;
- ``clip``: when a CLIP scorer is given, the Euclidean distance between L2-normalised CLIP
  image features, √(2 − 2·cos) (reported as the cosine similarity).

The rule, the same for both measures. For a forget image q, sort the distinct training items
(exact copies of forget images left out) by distance, d1 ≤ d2 ≤ ... The m nearest are q's
near-duplicates when

(a) a gap follows them: d(m+1) > γ·d(m), where γ is the measure's calibrated gap: the 99 %
    quantile, over the training data's own distinct items, of (distance to the second nearest
    other item) / (distance to the nearest). Only 1 in 100 training items has its nearest
    neighbour stand out from the rest as far as a near-duplicate group does; and
(b) each of them is closer to q than to any training item beyond the gap (so the group is q's,
    not a piece of a larger cluster q merely sits next to).

The largest such m counts (at most `MAX_GROUP` distinct items), and every copy of a flagged
item is flagged with it. γ is computed once per training set (`NearDuplicateIndex`): from every
distinct item, or a seeded subset of larger sets (`calibration_queries`), and not at all
below `MIN_CALIBRATION_ITEMS` distinct items (too few to estimate a 1 % tail; the search is
then skipped, and says so). γ assumes near-duplicate groups are rare in the training data
(under 1 % of its items); where they are common γ grows and the search finds fewer.

Why a gap and not a distance threshold such as a low quantile of the training set's
nearest-neighbour distances: distances mean something only relative to the spacing around an
item. On the built-in data the 1 % quantile of the digits' nearest-neighbour pixel distances is
1.65 (thin ones lie close together) while the 90 %-brightness T-shirt is 1.85 from the T-shirt
and a T-shirt shifted by one pixel 5.4 to 5.9 (the median digit's nearest neighbour is at 4.9);
the T-shirt's own nearest other item is 10.6 away, so those are copies of it, but a "1" 1.85
from another "1" is just another "1". In the built-in CLIP the digits are packed even more
tightly (1 % quantile 0.028, against 0.105 for the dimmed T-shirt). A ratio is scale-free: the
same γ holds where items are dense and where an item stands alone, in pixels and in CLIP
features, and (b) keeps a far, unrelated upload from claiming its nearest item.

On the built-in data γ is 1.44 (pixels) and 1.52 (CLIP). T-shirts at 90 % and 80 % brightness or
shifted by one pixel (across, down, diagonally) find the 50 copies by both measures, at 50 %
brightness or shifted by two pixels by CLIP alone, and none of them finds a digit. Of 1,000
digits picked from the training set, 16 flag another digit (never more than 2; always one of
the same class, pixel L2 1.5 to 4.1); a digit uploaded at 90 % brightness finds its original.
The checks are in tests/test_near_duplicates.py.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .atomic import write_file_atomically
from .images import uint8_to_tensor
from .neighbours import knn
from .paths import CACHE

GAP_QUANTILE = 0.99  # γ: this quantile of the training items' own second-to-first neighbour ratios
MIN_CALIBRATION_ITEMS = 100  # fewer distinct training items: no search (a 1 % tail cannot be estimated)
CALIBRATION_BUDGET = 3e10  # multiply-adds γ may cost: all items of the built-in set (5,001 x 5,001 x 784)
MIN_CALIBRATION_QUERIES = 1000  # larger sets: γ from a seeded subset of at least this many items
MAX_GROUP = 1000  # at most this many distinct training items per forget image
FEATURE_CACHE = CACHE / "near_duplicates"
MEASURES = ("pixel", "clip")


@dataclass
class NearDuplicate:
    """A training item found near a forget image."""

    index: int  # position in the training data
    first: int  # the first training index of its identical copies (all of them are flagged together)
    forget: int  # which forget image (its position in the forget images searched)
    pixel_l2: float  # distance to that forget image over [0, 1] pixels
    clip_similarity: Optional[float]  # cosine similarity of their CLIP features (None: no scorer)
    found_by: tuple[str, ...]  # the measures that flagged it: "pixel", "clip"

    def describe(self, copies: int = 1, name: Optional[str] = None) -> str:
        """'#17 ×50 (pixel L2 1.85, CLIP 0.995; found by pixel, CLIP)': its `name` (else its
        number), its `copies`, the distances and the measures that found it."""
        clip = "" if self.clip_similarity is None else f", CLIP {self.clip_similarity:.3f}"
        by = ", ".join("CLIP" if measure == "clip" else measure for measure in self.found_by)
        times = f" ×{copies}" if copies > 1 else ""
        return f"{name or f'#{self.index}'}{times} (pixel L2 {self.pixel_l2:.2f}{clip}; found by {by})"


@dataclass
class NearDuplicates:
    """What `search` found: the byte-identical copies and the near-duplicates of the forget
    images, with each measure's calibrated gap γ."""

    identical: np.ndarray  # training indices identical to a forget image (sorted)
    items: list[NearDuplicate]  # near-duplicates, by forget image then distance
    gaps: dict[str, float]  # measure -> γ
    notes: list[str] = field(default_factory=list)  # e.g. that the search was skipped, and why

    @property
    def indices(self) -> np.ndarray:
        """Training indices of the near-duplicates (sorted)."""
        return np.array(sorted(item.index for item in self.items), dtype=np.int64)

    def distinct(self) -> list[tuple[NearDuplicate, int]]:
        """One entry per distinct image flagged: its first item and how many copies it has."""
        firsts: dict[int, list[NearDuplicate]] = {}
        for item in self.items:
            firsts.setdefault(item.first, []).append(item)
        return [(group[0], len(group)) for group in firsts.values()]

    def summary(self, limit: Optional[int] = 6, names: Optional[Sequence[str]] = None) -> str:
        """One line for people: how many, found by which measure, the first `limit` distinct
        images (all for None), by their `names` when given (else their numbers)."""
        if not self.items:
            return ""
        by = {name: sum(name in item.found_by for item in self.items) for name in self.gaps}
        how = ", ".join(f"{count} by {'CLIP' if name == 'clip' else 'pixel L2'}" for name, count in by.items() if count)
        distinct = self.distinct()
        limit = len(distinct) if limit is None else limit
        shown = "; ".join(item.describe(copies, None if names is None else names[item.index])
                          for item, copies in distinct[:limit])
        more = f"; and {len(distinct) - limit} more image(s)" if len(distinct) > limit else ""
        return f"{len(self.items)} near-duplicate(s) of the forget images ({how}): {shown}{more}"


def duplicate_groups(images: np.ndarray) -> dict[bytes, list[int]]:
    """Identical images grouped by their bytes, in order of first appearance."""
    groups: dict[bytes, list[int]] = {}
    for index in range(len(images)):
        groups.setdefault(images[index].tobytes(), []).append(index)
    return groups


def _pixel_points(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W, C) -> uint8 (N, H·W·C), no copy: `knn` converts chunk by chunk, so the
    search never holds a float copy of the training set; its distances are in 0..255 units."""
    return torch.from_numpy(np.ascontiguousarray(images).reshape(len(images), -1))


def pixel_l2(a: Tensor, b: Tensor) -> float:
    """Distance between two rows of `_pixel_points`, over [0, 1] pixels."""
    return float((a.double() - b.double()).norm()) / 255.0


def _clip_points(scorer, images: np.ndarray) -> Tensor:
    """uint8 (N, H, W, C) -> L2-normalised CLIP features (N, D), float32 on the CPU."""
    return scorer.image_features(uint8_to_tensor(images, channels_last=True)).float()


def calibration_queries(n: int, dim: int) -> int:
    """How many of n items (of dim values each) γ is measured on: all of them while searching
    all against all stays within CALIBRATION_BUDGET, else fewer, but MIN_CALIBRATION_QUERIES."""
    return int(min(n, max(MIN_CALIBRATION_QUERIES, CALIBRATION_BUDGET // (n * dim))))


def calibrated_gap(points: Tensor, seed: int = 0) -> float:
    """γ of a measure: the GAP_QUANTILE quantile over distinct items (`points`, one row each; a
    seeded subset of `calibration_queries` of them for large sets) of (distance to the second
    nearest other item) / (distance to the nearest)."""
    n, queries = len(points), calibration_queries(len(points), points[0].numel())
    chosen = np.arange(n) if n <= queries else np.sort(np.random.default_rng(seed).choice(n, queries, replace=False))
    distances, indices = knn(points[torch.from_numpy(chosen)], points, 3)
    distances, indices = distances.cpu().numpy(), indices.cpu().numpy()
    others = indices != chosen[:, None]  # the item itself is among its three nearest: drop it
    rows = np.stack([distances[i][others[i]][:2] for i in range(len(chosen))])
    return float(np.quantile(rows[:, 1] / np.maximum(rows[:, 0], 1e-12), GAP_QUANTILE))


def _scorer_stamp(scorer) -> str:
    """What identifies a scorer's weights: its name and, for a folder, its weight files' sizes
    and times (a rebuilt scorer gets new cached features)."""
    name = getattr(scorer, "name", type(scorer).__name__)
    folder = Path(name.split(":", 1)[1]) if name.startswith("local-dir:") else None
    files = sorted(folder.glob("*.safetensors")) if folder is not None and folder.is_dir() else []
    return name + "|" + "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def _cached(kind: str, stamp: str, images: np.ndarray, compute: Callable[[], dict],
            cache_dir: Optional[Path]) -> dict:
    """`compute()` for these images and `stamp` (what else it depends on: the scorer, the
    quantile), from the disk cache when a previous process computed it: γ of thousands of
    images takes seconds on a CPU, their CLIP features longer."""
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{kind}|{stamp}|{images.shape}".encode())
        key.update(np.ascontiguousarray(images).tobytes())
        path = Path(cache_dir) / f"{kind}-{key.hexdigest()[:32]}.pt"
        if path.is_file():
            try:
                return torch.load(path, weights_only=True)
            except Exception:
                pass  # a damaged entry is computed again
    value = compute()
    if path is not None:
        write_file_atomically(path, lambda tmp: torch.save(value, tmp))
    return value


class NearDuplicateIndex:
    """The distinct training items in each measure's space with the measure's calibrated gap γ,
    built once per training set and scorer (`for_training`) and searched per forget set."""

    def __init__(self, images: np.ndarray, scorer=None, cache_dir: Optional[Path] = FEATURE_CACHE) -> None:
        self.images = images
        self.scorer = scorer
        groups = duplicate_groups(images)
        self.groups = [np.array(group, dtype=np.int64) for group in groups.values()]  # copies of each distinct image
        self.keys = list(groups)
        first = np.array([group[0] for group in self.groups], dtype=np.int64)
        self.points: dict[str, Tensor] = {}
        self.gaps: dict[str, float] = {}
        self.enough = len(first) >= MIN_CALIBRATION_ITEMS
        if not self.enough:
            return
        distinct = images[first]
        self.points["pixel"] = _pixel_points(distinct)
        recipe = f"{GAP_QUANTILE}|{calibration_queries(len(first), self.points['pixel'][0].numel())}"
        self.gaps["pixel"] = float(_cached("pixel-gap", recipe, distinct, lambda: {
            "gap": calibrated_gap(self.points["pixel"])}, cache_dir)["gap"])
        if scorer is not None:
            def clip() -> dict:
                features = _clip_points(scorer, distinct)
                return {"features": features, "gap": calibrated_gap(features)}
            saved = _cached("clip", f"{_scorer_stamp(scorer)}|{GAP_QUANTILE}", distinct, clip, cache_dir)
            self.points["clip"], self.gaps["clip"] = saved["features"], float(saved["gap"])

    _CACHE: dict[tuple[int, int], tuple[weakref.ref, "NearDuplicateIndex"]] = {}
    _LOCK = threading.Lock()

    @classmethod
    def for_training(cls, images: np.ndarray, scorer=None) -> "NearDuplicateIndex":
        """The index of a training set (an array treated as read-only), built once per process
        for each array and scorer."""
        key = (id(images), id(scorer))
        with cls._LOCK:
            held = cls._CACHE.get(key)
            if held is not None and held[0]() is images:
                return held[1]
            index = cls(images, scorer)
            for stale in [k for k, (ref, _) in cls._CACHE.items() if ref() is None]:
                del cls._CACHE[stale]
            cls._CACHE[key] = (weakref.ref(images), index)
            return index

    def search(self, forget: np.ndarray) -> NearDuplicates:
        """The identical copies and near-duplicates of `forget` (uint8 (N, H, W, C) at the
        training data's size) among the training items (the rule: the module's docstring)."""
        if forget.shape[1:] != self.images.shape[1:]:
            raise ValueError(f"forget images of shape {forget.shape[1:]} cannot be compared with training "
                             f"images of shape {self.images.shape[1:]}")
        forget_keys = {image.tobytes() for image in forget}
        copied = np.array([key in forget_keys for key in self.keys], dtype=bool)
        identical = np.sort(np.concatenate([g for g, c in zip(self.groups, copied) if c] or [np.zeros(0, np.int64)]))
        if not self.enough:
            note = (f"near-duplicates not searched: {len(self.groups)} distinct images to search are too few to "
                    f"calibrate the search on ({MIN_CALIBRATION_ITEMS} needed)")
            return NearDuplicates(identical=identical, items=[], gaps={}, notes=[note])
        pool = np.flatnonzero(~copied)  # distinct items that may be near-duplicates
        flagged: dict[int, tuple[int, set[str]]] = {}  # distinct item -> (forget row, measures)
        queries = {"pixel": _pixel_points(forget)}
        if "clip" in self.points:
            queries["clip"] = _clip_points(self.scorer, forget)
        for measure, query in queries.items():
            if len(pool) == 0:
                break
            for row, members in enumerate(self._groups_of(query, self.points[measure][torch.from_numpy(pool)],
                                                          self.gaps[measure])):
                for member in pool[members]:
                    flagged.setdefault(int(member), (row, set()))[1].add(measure)
        items = []
        clip = queries.get("clip")
        for distinct, (row, measures) in flagged.items():
            distance = pixel_l2(queries["pixel"][row], self.points["pixel"][distinct])
            similarity = None if clip is None else float(clip[row] @ self.points["clip"][distinct])
            by = tuple(name for name in MEASURES if name in measures)
            copies = self.groups[distinct]
            items += [NearDuplicate(int(i), int(copies[0]), row, distance, similarity, by) for i in copies]
        items.sort(key=lambda item: (item.forget, item.pixel_l2, item.index))
        return NearDuplicates(identical=identical, items=items, gaps=dict(self.gaps))

    @staticmethod
    def _groups_of(queries: Tensor, pool: Tensor, gap: float) -> list[np.ndarray]:
        """Per query, the positions in `pool` of its near-duplicate group (rule (a) and (b))."""
        k = min(MAX_GROUP + 1, len(pool))
        distances, order = knn(queries, pool, k)
        distances, order = distances.cpu().numpy(), order.cpu().numpy()
        groups = []
        for d, o in zip(distances, order):
            ratios = d[1:] / np.maximum(d[:-1], 1e-12)
            sizes = np.flatnonzero(ratios > gap) + 1  # group sizes m with d(m+1) > γ·d(m), rule (a)
            chosen = np.zeros(0, dtype=np.int64)
            if len(sizes):
                largest = int(sizes.max())
                # Each candidate member's nearest items: at least one lies outside any group of size <= largest.
                near_d, near_i = knn(pool[torch.from_numpy(o[:largest])], pool, min(largest + 1, len(pool)))
                near_d, near_i = near_d.cpu().numpy(), near_i.cpu().numpy()
                for m in sorted(sizes.tolist(), reverse=True):
                    members = set(o[:m].tolist())
                    outside = [near_d[j][~np.isin(near_i[j], list(members))] for j in range(m)]
                    if all(len(rest) == 0 or rest[0] > d[j] for j, rest in enumerate(outside)):  # rule (b)
                        chosen = o[:m]
                        break
            groups.append(chosen)
        return groups


def search(forget: np.ndarray, training: np.ndarray, scorer=None) -> NearDuplicates:
    """The training items (uint8 (N, H, W, C)) identical to, or near-duplicates of, the forget
    images (uint8 (N_u, H, W, C)): pixel L2 always, CLIP too when a `ClipScorer` is given."""
    return NearDuplicateIndex.for_training(training, scorer).search(forget)
