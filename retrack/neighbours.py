"""Exact k-nearest-neighbour search of forget items among retain items, chunked and cached.

ReTrack needs, once per run, the K nearest retain items of every forget item (Euclidean
distance on flattened x0 tensors: pixels in [-1, 1], or VAE latents). The search is exact: it
walks the retain set in chunks and keeps a running top-K, so memory stays bounded by
(queries x chunk) distances however large the retain set is (100,000 latents of 4x64x64 never
become one matrix). Results are cached on disk, keyed by the content of both sets and K.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .atomic import write_file_atomically
from .paths import CACHE

DEFAULT_CACHE = CACHE / "knn"


def check_neighbour_count(k: int, n_retain: Optional[int]) -> None:
    """The one rule for K, used by the library, the CLI and the app (through
    `checks.check_request`): K >= 1 always, and since ReTrack's neighbours are retain items,
    K <= the retain set's size (`n_retain`; None for a method that uses no neighbours). Any
    other K is refused (ValueError), never changed behind the user's back, so a run's recorded K
    is always the K that was asked for."""
    if k < 1:
        raise ValueError(f"K must be at least 1, got {k}")
    if n_retain is not None and k > n_retain:
        raise ValueError(f"K = {k} neighbours asked for, but the retain set has only {n_retain} item(s); K counts "
                         f"retain images, so choose 1 <= K <= {n_retain}, or add retain images (for a Stable "
                         f"Diffusion split: generate more images)")


def knn(queries: Tensor, keys: Tensor, k: int, chunk_bytes: int = 64 * 2**20) -> tuple[Tensor, Tensor]:
    """Exact K nearest keys of each query: (distances (Q, k), indices (Q, k)), nearest first.

    Distances are Euclidean on flattened rows, computed in float64 chunk by chunk; at most
    about `chunk_bytes` of keys are converted at a time.
    """
    q = queries.reshape(queries.shape[0], -1)
    keys = keys.reshape(keys.shape[0], -1)
    n, dim = keys.shape
    if q.shape[1] != dim:
        raise ValueError(f"forget items have {q.shape[1]} values each but retain items have {dim}: they must have the same shape")
    check_neighbour_count(k, n)
    q64 = q.double()
    q_sq = q64.pow(2).sum(1, keepdim=True)
    rows = max(1, chunk_bytes // (8 * dim))
    best_d = torch.full((q.shape[0], 0), float("inf"), dtype=torch.float64, device=q.device)
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
    for start in range(0, n, rows):
        chunk = keys[start:start + rows].to(q.device).double()
        # |q - k|^2 = |q|^2 - 2 q.k + |k|^2, clamped: rounding may make it slightly negative.
        d = (q_sq - 2.0 * q64 @ chunk.T + chunk.pow(2).sum(1)).clamp_min(0.0)
        idx = torch.arange(start, start + chunk.shape[0], device=q.device).expand(q.shape[0], -1)
        cand_d, cand_i = torch.cat([best_d, d], 1), torch.cat([best_i, idx], 1)
        top = torch.topk(cand_d, min(k, cand_d.shape[1]), dim=1, largest=False, sorted=True)
        best_d, best_i = top.values, torch.gather(cand_i, 1, top.indices)
    return best_d.sqrt(), best_i


def fingerprint(x: Tensor) -> str:
    """Content hash of a tensor (shape, dtype and values)."""
    h = hashlib.sha256(f"{tuple(x.shape)}{x.dtype}".encode())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def nearest_neighbours(forget: Tensor, retain: Tensor, k: int, cache_dir: Optional[Path] = DEFAULT_CACHE) -> tuple[Tensor, Tensor]:
    """K nearest retain items of each forget item, cached per (retain set, forget set, K).

    Returns (distances (N_u, K), indices (N_u, K) into `retain`). `cache_dir=None` disables the cache.
    """
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{fingerprint(retain)}|{fingerprint(forget)}|{k}".encode()).hexdigest()[:32]
        path = Path(cache_dir) / f"{key}.pt"
        if path.exists():
            try:
                cached = torch.load(path, weights_only=True)
                return cached["distances"], cached["indices"]
            except Exception:
                pass  # a damaged cache entry is recomputed below
    distances, indices = knn(forget, retain, k)
    distances, indices = distances.cpu(), indices.cpu()
    if path is not None:
        write_file_atomically(path, lambda tmp: torch.save({"distances": distances, "indices": indices}, tmp))
    return distances, indices
