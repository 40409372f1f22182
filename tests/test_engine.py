"""The training loop on a tiny random UNet2DModel: every method, events, cancel, NaN, saving."""

import math
import threading
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline
from helpers import folder_digest
from sd_fixtures import one_thread  # noqa: F401  (fixture)

from retrack import objectives
from retrack.backends import load_backend
from retrack.devices import resolve_precision
from retrack.engine import MAX_OVERFLOWS_IN_A_ROW, UnlearnConfig, save_model, unlearn
from retrack.errors import Cancelled, Diverged
from retrack.gradients import combine_in_scaler_units


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 1, 8, 8, generator=g) * 2 - 1, torch.rand(24, 1, 8, 8, generator=g) * 2 - 1


def config(**kw):
    return UnlearnConfig(**{**dict(k=3, steps=2, batch_size=4, lr=1e-3), **kw})


@pytest.mark.parametrize("method", sorted(objectives.METHODS))
def test_each_method_trains_emits_events_and_saves(method, tiny_pixel_model, data, tmp_path):
    before = folder_digest(tiny_pixel_model)
    backend = load_backend(tiny_pixel_model)
    start = [p.detach().clone() for p in backend.unet.parameters()]
    events = []
    result = unlearn(backend, *data, config(method=method), on_step=events.append, knn_cache=None)
    assert [e.step for e in events] == [1, 2] and events == result.events
    assert all(e.grad_norm > 0 and e.seconds > 0 and e.step_seconds > 0 for e in events)
    assert any(not torch.equal(a, b) for a, b in zip(start, backend.unet.parameters()))
    assert (result.neighbours is not None) == (method == "retrack")
    out = save_model(backend, tmp_path / "out", result.metadata())
    assert folder_digest(tiny_pixel_model) == before  # the source folder is byte-identical
    reloaded = DDPMPipeline.from_pretrained(out, local_files_only=True)
    for a, b in zip(reloaded.unet.parameters(), backend.unet.parameters()):
        assert torch.equal(a, b)
    assert (out / "retrack.json").is_file() and not list(tmp_path.glob(".*partial"))


def test_gradient_accumulation_combines_two_gradient_methods_once_per_step(tiny_pixel_model, data, monkeypatch):
    """EraseDiff/SISS: combine the step's averaged gradients, never per micro-batch."""
    method = objectives.METHODS["erasediff"]
    backend = load_backend(tiny_pixel_model)
    params = backend.trainable_parameters()
    micro, combined = [], []

    def recording_objective(*args):
        terms = method.objective(*args)
        micro.append([torch.autograd.grad(x, params, retain_graph=True) for x in (terms.retain, terms.unlearn)])
        return terms

    def recording_combine(g_r, g_u, p):
        combined.append((g_r, g_u))
        return method.combine(g_r, g_u, p)

    monkeypatch.setitem(objectives.METHODS, "erasediff",
                        objectives.Method("erasediff", recording_objective, combine=recording_combine))
    unlearn(backend, *data, config(method="erasediff", steps=1, grad_accum=3), knn_cache=None)
    assert len(micro) == 3 and len(combined) == 1
    for which in (0, 1):
        expected = [sum(m[which][i] for m in micro) / 3 for i in range(len(params))]
        for got, want in zip(combined[0][which], expected):
            torch.testing.assert_close(got, want)


def test_cancel_from_another_thread_stops_the_run(tiny_pixel_model, data):
    backend = load_backend(tiny_pixel_model)
    cancel = threading.Event()
    events = []

    def on_step(event):
        events.append(event)
        if event.step == 2:
            threading.Thread(target=cancel.set).start()
            threading.Event().wait(0.2)

    with pytest.raises(Cancelled, match="after 2 of 50"):
        unlearn(backend, *data, config(steps=50), on_step=on_step, cancel=cancel, knn_cache=None)
    assert len(events) == 2


def test_nan_loss_stops_with_a_reason(tiny_pixel_model, data):
    backend = load_backend(tiny_pixel_model)
    with torch.no_grad():
        next(backend.unet.parameters()).fill_(float("nan"))
    with pytest.raises(Diverged, match="step 1"):
        unlearn(backend, *data, config(), knn_cache=None)


