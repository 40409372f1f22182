"""`retrack bench --curves`: every method evaluated at checkpoints of one continued run, and the
time-to-oracle reading of the curves."""

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from retrack.backends import load_backend
from retrack.builtin import builtin_reference, builtin_sets
from retrack.cli import main
from retrack.curves import CurveSettings, curves_table, reaches, run_curves, time_to_both, time_to_oracle
from retrack.engine import UnlearnConfig, unlearn
from retrack.evaluation import OracleLevels, evaluate
from retrack.paths import BUILTIN_MODEL


def test_quick_curves_continue_one_run_per_method(tmp_path, capsys):
    out = tmp_path / "curves"
    assert main(["bench", "--curves", "--quick", "--methods", "siss,retrack", "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads((out / "curves.json").read_text())
    assert list(data["methods"]) == ["siss", "retrack"]
    for method, points in data["methods"].items():
        assert [p["step"] for p in points] == [0, 1, 2]
        assert points[0] == data["pretrained"]  # the same start for every method
        seconds = [p["seconds"] for p in points]
        assert seconds[0] == 0 and 0 < seconds[1] < seconds[2]
        cpu = [p["cpu_seconds"] for p in points]
        assert cpu[0] == 0 and 0 < cpu[1] < cpu[2]
        for key, n in (("paper", 8), ("ddim", 6)):  # both samplers at every checkpoint, with counts and intervals
            last = points[-1]["by_sampler"][key]
            assert last["samples"] == n
            assert set(last["rates"]) == {"l2", "clip", "classifier"} == set(last["excess"]) == set(last["intervals"])
            assert {"clip_fd", "confident_digit_rate", "classifier_fd"} <= set(last["quality"])
    assert OracleLevels.from_dict(data["oracle"]["paper"]).n_samples == 8
    assert OracleLevels.from_dict(data["oracle"]["ddim"]).n_samples == 6
    assert OracleLevels.from_dict(data["oracle_confirming"]).n_samples == 12
    assert data["meta"]["command"].startswith("python -m retrack bench --curves --methods siss,retrack --checkpoints 0,1,2")
    table = (out / "curves.md").read_text()
    assert "| retrack |" in table and "ReTrack / SISS" in table and "DDIM" in table
    plot = Image.open(out / "curves.png")
    assert plot.size[0] > 800 and np.asarray(plot).std() > 0
    # The pictures behind the numbers: per method and sampler one row of nearest samples per
    # checkpoint after 0 (all 8 or 6 samples: the quick setting has fewer than 16), the oracle's
    # and the pretrained model's apart.
    for key in ("paper", "ddim"):
        rows = {name: Image.open(out / f"curves-nearest-{name}-{key}.png") for name in ("start", "siss", "retrack")}
        assert rows["retrack"].size == rows["siss"].size == rows["start"].size  # two rows each
        assert rows["retrack"].size[0] > 2 * rows["retrack"].size[1]

    # Evaluating inside the run does not change it: step 2 of the curve is a 2-step run's model.
    backend = load_backend(BUILTIN_MODEL, device="cpu")
    forget, retain = builtin_sets()
    unlearn(backend, forget, retain, UnlearnConfig.preset("mnist", method="retrack", steps=2, batch_size=8, seed=0,
                                                          device="cpu"))
    settings = CurveSettings.quick()
    straight = evaluate(backend, settings.samplers()["paper"], builtin_reference("cpu", reference_size=64))
    last = data["methods"]["retrack"][-1]["by_sampler"]["paper"]
    assert last["rates"] == straight.rates()
    assert last["quality"]["classifier_fd"] == pytest.approx(straight.quality_figures["classifier_fd"], rel=1e-6)
    assert last["quality"]["clip_fd"] == pytest.approx(straight.quality_figures["clip_fd"], rel=1e-6)

    # A stopped run resumes: methods already measured with the same settings are kept, not redone,
    # and written with the new ones, also when they come last.
    capsys.readouterr()
    data["methods"]["siss"][-1]["seconds"] = 123.0  # a mark only a kept curve carries
    del data["methods"]["retrack"]
    (out / "curves.json").write_text(json.dumps(data))
    assert main(["bench", "--curves", "--quick", "--methods", "retrack,siss", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "siss: kept" in printed and "start: kept" in printed  # nor are the oracle and the pretrained model redrawn
    resumed = json.loads((out / "curves.json").read_text())["methods"]
    assert list(resumed) == ["retrack", "siss"] and resumed["siss"][-1]["seconds"] == 123.0

    # Later checkpoints extend the stored curves: the start and the stored points are kept (the
    # training is redone from the same seed), only the new checkpoint is measured, and its grids
    # are named by it.
    assert main(["bench", "--curves", "--quick", "--methods", "retrack,siss", "--checkpoints", "0,1,2,3",
                 "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "start: kept" in printed and "siss step 2: kept" in printed and "retrack step 1: kept" in printed
    extended = json.loads((out / "curves.json").read_text())
    assert extended["meta"]["settings"]["checkpoints"] == [0, 1, 2, 3]
    for method in ("retrack", "siss"):
        assert [p["step"] for p in extended["methods"][method]] == [0, 1, 2, 3]
        assert extended["methods"][method][:3] == resumed[method]
    assert extended["methods"]["siss"][2]["seconds"] == 123.0
    assert (out / "curves-nearest-siss-paper-from-3.png").is_file()

    # A missing checkpoint before stored ones is measured by retraining only as far as it: the
    # points after it are kept, and the retrained step measures as the first training did.
    step_2 = extended["methods"]["retrack"].pop(2)
    extended["methods"]["retrack"][-1]["seconds"] = 456.0  # step 3, a mark only a kept point carries
    (out / "curves.json").write_text(json.dumps(extended))
    assert main(["bench", "--curves", "--quick", "--methods", "retrack,siss", "--checkpoints", "0,1,2,3",
                 "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "retrack step 3: kept (not retrained)" in printed and "siss: kept" in printed
    filled = json.loads((out / "curves.json").read_text())["methods"]["retrack"]
    assert [p["step"] for p in filled] == [0, 1, 2, 3] and filled[3]["seconds"] == 456.0
    assert filled[2]["by_sampler"]["paper"]["rates"] == step_2["by_sampler"]["paper"]["rates"]
    assert (out / "curves-nearest-retrack-paper-from-2.png").is_file()

    # A run stopped part-way keeps in its file the stored curves of the methods it had not reached.
    def stop_at_siss(line: str) -> None:
        if line.startswith("siss"):
            raise KeyboardInterrupt

    settings = replace(CurveSettings.quick(), methods=("retrack", "siss"), checkpoints=(0, 1, 2, 3, 4), device="cpu")
    with pytest.raises(KeyboardInterrupt):
        run_curves(settings, out, log=stop_at_siss)
    stopped = json.loads((out / "curves.json").read_text())["methods"]
    assert [p["step"] for p in stopped["retrack"]] == [0, 1, 2, 3, 4]
    assert [p["step"] for p in stopped["siss"]] == [0, 1, 2, 3] and stopped["siss"][2]["seconds"] == 123.0

    assert main(["bench", "--curves", "--quick", "--checkpoints", "2,1", "--out", str(out)]) == 2
    assert "increasing order" in capsys.readouterr().err
    assert main(["bench", "--curves", "--checkpoints", "ten", "--out", str(out)]) == 2
    assert "comma-separated step counts" in capsys.readouterr().err


def test_time_to_oracle_needs_no_excess_and_quality_in_range_under_each_sampler():
    oracle = {key: {"rates": {"l2": 0.0}, "quality": {"classifier_fd": 1.0}} for key in ("paper", "ddim")}

    def at(step, seconds, excess_l2, excess_classifier, fd, ddim_excess=0.05, confirmed=None):
        def reading(l2, classifier):
            return {"samples": 8, "rates": {"l2": l2 + 0.01}, "excess": {"l2": l2, "classifier": classifier},
                    "quality": {"classifier_fd": fd}}
        return {"step": step, "seconds": seconds, "by_sampler": {"paper": reading(excess_l2, excess_classifier),
                                                                 "ddim": reading(ddim_excess, ddim_excess)},
                "confirmed": confirmed}

    points = [at(0, 0.0, 0.04, 0.05, 2.0), at(10, 5.0, 0.0, 0.01, 1.5), at(25, 12.0, -0.01, 0.0, 2.5),
              at(50, 30.0, -0.01, -0.01, 1.9), at(75, 40.0, -0.01, -0.01, 1.9, ddim_excess=0.0)]
    pretrained = points[0]
    # Step 10: the classifier still sees copies; step 25: quality (2.5) worse than both (max 2.0); step 50 passes
    # the paper's sampler, but DDIM only from step 75, which is when it is forgotten.
    assert time_to_oracle(points, oracle, pretrained) == {"step": 50, "seconds": 30.0, "cpu_seconds": None,
                                                          "confirmed_on": None}
    assert time_to_oracle(points, oracle, pretrained, "ddim")["step"] == 75
    assert time_to_both(points, oracle, pretrained)["step"] == 75
    assert time_to_oracle(points[:3], oracle, pretrained) is None
    # A checkpoint that more samples do not confirm does not count.
    failed = at(50, 30.0, -0.01, -0.01, 1.9, confirmed={"samples": 50, "at_oracle_level": False})
    assert time_to_oracle([points[0], failed, points[4]], oracle, pretrained)["step"] == 75
    data = {"meta": {"settings": {"batch_size": 8, "checkpoints": [0, 10, 25, 50, 75], "samples": 8,
                                  "confirm_samples": 50},
                     "samplers": {"paper": "DDPM", "ddim": "DDIM"}, "device": "CPU", "total_seconds": 1,
                     "load_average_at_start": 0.5},
            "oracle": oracle, "pretrained": pretrained, "methods": {"siss": points[:3], "retrack": points}}
    table = curves_table(data)
    assert "| retrack | 50 (30.0 s) | – | 25 (12.0 s) | 75 (40.0 s) | 75 (40.0 s) |" in table
    assert "| siss | never | – | 25 (12.0 s) | never | never |" in table
    # the T-shirt measures alone: step 25 has no excess, only its quality (2.5) is out of range
    assert time_to_oracle(points, oracle, pretrained, quality=False)["step"] == 25
    assert "ReTrack 30.0 s, SISS never" in table
    # More copies than the oracle beyond sampling error fail the check even with no excess at its 1 % quantile
    # (12 faint T-shirts in 50,000 against the oracle's 1: the 50,000-sample benchmark).
    oracle_50k = {key: {**levels, "rates": {"l2": 1 / 50000}, "n_samples": 50000} for key, levels in oracle.items()}
    tail = at(50, 30.0, -0.01, -0.01, 1.9)
    tail["by_sampler"]["paper"].update(samples=50000, counts={"l2": 12})
    assert not reaches(tail, oracle_50k["paper"], pretrained, "paper")
    assert not reaches(tail, oracle_50k["paper"], pretrained, "paper", quality=False)
    tail["by_sampler"]["paper"]["counts"] = {"l2": 3}  # within sampling error of 1 in 50,000
    assert reaches(tail, oracle_50k["paper"], pretrained, "paper")
    data["methods"]["siss"] = [points[0], at(100, 60.0, -0.02, -0.02, 1.0)]
    assert "ratio ReTrack / SISS = 0.50" in curves_table(data)
    # points measured in several runs (under different loads) are flagged: compare steps, not seconds
    assert "different loads" not in curves_table(data)
    data["meta"]["measured_in"] = [{"steps": [0, 10]}, {"steps": [25, 50, 75]}]
    assert "come from 2 runs under different loads" in curves_table(data)
