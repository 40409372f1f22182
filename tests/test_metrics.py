"""Metrics against closed forms, and the CLIP scorer on a tiny random open_clip model."""

import numpy as np
import pytest
import torch

from retrack import paths
from retrack.copies import PAPER_L2_THRESHOLD, classifier_copies, clip_copies, copy_rate, pixel_copies
from retrack.metrics import (ClipScorer, calibrate_threshold, calibrated_l2_threshold, class_shares, confident_digit_rate,
                             digit_inception_score, distance_quantiles, frechet_distance, inception_style_score,
                             max_cosine_similarity, memorisation_scores, nearest_l2_distances, save_open_clip_folder)

# Small enough to build in a fraction of a second; the full CLIP vocabulary keeps the real tokenizer.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 8))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    # Same covariance, shifted mean: the trace term vanishes and FD = ‖μa − μb‖² exactly.
    shift = np.array([1.0, -2.0, 0.5, 0, 0, 0, 0, 3.0])
    assert frechet_distance(feats, feats + shift) == pytest.approx((shift ** 2).sum(), rel=1e-6)
    # Isotropic Gaussians of scales a and b in D dims: FD → D (a − b)² for many samples.
    wide = np.random.default_rng(1).normal(size=(20000, 4)) * 2.0
    narrow = np.random.default_rng(2).normal(size=(20000, 4))
    assert frechet_distance(wide, narrow) == pytest.approx(4 * (2.0 - 1.0) ** 2, rel=0.05)