def test_runs_are_reproducible_from_the_seed(tiny_pixel_model, data):
    losses = []
    for _ in range(2):
        result = unlearn(load_backend(tiny_pixel_model), *data, config(seed=3), knn_cache=None)
        losses.append([e.loss for e in result.events])
    assert losses[0] == losses[1]


@pytest.mark.parametrize("bad, message", [
    (dict(lam=1.5), "lambda"), (dict(lam=float("nan")), "finite"), (dict(steps=0), "steps"),
    (dict(batch_size=-1), "batch"), (dict(lr=0.0), "learning rate"), (dict(lr=float("inf")), "finite"),
    (dict(method="magic"), "unknown method"), (dict(k=30), "K = 30"), (dict(steps=2.5), "whole number"),
])
def test_bad_settings_are_refused_before_work(tiny_pixel_model, data, bad, message):
    with pytest.raises(ValueError, match=message):
        unlearn(load_backend(tiny_pixel_model), *data, config(**bad), knn_cache=None)


def test_bad_sets_are_refused(tiny_pixel_model, data):
    forget, retain = data
    backend = load_backend(tiny_pixel_model)
    with pytest.raises(ValueError, match="forget set is empty"):
        unlearn(backend, forget[:0], retain, config(), knn_cache=None)
    with pytest.raises(ValueError, match="only forget items"):
        unlearn(backend, forget, forget.clone(), config(k=1), knn_cache=None)
    with pytest.raises(ValueError, match="copies of forget"):
        unlearn(backend, forget, torch.cat([retain, forget[:1]]), config(), knn_cache=None)


def test_save_refuses_existing_folder_and_the_source(tiny_pixel_model, data, tmp_path):
    backend = load_backend(tiny_pixel_model)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        save_model(backend, tmp_path / "taken", {})
    with pytest.raises(ValueError, match="source"):
        save_model(backend, tiny_pixel_model, {}, overwrite=True)


def test_interrupted_save_leaves_no_folder_under_the_real_name(tiny_pixel_model, tmp_path, monkeypatch):
    backend = load_backend(tiny_pixel_model)

    def crash(out_dir):
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "model_index.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(backend, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(backend, tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- mixed precision
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("method", ["retrack", "erasediff", "siss"])  # one- and two-gradient paths
def test_fp16_overflows_are_skipped_by_the_scaler_and_every_step_is_taken(method, tiny_pixel_model, data):
    """The summed squared errors make gradients of a few hundred; times fp16's starting loss scale
    (2**16) they overflow fp16, so the first attempts overflow. The scaler skips them (no update)
    and halves its scale until the gradients fit; the run then takes all its steps, and the
    gradient norms it reports are true (unscaled) ones, of the size fp32 gives."""
    fp32 = unlearn(load_backend(tiny_pixel_model), *data, config(method=method, steps=3, mixed_precision="no"),
                   knn_cache=None)
    fp16 = unlearn(load_backend(tiny_pixel_model), *data, config(method=method, steps=3, mixed_precision="fp16"),
                   knn_cache=None)
    assert fp32.overflow_skips == 0 and fp16.overflow_skips >= 1
    assert [e.step for e in fp16.events] == [1, 2, 3]
    assert all(math.isfinite(e.loss) and math.isfinite(e.grad_norm) for e in fp16.events)
    ratio = fp16.events[0].grad_norm / fp32.events[0].grad_norm  # other draws (retried), same model and data
    assert 0.5 < ratio < 2, ratio  # still scaled, it would be 2**10 times larger or more
    assert fp16.metadata()["mixed_precision"] == "fp16"
    assert fp16.metadata()["fp16_overflow_skips"] == fp16.overflow_skips


@pytest.mark.usefixtures("one_thread")
def test_fp16_that_never_stops_overflowing_diverges_with_a_reason(tiny_pixel_model, data):
    """NaN weights make every attempt's gradients non-finite: after MAX_OVERFLOWS_IN_A_ROW skips
    the run stops with the reason, the weights never updated."""
    backend = load_backend(tiny_pixel_model)
    with torch.no_grad():
        next(backend.unet.parameters()).fill_(float("nan"))
    before = [p.detach().clone() for p in backend.unet.parameters()]
    with pytest.raises(Diverged, match=f"overflowed in {MAX_OVERFLOWS_IN_A_ROW} attempts in a row at step 1; try bf16"):
        unlearn(backend, *data, config(mixed_precision="fp16", batch_size=1), knn_cache=None)
    assert all(torch.equal(a, b) for a, b in zip(before[1:], list(backend.unet.parameters())[1:]))  # no update


