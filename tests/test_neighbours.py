"""Exact k-NN against brute force, across chunk boundaries, with its cache and its errors; the one K rule."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO

from retrack.job_settings import EvalSettings
from retrack.backends import load_backend
from retrack.cli import main
from retrack.engine import UnlearnConfig, unlearn
from retrack.forget_set import build_forget_set
from retrack.jobs import Job
from retrack.models import open_model
from retrack.neighbours import check_neighbour_count, knn, nearest_neighbours


def brute_force(q, keys, k):
    d = torch.cdist(q.flatten(1).double(), keys.flatten(1).double())
    top = torch.topk(d, k, dim=1, largest=False)
    return top.values, top.indices


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 50, 1000])
def test_knn_equals_brute_force_across_chunk_boundaries(chunk_rows):
    g = torch.Generator().manual_seed(chunk_rows)
    queries, keys = torch.randn(5, 2, 3, 3, generator=g), torch.randn(50, 2, 3, 3, generator=g)
    dim = 2 * 3 * 3
    d, i = knn(queries, keys, 4, chunk_bytes=chunk_rows * 8 * dim)
    bd, bi = brute_force(queries, keys, 4)
    assert torch.equal(i, bi)
    torch.testing.assert_close(d, bd)


def test_k_equal_to_retain_size_and_k_too_large():
    keys = torch.randn(6, 4)
    d, i = knn(torch.randn(2, 4), keys, 6)
    assert sorted(i[0].tolist()) == list(range(6))
    with pytest.raises(ValueError, match="K = 7 .* 6 item"):
        knn(torch.randn(2, 4), keys, 7)
    with pytest.raises(ValueError, match="same shape"):
        knn(torch.randn(2, 5), keys, 2)


# Run in a fresh process, whose peak resident memory (ru_maxrss, which sees torch's CPU tensors;
# tracemalloc does not) is then the search's own. Prints the nearest indices and the peak's growth.
KNN_PEAK_MEMORY = """
import json, resource, sys
import torch
from retrack.neighbours import knn

keys = torch.randn(2000, 4, 64, 64)
queries = keys[[3, 1500]] + 0.01
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
distances, indices = knn(queries, keys, 2, chunk_bytes=2**20)
growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"nearest": indices[:, 0].tolist(), "growth_bytes": growth * (1 if sys.platform == "darwin" else 1024)}))
"""
PEAK_MEMORY_BOUND = 64 * 2**20  # measured: ~10 MB chunked; ~500 MB when the keys are converted at once


def test_memory_stays_bounded_for_large_items():
    # 2,000 items of 4x64x64 latents (131 MB) with a 1 MB chunk budget: never one (2000 x 16384) float64 matrix
    run = subprocess.run([sys.executable, "-c", KNN_PEAK_MEMORY], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    measured = json.loads(run.stdout.splitlines()[-1])
    assert measured["nearest"] == [3, 1500]
    assert measured["growth_bytes"] < PEAK_MEMORY_BOUND, f"the search's peak memory grew by {measured['growth_bytes'] / 2**20:.0f} MB"


def test_cache_returns_the_same_result_and_is_keyed_by_k(tmp_path):
    g = torch.Generator().manual_seed(0)
    forget, retain = torch.randn(3, 8, generator=g), torch.randn(30, 8, generator=g)
    d1, i1 = nearest_neighbours(forget, retain, 5, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    d2, i2 = nearest_neighbours(forget, retain, 5, cache_dir=tmp_path)
    assert torch.equal(i1, i2) and torch.equal(d1, d2)
    nearest_neighbours(forget, retain, 3, cache_dir=tmp_path)
    nearest_neighbours(forget, retain[:-1], 3, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 3


def rule_message(k: int, n_retain: int) -> str:
    with pytest.raises(ValueError) as info:
        check_neighbour_count(k, n_retain)
    return str(info.value)


def test_one_k_rule_for_the_library_the_cli_and_the_app(tiny_pixel_model, image_folders, tiny_app_model, tmp_path,
                                                        capsys):
    """K larger than the retain set is refused, with the same message, by the engine (library),
    the CLI and the app's job (before it queues); methods without neighbours ignore K."""
    g = torch.Generator().manual_seed(0)
    forget, retain = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1, torch.rand(12, 1, 8, 8, generator=g) * 2 - 1
    assert "the retain set has only 12 item(s)" in rule_message(13, 12) and "choose 1 <= K <= 12" in rule_message(13, 12)

    with pytest.raises(ValueError) as library:
        unlearn(load_backend(tiny_pixel_model), forget, retain, UnlearnConfig(k=13, steps=1, batch_size=2), knn_cache=None)
    assert str(library.value) == rule_message(13, 12)
    vanilla = unlearn(load_backend(tiny_pixel_model), forget, retain,
                      UnlearnConfig(method="vanilla", k=13, steps=1, batch_size=2), knn_cache=None)
    assert len(vanilla.events) == 1

    forget_dir, retain_dir = image_folders  # 12 retain images
    code = main(["unlearn", "--model", str(tiny_pixel_model), "--forget", str(forget_dir), "--retain", str(retain_dir),
                 "--k", "13", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "cli")])
    assert code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == f"retrack: error: {rule_message(13, 12)}"

    model = open_model(*map(str, tiny_app_model))  # 16 training images; forgetting #0 and #1 keeps 14
    forget_set = build_forget_set(model, [0, 1])
    with pytest.raises(ValueError) as app:
        Job(model, forget_set, UnlearnConfig(k=15, steps=1), EvalSettings(), tmp_path / "app")
    assert str(app.value) == rule_message(15, len(forget_set.retain_index)) and len(forget_set.retain_index) == 14