def test_frechet_distance_of_diagonal_gaussians_is_exact():
    # Samples whitened to mean exactly 0 and covariance exactly I, then scaled and shifted: their
    # fitted Gaussians are N(μ, diag(σ²)) exactly, and FD = ‖μa − μb‖² + Σ (σa − σb)².
    noise = np.random.default_rng(0).normal(size=(500, 4))
    noise -= noise.mean(axis=0)
    noise = noise @ np.linalg.inv(np.linalg.cholesky(np.cov(noise, rowvar=False))).T
    mean_a, sigma_a = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 2.0, 0.5, 3.0])
    mean_b, sigma_b = np.array([1.0, 1.0, 0.0, -0.5]), np.array([2.0, 0.5, 0.5, 1.0])
    expected = ((mean_a - mean_b) ** 2).sum() + ((sigma_a - sigma_b) ** 2).sum()
    assert frechet_distance(mean_a + noise * sigma_a, mean_b + noise[::-1] * sigma_b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_fewer_samples_than_dimensions():
    rng = np.random.default_rng(0)
    distance = frechet_distance(rng.normal(size=(5, 64)), rng.normal(size=(7, 64)))
    assert np.isfinite(distance) and distance > 0
    with pytest.raises(ValueError, match="two samples"):
        frechet_distance(rng.normal(size=(1, 4)), rng.normal(size=(3, 4)))


def test_inception_style_score_and_histogram():
    uniform = np.full((50, 10), 0.1)
    assert inception_style_score(uniform) == pytest.approx(1.0)
    one_hot = np.eye(10)[np.arange(50) % 10]  # confident and evenly spread
    assert inception_style_score(one_hot) == pytest.approx(10.0, rel=1e-6)
    one_class = np.eye(10)[np.zeros(50, dtype=int)]  # confident but all the same
    assert inception_style_score(one_class) == pytest.approx(1.0)
    histogram = class_shares(np.eye(3)[[0, 0, 1, 2]])
    assert histogram.tolist() == [0.5, 0.25, 0.25]


def test_frechet_distance_of_a_scaled_set():
    # b = 2a: mean 2μ, covariance 4Σ, (Σ·4Σ)^½ = 2Σ, so FD = ‖μ‖² + tr(Σ)(1 + 4 − 4) = ‖μ‖² + tr(Σ).
    feats = np.random.default_rng(1).normal(loc=0.5, size=(300, 6))
    expected = (feats.mean(axis=0) ** 2).sum() + np.trace(np.cov(feats, rowvar=False))
    assert frechet_distance(feats, 2 * feats) == pytest.approx(expected, rel=1e-9)


def test_classifier_measures_on_hand_built_probabilities():
    # Eleven classes: ten digits and the T-shirt (index 10).
    uniform_digits = np.hstack([np.full((40, 10), 0.1), np.zeros((40, 1))])
    assert digit_inception_score(uniform_digits) == pytest.approx(1.0)
    one_hot_digits = np.eye(11)[np.arange(40) % 10]
    assert digit_inception_score(one_hot_digits) == pytest.approx(10.0, rel=1e-6)
    # The T-shirt share is dropped and the digits renormalised: 0.5 on one digit + 0.5 T-shirt
    # counts as that digit with certainty.
    half_tshirt = 0.5 * np.eye(11)[np.arange(40) % 10] + 0.5 * np.eye(11)[np.full(40, 10)]
    assert digit_inception_score(half_tshirt) == pytest.approx(10.0, rel=1e-6)

    probs = np.array([[0.95] + [0.0] * 9 + [0.05],   # a confident zero
                      [0.6, 0.3] + [0.0] * 8 + [0.1],  # a hesitant zero
                      [0.0] * 10 + [1.0],              # a T-shirt
                      [0.45] + [0.0] * 9 + [0.55]])    # a ghost: barely over the T-shirt threshold
    assert copy_rate(classifier_copies(probs[:, 10])) == pytest.approx(0.5)
    assert copy_rate(classifier_copies(probs[:, 10], threshold=0.6)) == pytest.approx(0.25)
    assert confident_digit_rate(probs) == pytest.approx(0.25)
    assert confident_digit_rate(probs, threshold=0.6) == pytest.approx(0.5)


def test_memorisation_on_hand_built_features():
    forget = np.array([[1.0, 0.0, 0.0]])
    samples = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    scores = max_cosine_similarity(samples, forget)
    assert scores == pytest.approx([1.0, 0.0, np.sqrt(0.5)], abs=1e-6)
    assert copy_rate(clip_copies(scores, 0.9)) == pytest.approx(1 / 3)
    assert copy_rate(clip_copies(np.array([]), 0.5)) == 0.0

    # Forget copies are identical (band 1.0); the closest retain image has cosine 0.6.
    retain = np.array([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    assert calibrate_threshold(np.repeat(forget, 3, axis=0), retain) == pytest.approx(0.8)
    with pytest.warns(UserWarning, match="does not separate"):
        calibrate_threshold(forget, np.array([[1.0, 0.0, 0.0]]))


def test_pixel_l2_criterion():
    forget = np.zeros((1, 4, 4))
    forget[0, :2] = 1.0  # 8 bright pixels
    retain = np.zeros((3, 4, 4))  # all black: distance sqrt(8) to the forget image
    retain[1, 3, 3] = 1.0
    assert nearest_l2_distances(forget, retain)[0] == pytest.approx(np.sqrt(8))
    threshold = calibrated_l2_threshold(forget, retain)
    assert threshold == pytest.approx(np.sqrt(8) / 2)
    samples = np.stack([forget[0], forget[0] * 0.9, retain[0]])  # a copy, a dimmed copy, a retain image
    assert pixel_copies(nearest_l2_distances(samples, forget), threshold).tolist() == [True, True, False]


def test_paper_l2_rate_and_distance_quantiles():
    tshirt = np.zeros((1, 28, 28))
    tshirt[0, :, :16] = 1.0  # 448 bright pixels: an all-black image lies at sqrt(448) = 21.2
    samples = np.stack([tshirt[0], tshirt[0] * 0.6, np.zeros((28, 28)), tshirt[0] * 0.5])
    # Distances: 0, 0.4 sqrt(448) = 8.47 (< 10), 21.17, 0.5 sqrt(448) = 10.58 (>= 10).
    distances = nearest_l2_distances(samples, tshirt)
    assert copy_rate(pixel_copies(distances, PAPER_L2_THRESHOLD)) == pytest.approx(0.5)
    assert copy_rate(pixel_copies(distances, 11.0)) == pytest.approx(0.75)
    quantiles = distance_quantiles(nearest_l2_distances(samples, tshirt), (0.0, 1.0))
    assert quantiles == pytest.approx({"0.0": 0.0, "1.0": np.sqrt(448)})


@pytest.fixture(scope="module")
def tiny_scorer(tmp_path_factory):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    folder = save_open_clip_folder(model, TINY_CLIP_CONFIG, tmp_path_factory.mktemp("clip") / "tiny",
                                   preprocess_cfg={"mean": [0.5] * 3, "std": [0.5] * 3})
    return ClipScorer.load(str(folder), device="cpu")


def test_tiny_clip_scorer_features(tiny_scorer):
    assert tiny_scorer.image_size == 32
    as_tensor = tiny_scorer.image_features(torch.rand(3, 1, 28, 28) * 2 - 1)
    as_uint8 = tiny_scorer.image_features(np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8))
    text = tiny_scorer.text_features(["a t-shirt", "a handwritten digit seven"])
    assert as_tensor.shape == (3, 32) and as_uint8.shape == (2, 32) and text.shape == (2, 32)
    for feats in (as_tensor, as_uint8, text):
        assert torch.allclose(feats.norm(dim=1), torch.ones(len(feats)), atol=1e-5)

    grey = torch.rand(2, 1, 28, 28) * 2 - 1  # grey as 1 channel or replicated to RGB: same features
    assert torch.allclose(tiny_scorer.image_features(grey), tiny_scorer.image_features(grey.repeat(1, 3, 1, 1)),
                          atol=1e-5)
    probs = tiny_scorer.zero_shot(grey, ["t-shirt", "seven", "eight"])
    assert probs.shape == (2, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    scores = memorisation_scores(tiny_scorer, grey, grey[:1])
    assert scores.shape == (2,) and scores[0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.skipif(not (paths.BUILTIN_CLIP / "open_clip_config.json").is_file(),
                    reason="the built-in CLIP scorer is not built")
def test_builtin_clip_counts_degraded_tshirt_copies_and_no_digit():
    """The app's CLIP memorisation score, at the threshold the evaluation calibrates: the T-shirt
    and its noisy, blurred and grey-background copies (what unlearning leaves, see the benchmark's
    nearest-sample grids) count; none of 500 held-out real digits does, clean or noisy."""
    from torchvision.transforms.v2.functional import gaussian_blur

    from retrack.data import CLASS_NAMES, classifier_held_out, draw_tshirt, mnist_digits
    from retrack.builtin import builtin_reference

    rng = np.random.default_rng(0)

    def noisy(images01: np.ndarray, sigma: float, background: float = 0.0) -> np.ndarray:
        lifted = images01 + background * (1 - images01)
        return np.clip(lifted + sigma * rng.standard_normal(images01.shape), 0, 1)

    tshirt = draw_tshirt().astype(np.float64) / 255.0
    blurred = [gaussian_blur(torch.from_numpy(tshirt)[None, None], kernel_size=[9, 9], sigma=[s, s])[0, 0].numpy()
               for s in (1.0, 1.5)]
    copies = np.stack([tshirt, *blurred, noisy(tshirt, 0.2), noisy(tshirt, 0.3), noisy(tshirt, 0.2, background=0.25)])
    images, labels = mnist_digits()
    held_out = classifier_held_out(labels)
    digits = images[held_out].astype(np.float64) / 255.0
    digits = np.concatenate([digits, noisy(digits, 0.2)])

    scorer = ClipScorer.load("builtin", device="cpu")
    threshold = builtin_reference("cpu").clip_threshold
    as_uint8 = lambda x: np.round(x * 255).astype(np.uint8)  # noqa: E731
    copy_scores = memorisation_scores(scorer, as_uint8(copies), draw_tshirt()[None])
    digit_scores = memorisation_scores(scorer, as_uint8(digits), draw_tshirt()[None])
    assert copy_scores.min() >= threshold > digit_scores.max()
    probs = scorer.zero_shot(images[held_out], list(CLASS_NAMES))
    assert (probs.argmax(axis=1) == labels[held_out]).mean() > 0.9


def test_wilson_interval_against_closed_forms():
    """The 95 % Wilson interval: at 0 of n its upper end is z^2 / (n + z^2) (the "rule of three"
    region, 0.38 % at n = 1,000); it contains the rate, stays in [0, 1] and narrows with n."""
    from retrack.metrics import wilson_interval

    z2 = 1.96 ** 2
    assert wilson_interval(0, 1000) == (0.0, pytest.approx(z2 / (1000 + z2)))
    assert wilson_interval(1000, 1000) == (pytest.approx(1000 / (1000 + z2)), 1.0)
    low, high = wilson_interval(35, 5000)
    assert low < 0.007 < high and high - low < wilson_interval(7, 1000)[1] - wilson_interval(7, 1000)[0]
    # p = 1/2, n = 100: centre 1/2, half-width z sqrt(1/400 + z^2/40000) / (1 + z^2/100)
    half = 1.96 * (1 / 400 + z2 / 40000) ** 0.5 / (1 + z2 / 100)
    assert wilson_interval(50, 100) == (pytest.approx(0.5 - half), pytest.approx(0.5 + half))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
