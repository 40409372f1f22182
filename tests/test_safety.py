"""Safety defaults: weights load from safetensors only (a pickle is never opened), no remote code,
and the app's defaults (127.0.0.1, an upload size cap, files served only from its output folder).

The running server's side of the last point (binding, the cap, what it serves) is checked
against a real server in test_load.py, which starts one anyway.
"""

from __future__ import annotations

import ast
import os
import pickle
import shutil
from pathlib import Path

import pytest
from diffusers import DDPMPipeline

from helpers import REPO, free_port
from retrack import paths
from retrack.backends import load_backend
from retrack.cli import main
from retrack.metrics import ClipScorer

SOURCES = sorted([*REPO.glob("retrack/**/*.py"), REPO / "app.py", *REPO.glob("ui/*.py"), *REPO.glob("scripts/*.py"),
                  *REPO.glob("benchmarks/*.py")])


class Payload:
    """A pickle that creates a file when it is unpickled: proof of whether anything opened it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def plant_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(marker)))


def test_model_with_only_pickle_weights_is_refused_and_never_unpickled(tiny_pixel_model, tmp_path, capsys):
    folder, marker = tmp_path / "pickled-ddpm", tmp_path / "the-pickle-ran"
    shutil.copytree(tiny_pixel_model, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    plant_pickle(folder / "unet" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(ValueError, match=r"unet/diffusion_pytorch_model\.bin holds the weights in pickle format"):
        load_backend(folder)
    assert main(["sample", "--model", str(folder), "--n", "1", "--out", str(tmp_path / "grid.png")]) == 2
    assert "retrack loads safetensors only" in capsys.readouterr().err
    assert not marker.exists()


def test_pickle_beside_safetensors_is_ignored(tiny_pixel_model, tmp_path):
    folder, marker = tmp_path / "both", tmp_path / "the-pickle-ran"
    shutil.copytree(tiny_pixel_model, folder)
    plant_pickle(folder / "unet" / "diffusion_pytorch_model.bin", marker)
    assert load_backend(folder).image_size == 8 and not marker.exists()


def test_damaged_weights_give_a_reason_not_a_traceback(tiny_pixel_model, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(tiny_pixel_model, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"damaged: the model cannot be loaded \(OSError: Unable to load weights"):
        load_backend(folder)


def test_clip_folder_without_safetensors_is_refused(tmp_path):
    from retrack.testing import build_tiny_clip

    folder, marker = build_tiny_clip(tmp_path / "clip"), tmp_path / "the-pickle-ran"
    (folder / "open_clip_model.safetensors").unlink()
    with pytest.raises(ValueError, match="no .safetensors weights"):  # open_clip would use random weights
        ClipScorer.load(str(folder), device="cpu")
    plant_pickle(folder / "open_clip_pytorch_model.bin", marker)
    with pytest.raises(ValueError, match="retrack loads safetensors only"):
        ClipScorer.load(str(folder), device="cpu")
    assert not marker.exists()


# ============================================================================ the source, read
def calls(tree: ast.AST, name: str) -> list[ast.Call]:
    """Calls of a function or method called `name` (`f(...)`, `x.f(...)`)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Name) and func.id == name) or (isinstance(func, ast.Attribute) and func.attr == name):
                found.append(node)
    return found


def dict_literals(tree: ast.AST) -> dict[str, ast.Call]:
    """`name = dict(a=..., b=...)` assignments of a module, so `f(**name)` can be read too."""
    return {node.targets[0].id: node.value for node in ast.walk(tree)
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name) and node.value.func.id == "dict"}


