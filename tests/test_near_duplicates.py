"""Near-duplicates of the forget images leave the retain set (retrack.near_duplicates, through
`forget_set.build_forget_set` and `retrack unlearn`).

On the built-in data: a T-shirt uploaded at 90 % brightness (or shifted by a pixel) lists and
leaves out the training set's 50 T-shirt copies and no digit; keeping them works; a digit picked
to forget does not drag in other digits. On small synthetic sets: a near-duplicate group inside
the training data is found whole, too few images are not searched, and every bad file of a batch
upload is named while the good ones are kept. The app's side is in test_app.py and
test_browser.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrack import paths
from retrack.forget_set import build_forget_set, load_uploads
from retrack.images import ImageError
from retrack.models import ModelInfo, TrainingData, load_builtin_training_data, own_scorer
from retrack.near_duplicates import MIN_CALIBRATION_ITEMS, NearDuplicateIndex

needs_builtin = pytest.mark.skipif(not (paths.BUILTIN_MODEL / "model_index.json").is_file()
                                   or own_scorer(paths.BUILTIN_MODEL) is None,
                                   reason="the built-in model and its CLIP scorer are not built")


@pytest.fixture(scope="module")
def builtin_model() -> ModelInfo:
    """The built-in model as `models.open_model` describes it, without loading its network."""
    data = load_builtin_training_data(json.loads(paths.BUILTIN_DATASET.read_text()))
    return ModelInfo(spec=str(paths.BUILTIN_MODEL), path=paths.BUILTIN_MODEL, family="pixel", image_size=28,
                     channels=1, preset="mnist", training_data=data, scorer=str(own_scorer(paths.BUILTIN_MODEL)))


def tshirt(model: ModelInfo) -> np.ndarray:
    """The built-in T-shirt as float (28, 28) in 0..255."""
    data = model.training_data
    return data.images[data.names.index("t-shirt"), ..., 0].astype(np.float64)


def save(pixels: np.ndarray, path: Path) -> str:
    Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8)).save(path)
    return str(path)


def names_of(model: ModelInfo, indices) -> set[str]:
    return {model.training_data.names[int(i)] for i in indices}


@needs_builtin
def test_a_dimmed_tshirt_upload_lists_and_excludes_the_50_copies_and_keeping_them_works(builtin_model, tmp_path):
    upload = save(tshirt(builtin_model) * 0.9, tmp_path / "dim-tshirt.png")
    forget = build_forget_set(builtin_model, [], [upload])
    found = forget.near_duplicates
    assert len(forget) == 1 and len(found.items) == 50 and names_of(builtin_model, found.indices) == {"t-shirt"}
    assert all(item.found_by == ("pixel", "clip") and item.pixel_l2 < 2 and item.clip_similarity > 0.99
               for item in found.items)
    assert len(forget.retain_index) == 5000 and names_of(builtin_model, forget.retain_index) == \
        {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    assert any("50 near-duplicate(s)" in note and "left out of the retain set" in note for note in forget.notes)

    kept = build_forget_set(builtin_model, [], [upload], keep_near_duplicates=True)
    assert kept.near_duplicates_kept and len(kept.near_duplicates.items) == 50 and len(kept.retain_index) == 5050
    assert any("kept in the retain set" in note for note in kept.notes)


@needs_builtin
@pytest.mark.parametrize("shift", [(0, 1), (1, 0), (1, 1)])
def test_a_shifted_tshirt_finds_the_copies_and_no_digit(builtin_model, tmp_path, shift):
    upload = save(np.roll(tshirt(builtin_model), shift, axis=(0, 1)), tmp_path / "shifted.png")
    found = build_forget_set(builtin_model, [], [upload]).near_duplicates
    assert len(found.items) == 50 and names_of(builtin_model, found.indices) == {"t-shirt"}


@needs_builtin
def test_clip_finds_what_pixels_miss(builtin_model, tmp_path):
    """A T-shirt at half brightness lies 9.4 from the T-shirt in pixels, almost as far as the
    nearest digit: only the CLIP measure finds it."""
    upload = save(tshirt(builtin_model) * 0.5, tmp_path / "half.png")
    assert build_forget_set(builtin_model, [], [upload], clip=False).near_duplicates.items == []
    found = build_forget_set(builtin_model, [], [upload]).near_duplicates
    assert len(found.items) == 50 and {item.found_by for item in found.items} == {("clip",)}


@needs_builtin
def test_the_gaps_are_calibrated_on_the_training_data(builtin_model):
    """γ, the 99 % quantile of the training items' own second-to-first neighbour distance ratios:
    the values the module's docstring reports."""
    gaps = build_forget_set(builtin_model, [0]).near_duplicates.gaps
    assert gaps["pixel"] == pytest.approx(1.44, abs=0.01) and gaps["clip"] == pytest.approx(1.52, abs=0.01)


@needs_builtin
def test_a_digit_does_not_drag_in_other_digits(builtin_model, tmp_path):
    data = builtin_model.training_data
    digits = np.flatnonzero(np.array(data.names) != "t-shirt")
    picks = np.random.default_rng(0).choice(digits, 20, replace=False)
    flagged = [len(build_forget_set(builtin_model, [int(pick)]).near_duplicates.items) for pick in picks]
    assert max(flagged) <= 2 and sum(flagged) <= 3, flagged
    # A dimmed copy of a digit finds that digit, and at most one other.
    original = int(picks[0])
    upload = save(data.images[original, ..., 0] * 0.9, tmp_path / "dim-digit.png")
    found = build_forget_set(builtin_model, [], [upload]).near_duplicates
    assert original in found.indices and len(found.items) <= 2


