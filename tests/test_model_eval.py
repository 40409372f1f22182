"""`retrack evaluate`: saved models measured under both samplers and read against the oracle."""

import json
import shutil

import pytest
from PIL import Image

from retrack.backends import load_backend
from retrack.cli import main
from retrack.evaluation import DDIM, PAPER, Reference, SamplerSettings, evaluate
from retrack.images import expand_paths, load_images
from retrack.model_eval import verdicts

FEW = ["--samples", "6", "--ddim-samples", "4", "--sample-steps", "3", "--ddim-steps", "3", "--device", "cpu"]


def measured(count: int, n: int, excess: float = 0.0, fd: float = 10.0) -> dict:
    return {"samples": n, "counts": {"l2": count}, "rates": {"l2": count / n}, "excess_over_oracle": {"l2": excess},
            "quality": {"clip_fd": fd}}


def row(name: str, role: str, paper: dict, ddim: dict) -> dict:
    return {"name": name, "role": role, "by_sampler": {PAPER: paper, DDIM: ddim}}


def test_verdicts_read_copies_and_quality_against_the_oracle_and_the_model_before():
    oracle = row("oracle", "oracle", measured(1, 50_000, fd=10.0), measured(0, 1000, fd=20.0))
    before = row("before", "before", measured(500, 50_000, excess=0.01, fd=12.0), measured(40, 1000, 0.04, fd=25.0))
    forgot = row("forgot", "model", measured(1, 50_000, fd=11.0), measured(0, 1000, fd=24.0))
    faint = row("faint", "model", measured(12, 50_000, fd=11.0), measured(0, 1000, fd=24.0))  # 12 vs 1 in 50,000
    blurred = row("blurred", "model", measured(0, 50_000, fd=13.0), measured(0, 1000, fd=24.0))  # FD past 12
    closer = row("closer", "model", measured(1, 50_000, fd=11.0), measured(0, 1000, excess=0.002, fd=24.0))
    said = verdicts([before, forgot, faint, blurred, closer, oracle])
    assert "oracle" not in said  # the yardstick is not judged by itself
    assert said["forgot"] == {PAPER: True, DDIM: True, "both": True, "short": {}}
    assert said["faint"] == {PAPER: False, DDIM: True, "both": False, "short": {PAPER: "copies"}}
    assert said["blurred"][PAPER] is False and said["blurred"]["short"] == {PAPER: "quality"}
    assert said["closer"] == {PAPER: True, DDIM: False, "both": False, "short": {DDIM: "copies"}}
    assert said["before"]["both"] is False
    # without the model before, the oracle's quality alone is the ceiling: 11 > 10 fails
    assert verdicts([forgot, oracle])["forgot"][PAPER] is False
    assert verdicts([before, forgot]) == {}  # no oracle, no verdict


def test_evaluate_before_after_and_oracle_of_a_pixel_model(tiny_pixel_model, image_folders, tmp_path, capsys):
    forget, retain = image_folders
    after = tmp_path / "after"
    assert main(["unlearn", "--model", str(tiny_pixel_model), "--forget", str(forget), "--retain", str(retain),
                 "--k", "3", "--steps", "2", "--batch", "4", "--device", "cpu", "--out", str(after)]) == 0
    oracle = tmp_path / "oracle"
    shutil.copytree(after, oracle)  # any other folder will do as the yardstick here
    out = tmp_path / "report"
    code = main(["evaluate", "--model", str(after), "--before", str(tiny_pixel_model), "--oracle", str(oracle),
                 "--forget", str(forget), "--retain", str(retain), *FEW, "--out", str(out)])
    printed, err = capsys.readouterr()
    assert code == 0
    assert err.count("/6 [") >= 3 and err.count("/4 [") >= 3  # a progress bar per draw (tqdm)
    data = json.loads((out / "evaluation.json").read_text())
    assert [(r["role"], r["path"]) for r in data["rows"]] == [
        ("before", str(tiny_pixel_model)), ("model", str(after)), ("oracle", str(oracle))]
    assert set(data["verdicts"]) == {str(tiny_pixel_model), str(after)}
    for r in data["rows"]:
        assert r["by_sampler"][PAPER]["samples"] == 6 and r["by_sampler"][DDIM]["samples"] == 4
        assert r["by_sampler"][PAPER]["sampler"].startswith("DDPM, 3 steps, seeds 0..5")
        assert r["by_sampler"][DDIM]["sampler"].startswith("DDIM, 3 steps, seeds 0..3")
    # the same measurement as the library's one evaluation, seed for seed
    images = load_images(expand_paths([str(forget)]), 8, 1).tensor
    reference = Reference.build(images, load_images(expand_paths([str(retain)]), 8, 1).tensor)
    direct = evaluate(load_backend(tiny_pixel_model, device="cpu"),
                      SamplerSettings(n_samples=6, steps=3), reference)  # the paper's sampler, 3 steps
    assert data["rows"][0]["by_sampler"][PAPER]["counts"] == direct.counts()
    assert data["meta"]["thresholds"]["l2"] == pytest.approx(reference.l2_threshold)
    for index, role in enumerate(["before", "model", "oracle"]):
        for key in (PAPER, DDIM):
            assert Image.open(out / f"nearest-{index}-{role}-{key}.png").size[0] > 8
    table = (out / "evaluation.md").read_text()
    assert table in printed and f"| {oracle} (oracle) |" in table and "– / – / –" in table
    assert "Quality: not measured (no CLIP scorer" in table  # the tiny model has no scorer beside it
    again = ["evaluate", "--model", str(after), "--forget", str(forget), "--retain", str(retain), *FEW, "--out", str(out)]
    assert main(again) == 2 and "already exists" in capsys.readouterr().err  # refused before any drawing
    assert main([*again, "--overwrite"]) == 0
    assert [r["role"] for r in json.loads((out / "evaluation.json").read_text())["rows"]] == ["model"]
    assert not (out / "nearest-2-oracle-paper.png").exists()  # the folder holds this run's files only


def test_evaluate_the_builtin_model_against_its_oracle_by_default(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["evaluate", "--model", "builtin", *FEW, "--out", str(out)]) == 0
    data = json.loads((out / "evaluation.json").read_text())
    assert [(r["name"], r["role"]) for r in data["rows"]] == [("builtin", "before"), ("builtin oracle", "oracle")]
    assert set(data["rows"][0]["by_sampler"][PAPER]["counts"]) == {"l2", "clip", "classifier"}
    assert "classifier_fd" in data["rows"][0]["by_sampler"][PAPER]["quality"]


@pytest.mark.parametrize("case, message", [
    ("no forget", "--forget and --retain are required"),
    ("copy kept", "retain item(s) are copies of forget items"),
    ("no samples", "samples and sampler steps must be at least 1"),
    ("oracle twice", "a model is named twice"),
])
def test_evaluate_refuses_what_it_cannot_measure(tiny_pixel_model, image_folders, tmp_path, capsys, case, message):
    forget, retain = image_folders
    args = ["evaluate", "--model", str(tiny_pixel_model), *FEW, "--out", str(tmp_path / "report")]
    if case == "copy kept":
        shutil.copy(forget / "secret.png", retain / "secret.png")
        args += ["--forget", str(forget / "secret.png"), "--retain", str(retain)]
    if case == "no samples":
        args += ["--forget", str(forget), "--retain", str(retain), "--samples", "0"]
    if case == "oracle twice":
        args += ["--forget", str(forget), "--retain", str(retain), "--oracle", str(tiny_pixel_model)]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("retrack: error:") and message in err[-1], err
    assert not (tmp_path / "report").exists()
