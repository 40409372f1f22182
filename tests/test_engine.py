"""The training loop on a tiny random UNet2DModel: every method, events, cancel, NaN, saving."""

import hashlib
import threading
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline

from retrack import objectives
from retrack.backends import load_backend
from retrack.engine import Cancelled, Diverged, UnlearnConfig, save_model, unlearn


def folder_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


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