@pytest.mark.parametrize("combine", [lambda r, u, p: objectives.erasediff_combine(r, u, 0.3),
                                     lambda r, u, p: objectives.siss_combine(r, u, 2.0)], ids=["erasediff", "siss"])
def test_two_gradient_methods_combine_the_true_gradients_under_a_loss_scale(combine):
    """Both gradients arrive multiplied by the loss scale. SISS's rescaling to the fixed norm C
    is not homogeneous, so combining scaled gradients would be wrong; combine_in_scaler_units
    divides both by the scale, combines, and multiplies back: exactly scale * combine(true)."""
    g = torch.Generator().manual_seed(0)
    g_r, g_u = ([torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
                for _ in range(2))
    scale = 2.0**12
    got = combine_in_scaler_units(combine, [x * scale for x in g_r], [x * scale for x in g_u], None, scale)
    for a, b in zip(got, combine(g_r, g_u, None)):
        assert torch.equal(a, b * scale)  # powers of two: exact
    # An overflow in either gradient reaches the scaler as a non-finite gradient (the step is skipped).
    broken = [g_u[0].clone().fill_(float("inf")), g_u[1]]
    assert not torch.isfinite(combine_in_scaler_units(combine, g_r, broken, None, scale)[0]).all()


def test_siss_on_scaled_gradients_would_differ():
    """Why the unscaling matters: SISS on gradients still multiplied by the scale is not the
    scaled SISS update (its forget term keeps the fixed norm C whatever the scale)."""
    g = torch.Generator().manual_seed(1)
    g_r, g_u = [torch.randn(6, generator=g, dtype=torch.float64)], [torch.randn(6, generator=g, dtype=torch.float64)]
    scale = 2.0**12
    naive = objectives.siss_combine([g_r[0] * scale], [g_u[0] * scale], 2.0)[0] / scale
    assert not torch.allclose(naive, objectives.siss_combine(g_r, g_u, 2.0)[0])


@pytest.mark.usefixtures("one_thread")
def test_an_unset_precision_follows_accelerate_launch(tiny_pixel_model, data, monkeypatch):
    """`accelerate launch --mixed_precision X` hands X to the processes it starts as
    ACCELERATE_MIXED_PRECISION; a config that sets no precision follows it, one that sets it wins."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_precision(None) == "bf16" and resolve_precision("no") == "no"
    result = unlearn(load_backend(tiny_pixel_model), *data, config(steps=1), knn_cache=None)
    assert result.config.mixed_precision == "bf16" and result.metadata()["mixed_precision"] == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ValueError, match="got 'fp8' \\(set by accelerate launch"):
        unlearn(load_backend(tiny_pixel_model), *data, config(steps=1), knn_cache=None)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert resolve_precision(None) == "no"  # fp32, the published setting


def _denoising_loss(backend, x0: torch.Tensor, draws: int = 64) -> float:
    """Mean per-sample denoising loss of x0's rows over fixed (t, eps) draws."""
    g = torch.Generator().manual_seed(123)
    rows = x0[torch.randint(x0.shape[0], (draws,), generator=g)]
    t = backend.schedule.sample_t(draws, g)
    eps = torch.randn(rows.shape, generator=g)
    gamma, sigma = backend.schedule.gamma_sigma(t, rows)
    with torch.no_grad():
        return float(objectives.sum_sq(backend.denoise(gamma * rows + sigma * eps, t, None), eps).mean())


@pytest.mark.parametrize("method, rises", [("neggrad", True), ("vanilla", False)])
def test_the_engine_steps_in_the_direction_of_the_objective(method, rises, tiny_pixel_model, data):
    """End to end, not only the formula: NegGrad's steps raise the forget rows' denoising loss
    (ascent), vanilla's lower the retain rows' (descent)."""
    forget, retain = data
    backend = load_backend(tiny_pixel_model)
    watched = forget if method == "neggrad" else retain
    before = _denoising_loss(backend, watched)
    unlearn(backend, forget, retain, config(method=method, steps=5, batch_size=8), knn_cache=None)
    after = _denoising_loss(backend, watched)
    assert (after > before) if rises else (after < before), (before, after)