def test_a_near_duplicate_group_in_the_training_data_is_found_whole():
    """Training data holding an image at 100 % and 95 % brightness (five copies each) among 300
    others: an upload at 90 % finds all ten, though each version is the other's nearest item; an
    unrelated upload finds nothing."""
    rng = np.random.default_rng(0)
    others = rng.integers(0, 256, (300, 8, 8, 1)).astype(np.uint8)
    base = rng.integers(60, 256, (8, 8, 1)).astype(np.float64)
    versions = [np.round(base * level).astype(np.uint8) for level in (1.0, 0.95)]
    images = np.concatenate([others, np.repeat(versions[0][None], 5, 0), np.repeat(versions[1][None], 5, 0)])
    index = NearDuplicateIndex(images, cache_dir=None)
    found = index.search(np.round(base * 0.9).astype(np.uint8)[None])
    assert sorted(found.indices.tolist()) == list(range(300, 310)) and len(found.identical) == 0
    assert len(found.distinct()) == 2 and {copies for _, copies in found.distinct()} == {5}
    assert index.search(np.full((1, 8, 8, 1), 128, np.uint8)).items == []
    exact = index.search(versions[0][None])  # the exact copies are identical, the 95 % ones near
    assert exact.identical.tolist() == list(range(300, 305)) and exact.indices.tolist() == list(range(305, 310))


def test_too_few_training_images_are_not_searched_and_say_so():
    images = np.random.default_rng(0).integers(0, 256, (MIN_CALIBRATION_ITEMS - 1, 4, 4, 1)).astype(np.uint8)
    found = NearDuplicateIndex(images, cache_dir=None).search(images[:1])
    assert found.items == [] and found.identical.tolist() == [0] and "not searched" in found.notes[0]


def test_every_bad_file_of_a_batch_upload_is_named_and_the_good_ones_kept(tmp_path):
    rng = np.random.default_rng(0)
    model = ModelInfo(spec="toy", path=tmp_path, family="pixel", image_size=8, channels=1, preset="mnist",
                      training_data=TrainingData(rng.integers(0, 256, (12, 8, 8, 1)).astype(np.uint8),
                                                 [f"item{i}" for i in range(12)], "toy"), scorer="builtin")
    good = [save(rng.integers(0, 256, (8, 8)), tmp_path / "good.png"),
            save(rng.integers(0, 256, (20, 30)), tmp_path / "wide.png")]
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(Path(good[1]).read_bytes()[:60])
    bad = [str(tmp_path / name) for name in ("notes.txt", "empty.png", "cut.png")]
    images, names, notes, refused = load_uploads([bad[0], good[0], bad[1], good[1], bad[2]], model)
    assert names == ["good.png", "wide.png"] and images.shape == (2, 8, 8, 1) and "centre-cropped" in notes[0]
    assert [reason.split(":")[0] for reason in refused] == ["notes.txt", "empty.png", "cut.png"]
    forget = build_forget_set(model, [3], [*bad, *good])
    assert forget.sources == ["#3 item3", "good.png", "wide.png"] and len(forget.refused) == 3
    with pytest.raises(ImageError) as error:
        build_forget_set(model, [], bad)
    assert all(name in str(error.value) for name in ("notes.txt", "empty.png", "cut.png"))


def test_cli_leaves_out_near_duplicates_and_keeps_them_when_asked(tiny_pixel_model, tmp_path, capsys):
    from retrack.cli import main

    rng = np.random.default_rng(1)
    forget, retain = tmp_path / "forget", tmp_path / "retain"
    forget.mkdir(), retain.mkdir()
    secret = rng.integers(60, 256, (8, 8)).astype(np.float64)
    save(secret, forget / "secret.png")
    for i in range(300):  # random images, so that a near-duplicate group is a rare thing, as γ assumes
        save(rng.integers(0, 256, (8, 8)), retain / f"other{i:03d}.png")
    save(secret * 0.9, retain / "dim.png")
    save(np.roll(secret, 1, axis=1) * 0.5 + secret * 0.5, retain / "blurred.png")
    args = ["unlearn", "--model", str(tiny_pixel_model), "--forget", str(forget), "--retain", str(retain),
            "--k", "3", "--steps", "1", "--batch", "2", "--device", "cpu"]

    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "1 forget / 300 retain items" in err, err
    left_out = next(line for line in err.splitlines() if "left out of the retain set (keep them" in line)
    assert "2 near-duplicate(s)" in left_out and "dim.png" in left_out and "blurred.png" in left_out

    assert main([*args, "--keep-near-duplicates", "--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "1 forget / 302 retain items" in err and "kept in the retain set (--keep-near-duplicates)" in err


def test_a_scorer_that_cannot_be_loaded_leaves_the_pixel_search(tmp_path):
    broken = tmp_path / "clip"
    broken.mkdir()
    (broken / "open_clip_config.json").write_text("{}")  # no weights beside it
    images = np.random.default_rng(0).integers(0, 256, (MIN_CALIBRATION_ITEMS, 4, 4, 1)).astype(np.uint8)
    model = ModelInfo(spec="toy", path=tmp_path, family="pixel", image_size=4, channels=1, preset="mnist",
                      training_data=TrainingData(images, [f"item{i}" for i in range(len(images))], "toy"),
                      scorer=str(broken))
    forget = build_forget_set(model, [0])
    assert list(forget.near_duplicates.gaps) == ["pixel"] and len(forget.retain_index) == len(images) - 1
