"""Settings and sets that cannot work are refused before any work starts, through the library
and the CLI: a one-line reason, no training step taken, nothing written.

(test_engine.py and test_cli.py already cover a few values; these are the rest of the edges.)
"""

from __future__ import annotations

import math

import pytest
import torch

from retrack.backends import load_backend
from retrack.cli import main
from retrack.engine import UnlearnConfig, unlearn

NO_GPU = not torch.cuda.is_available()

BAD_SETTINGS = [
    (dict(lam=-0.01), "lambda must lie in [0, 1]"),
    (dict(lam=math.inf), "lam must be a finite number"),
    (dict(lr=-1e-4), "learning rate must lie in (0, 1]"),
    (dict(lr=2.0), "learning rate must lie in (0, 1]"),
    (dict(lr=math.nan), "lr must be a finite number"),
    (dict(steps=-1), "steps must lie in [1, 1000000]"),
    (dict(steps=2_000_000), "steps must lie in [1, 1000000]"),
    (dict(batch_size=0), "batch size must lie in [1, 65536]"),
    (dict(batch_size=10**6), "batch size must lie in [1, 65536]"),
    (dict(grad_accum=0), "gradient accumulation must lie"),
    (dict(grad_accum=10**5), "gradient accumulation must lie"),
    (dict(k=0), "K must be at least 1"),
    (dict(k=True), "k must be a whole number"),
    (dict(k=25), "K = 25 neighbours asked for, but the retain set has only 24"),
    (dict(betas=(math.nan, 0.999)), "betas"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(weight_decay=-1.0), "weight decay must lie in [0, 1]"),
    (dict(weight_decay=math.inf), "weight_decay must be a finite number"),
    (dict(clip_norm=0.0), "clip norm must be positive"),
    (dict(siss_c=0.0), "SISS C must be positive"),
    (dict(eta=-1.0), "eta must not be negative"),
    (dict(seed=-1), "seed must lie in [0, 2**32)"),
    (dict(seed=2**40), "seed must lie in [0, 2**32)"),
    (dict(mixed_precision="fp8"), "mixed precision must be"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    pytest.param(dict(device="cuda"), "no GPU is available", marks=pytest.mark.skipif(not NO_GPU, reason="GPU here")),
]


@pytest.fixture
def sets() -> tuple[torch.Tensor, torch.Tensor]:
    """2 forget and 24 retain x0 rows for the tiny 8x8x1 model."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 1, 8, 8, generator=g) * 2 - 1, torch.rand(24, 1, 8, 8, generator=g) * 2 - 1


def refused_before_work(backend, forget, retain, config: UnlearnConfig, message: str) -> None:
    """unlearn raises ValueError(message) with no step reported and the weights untouched."""
    weights = [p.detach().clone() for p in backend.unet.parameters()]
    steps = []
    with pytest.raises(ValueError) as refused:
        unlearn(backend, forget, retain, config, on_step=steps.append, knn_cache=None)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert steps == []
    assert all(torch.equal(a, b) for a, b in zip(weights, backend.unet.parameters()))


@pytest.mark.parametrize("bad, message", BAD_SETTINGS)
def test_library_refuses_bad_settings_before_any_step(tiny_pixel_model, sets, bad, message):
    config = UnlearnConfig(**{**dict(k=3, steps=2, batch_size=4), **bad})
    refused_before_work(load_backend(tiny_pixel_model), *sets, config, message)


def test_library_refuses_bad_sets_before_any_step(tiny_pixel_model, sets):
    forget, retain = sets
    backend = load_backend(tiny_pixel_model)
    config = UnlearnConfig(k=3, steps=2, batch_size=4)
    refused_before_work(backend, forget[:0], retain, config, "the forget set is empty")
    refused_before_work(backend, forget, retain[:0], config, "the retain set is empty")
    refused_before_work(backend, retain, retain.clone(), config, "the retain set holds only forget items")
    refused_before_work(backend, forget, torch.cat([retain, forget]), config, "2 retain item(s) are copies of forget items")
    refused_before_work(backend, forget, retain[:, :, :4], config, "differ in shape")
    poisoned = retain.clone()
    poisoned[3, 0, 0, 0] = math.nan
    refused_before_work(backend, forget, poisoned, config, "NaN/inf")


# ============================================================================ through the CLI
CLI_BAD = [
    (["--lam", "-0.5"], "lambda must lie in [0, 1]"),
    (["--lam", "nan"], "lam must be a finite number"),
    (["--lr", "0"], "learning rate must lie in (0, 1]"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--lr", "10"], "learning rate must lie in (0, 1]"),
    (["--steps", "-5"], "steps must lie in [1, 1000000]"),
    (["--steps", "99999999"], "steps must lie in [1, 1000000]"),
    (["--batch", "0"], "batch size must lie in [1, 65536]"),
    (["--batch", "100000000"], "batch size must lie in [1, 65536]"),
    (["--accum", "0"], "gradient accumulation must lie"),
    (["--k", "13"], "K = 13 neighbours asked for, but the retain set has only 12"),
    (["--seed", "-3"], "seed must lie in [0, 2**32)"),
    (["--device", "tpu"], "unknown device 'tpu'"),
]


def run_cli(model, forget, retain, out, extra, capsys) -> tuple[int, list[str]]:
    code = main(["unlearn", "--model", str(model), "--forget", *map(str, forget), "--retain", str(retain),
                 "--k", "3", "--steps", "2", "--batch", "4", "--device", "cpu", "--out", str(out), *extra])
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line_refusal(code: int, err: list[str], message: str, out) -> None:
    assert code == 2, err
    assert err[-1].startswith("retrack: error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), "nothing is written"


@pytest.mark.parametrize("extra, message", CLI_BAD)
def test_cli_refuses_bad_settings_in_one_line_and_writes_nothing(tiny_pixel_model, image_folders, tmp_path, capsys,
                                                                  extra, message):
    forget, retain = image_folders
    out = tmp_path / "outputs" / "clean"
    code, err = run_cli(tiny_pixel_model, [forget], retain, out, extra, capsys)
    assert_one_line_refusal(code, err, message, out)


def test_cli_refuses_bad_sets_in_one_line_and_writes_nothing(tiny_pixel_model, image_folders, tmp_path, capsys):
    forget, retain = image_folders
    out = tmp_path / "outputs" / "clean"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no pictures here")
    code, err = run_cli(tiny_pixel_model, [empty], retain, out, [], capsys)
    assert_one_line_refusal(code, err, "no image files", out)

    code, err = run_cli(tiny_pixel_model, [retain], retain, out, [], capsys)  # forget set = retain set
    assert_one_line_refusal(code, err, "the retain set holds only forget items", out)

    code, err = run_cli(tiny_pixel_model, [forget / "secret.png", retain / "0.png"], retain, out, [], capsys)
    assert_one_line_refusal(code, err, "1 retain item(s) are copies of forget items", out)