def keyword(call: ast.Call, name: str, tree: ast.AST) -> object:
    """The literal value of a keyword argument, also through `**options` built by `dict(...)` in
    the module; 'absent' when it is not passed, 'unknown' when it cannot be read."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "unknown"
        if kw.arg is None:
            options = dict_literals(tree).get(kw.value.id) if isinstance(kw.value, ast.Name) else None
            value = "unknown" if options is None else keyword(options, name, tree)
            if value != "absent":
                return value
    return "absent"


def receiver(call: ast.Call) -> str:
    return call.func.value.id if isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name) else ""


@pytest.fixture(scope="module")
def trees() -> dict[str, ast.AST]:
    assert len(SOURCES) > 20
    return {str(path.relative_to(REPO)): ast.parse(path.read_text(), str(path)) for path in SOURCES}


def test_no_source_enables_remote_code(trees):
    """No call passes trust_remote_code other than False, and the name appears nowhere else
    (so no **options passed through can carry it either)."""
    offenders = [f"{name}:{node.lineno}" for name, tree in trees.items() for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and keyword(node, "trust_remote_code", tree) not in ("absent", "unknown", False)]
    assert offenders == []
    for path in SOURCES:
        text = path.read_text()
        assert text.count("trust_remote_code") == text.count("trust_remote_code=False"), path


def test_no_source_unpickles(trees):
    for name, tree in trees.items():
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in node.names} | {node.module for node in ast.walk(tree)
                                                if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"pickle", "dill", "cloudpickle", "joblib"}, name
        for call in calls(tree, "load"):
            if receiver(call) == "torch":
                assert keyword(call, "weights_only", tree) is True, f"{name}:{call.lineno}: torch.load without weights_only=True"


def test_model_loaders_ask_for_safetensors(trees):
    """Every diffusers model or pipeline loaded (from_pretrained, download) asks for safetensors;
    schedulers (a JSON config) need not. Hub downloads fetch only configs and safetensors."""
    checked = 0
    for name, tree in trees.items():
        for call in calls(tree, "from_pretrained") + calls(tree, "download"):
            owner = receiver(call)
            if owner.endswith(("Model", "Pipeline", "AutoencoderKL")):
                checked += 1
                assert keyword(call, "use_safetensors", tree) is True, f"{name}:{call.lineno}: {owner} without use_safetensors"
        for call in calls(tree, "snapshot_download"):
            patterns = next(ast.literal_eval(kw.value) for kw in call.keywords if kw.arg == "allow_patterns")
            assert all(pattern.endswith((".json", ".txt", ".safetensors")) for pattern in patterns), name
    assert checked >= 3  # the pixel UNet, the SD pipeline and its download


def test_saved_models_are_safetensors_only(tiny_pixel_model, tmp_path):
    from retrack.engine import save_model

    saved = save_model(load_backend(tiny_pixel_model), tmp_path / "out", {})
    suffixes = {p.suffix for p in saved.rglob("*") if p.is_file()}
    assert ".safetensors" in suffixes and not suffixes & {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
    DDPMPipeline.from_pretrained(saved, use_safetensors=True)


# ============================================================================ app defaults
def test_app_defaults_bind_to_this_machine_cap_uploads_and_serve_only_outputs(monkeypatch, tmp_path):
    import app

    for variable in ("RETRACK_APP_HOST", "RETRACK_APP_OUTPUT", "RETRACK_APP_PORT"):
        monkeypatch.delenv(variable, raising=False)
    settings, host, port = app.settings_from_args([])
    assert host == "127.0.0.1" and port == 7860
    assert settings.max_file_size == "20mb"
    assert settings.output_dir == (Path.cwd() / "outputs" / "app").absolute()
    settings, host, _ = app.settings_from_args(["--host", "0.0.0.0", "--output-dir", str(tmp_path)])
    assert host == "0.0.0.0" and settings.output_dir == tmp_path  # only when the user asks


def test_app_folders_and_auth_options(monkeypatch, tmp_path):
    import app

    for variable in ("RETRACK_APP_FOLDERS", "RETRACK_APP_AUTH"):
        monkeypatch.delenv(variable, raising=False)
    settings, _, _ = app.settings_from_args([])
    assert settings.folders == () and settings.auth is None  # by default: any folder, no login
    settings, _, _ = app.settings_from_args(["--folders", str(tmp_path / "models"), str(tmp_path / "data"),
                                             "--auth", "teacher:s3cret:with-colon"])
    assert settings.folders == (tmp_path / "models", tmp_path / "data")
    assert settings.auth == ("teacher", "s3cret:with-colon")
    monkeypatch.setenv("RETRACK_APP_FOLDERS", os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    assert app.settings_from_args([])[0].folders == (tmp_path / "a", tmp_path / "b")
    for bad in ("teacher", "teacher:", ":pw"):
        with pytest.raises(SystemExit):
            app.settings_from_args(["--auth", bad])


def test_app_folders_refuse_what_lies_outside_them(tmp_path):
    import app

    root, outside = tmp_path / "allowed", tmp_path / "private"
    (root / "model").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)  # a link out of the root does not count as inside it
    settings = app.AppSettings(model=str(paths.BUILTIN_MODEL), output_dir=tmp_path / "out", folders=(root,))
    settings.check_folders(str(root / "model"), "")
    settings.check_folders(str(paths.BUILTIN_MODEL), str(tmp_path / "out" / "generations" / "x"))  # start-up model, outputs
    for spec, data in ((str(outside), ""), (str(root / "model"), str(outside)), (str(root / "escape"), ""),
                       (str(root / ".." / "private"), ""), ("someone/some-ddpm", ""), ("/etc", "")):
        with pytest.raises(ValueError, match="opens folders under .* only"):
            settings.check_folders(spec, data)
    app.AppSettings(model="m").check_folders("/etc", "/")  # no roots given: anything goes (the default)


def test_app_with_folders_and_login_on_a_real_server(tiny_app_model, tmp_path):
    """Started with --folders and --auth: a visitor without the password is refused; with it, the
    page opens the allowed model and refuses a folder elsewhere with a message."""
    from gradio_client import Client

    import app

    model, data = tiny_app_model
    settings = app.AppSettings(model=str(model), data=str(data), output_dir=tmp_path / "out", quick=True,
                               folders=(model.parent,), auth=("teacher", "s3cret"))
    served, url, _ = app.launch(settings, port=free_port(), block=False)
    try:
        with pytest.raises(Exception, match="credentials were not provided"):
            Client(url, verbose=False)
        with pytest.raises(ValueError, match="Could not login"):
            Client(url, auth=("teacher", "wrong"), verbose=False)
        visitor = Client(url, auth=("teacher", "s3cret"), verbose=False)
        assert "pixel" in visitor.predict(str(model), str(data), api_name="/load_model")[0]
        refused = visitor.predict(str(model), str(tmp_path), api_name="/load_model")[0]
        assert refused.startswith("⚠") and "opens folders under" in refused
    finally:
        served.get_blocks().close()  # this server only (the module's other server keeps running)
