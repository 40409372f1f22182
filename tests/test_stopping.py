"""Stop when forgotten (`retrack.stopping`, `retrack unlearn --until-forgotten`): the engine stops
where `until` says, the check passes for the oracle against itself and names what is missing for
the pretrained model, and the CLI records every check in retrack.json."""

import json

import pytest

from retrack.backends import load_backend
from retrack.builtin import builtin_reference, builtin_sets
from retrack.cli import main
from retrack.engine import UnlearnConfig, unlearn
from retrack.paths import BUILTIN_MODEL, BUILTIN_ORACLE
from retrack.stopping import UntilForgotten


@pytest.fixture(scope="module")
def reference():
    return builtin_reference("cpu", reference_size=64)


def test_the_engine_stops_where_until_says():
    backend = load_backend(BUILTIN_MODEL)
    forget, retain = builtin_sets()
    config = UnlearnConfig.preset("mnist", steps=5, batch_size=4, device="cpu")
    result = unlearn(backend, forget, retain, config, until=lambda event: event.step == 2)
    assert [e.step for e in result.events] == [1, 2] and result.metadata()["steps_done"] == 2


class Step:  # the two fields a check reads of a reports.StepEvent
    def __init__(self, step, steps=10, seconds=1.0):
        self.step, self.steps, self.seconds = step, steps, seconds


def test_the_oracle_is_at_its_own_level_and_the_pretrained_model_is_not(reference):
    oracle = load_backend(BUILTIN_ORACLE)
    same = UntilForgotten(load_backend(BUILTIN_ORACLE), reference, oracle, every=5, samples=8, sample_steps=4)
    assert not same(Step(3))  # not a check step: nothing measured
    assert same.checks == []
    assert same(Step(5)) and same.checks[0].forgotten and same.checks[0].waiting_for == []

    pretrained = UntilForgotten(load_backend(BUILTIN_MODEL), reference, oracle, every=5, samples=8, sample_steps=4)
    check = pretrained.check(Step(5))
    # The model that memorised the T-shirt brings its noisy copies back closer than the oracle does.
    assert not check.forgotten
    assert any("come back closer" in reason for reason in check.waiting_for)
    assert all(check.returns[t]["distance"] < pretrained.level.returns[t].distance for t in check.returns)
    record = pretrained.record()
    assert record["stopped_at_step"] is None and record["level"] == "the oracle's return of the forget images"


def test_without_an_oracle_the_level_is_the_retain_images_return(reference):
    check = UntilForgotten(load_backend(BUILTIN_MODEL), reference, None, samples=8, sample_steps=4)
    assert check.level.oracle_rates == {} and check.level.returns_of.endswith("4 retain images")
    assert not check.check(Step(10)).forgotten  # the memorised T-shirt comes back closer than digits do


def test_cli_until_forgotten_records_each_check(tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["unlearn", "--model", "builtin", "--steps", "2", "--batch", "4", "--until-forgotten",
                 "--check-every", "1", "--check-samples", "4", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "retrack.json").read_text())["until_forgotten"]
    assert [c["step"] for c in record["checks"]] == [1, 2]
    assert record["stopped_at_step"] is None and "not forgotten within 2 steps" in printed
    assert main(["unlearn", "--model", "builtin", "--until-forgotten", "--check-every", "0", "--out",
                 str(tmp_path / "other")]) == 2
    assert "every >= 1" in capsys.readouterr().err


def test_app_job_with_stop_when_forgotten_records_where_it_stopped(tiny_app_model, tmp_path):
    """The app's switch: the job checks at its live points, stops at the first that passes (or
    runs to the cap), says which in its last message and records every check in retrack.json."""
    from retrack.job_settings import EvalSettings
    from retrack.forget_set import build_forget_set
    from retrack.jobs import Job
    from retrack.models import open_model

    model = open_model(*map(str, tiny_app_model))
    evaluation = EvalSettings(n_samples=2, sampling_steps=2, trajectory_points=2, live_every=1, live_samples=2,
                              deterministic=False, until_forgotten=True)
    job = Job(model, build_forget_set(model, [0, 1]), UnlearnConfig(k=3, steps=3, batch_size=4), evaluation,
              tmp_path / "app-output").start()
    for _ in job.watch(timeout=300):
        pass
    state = job.snapshot()
    assert state.phase == "done", state.message
    info = json.loads((state.model_dir / "retrack.json").read_text())
    record = info["until_forgotten"]
    assert record["level"].endswith("retain images")  # the tiny model has no oracle
    steps = [check["step"] for check in record["checks"]]
    assert steps == list(range(1, info["steps_done"] + 1))  # a check at every live point, until the stop
    if record["stopped_at_step"] is None:
        assert info["steps_done"] == 3 and "not forgotten within 3 steps" in state.message
    else:
        assert record["stopped_at_step"] == info["steps_done"] and "forgotten at step" in state.message
    with pytest.raises(ValueError, match="live curve"):
        EvalSettings(until_forgotten=True, live_every=0).validate()
