"""The project's digit + T-shirt classifier: the class itself on a tiny random network, and the
shipped one in assets/builtin/classifier on real held-out digits and on blurred T-shirt copies."""

import numpy as np
import pytest
import torch
from torchvision.transforms.v2.functional import gaussian_blur

from retrack import paths
from retrack.classifier import DigitClassifier, DigitTshirtNet
from retrack.data import TSHIRT_LABEL, classifier_held_out, draw_tshirt, mnist_digits

TINY = {"channels": [4], "feature_dim": 8, "num_classes": 11, "dropout": 0.0}


def test_tiny_classifier_round_trip_and_input_forms(tmp_path):
    torch.manual_seed(0)
    classifier = DigitClassifier(DigitTshirtNet(**TINY), dict(TINY))
    classifier.save(tmp_path)
    loaded = DigitClassifier.load(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    as_tensor = torch.from_numpy(images).float().div(127.5).sub(1.0).unsqueeze(1)  # a sampler's [-1, 1] form
    probs = loaded.probabilities(images)
    assert probs.shape == (5, 11) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(probs, classifier.probabilities(images), atol=1e-6)
    assert np.allclose(loaded.probabilities(as_tensor, batch_size=2), probs, atol=1e-5)
    assert loaded.features(images).shape == (5, 8)
    with pytest.raises(ValueError, match="28x28 grey"):
        loaded.probabilities(np.zeros((2, 32, 32), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        DigitClassifier.load(tmp_path / "missing")


shipped = pytest.mark.skipif(not (paths.BUILTIN_CLASSIFIER / "model.safetensors").is_file(),
                             reason="assets/builtin/classifier is not built")


@shipped
def test_shipped_classifier_is_accurate_on_held_out_real_digits():
    images, labels = mnist_digits()
    held_out = classifier_held_out(labels)
    probs = DigitClassifier.load("builtin").probabilities(images[held_out])
    assert (probs.argmax(axis=1) == labels[held_out]).mean() >= 0.98


@shipped
def test_shipped_classifier_ranks_the_tshirt_above_every_digit_also_when_blurred():
    classifier = DigitClassifier.load("builtin")
    tshirt = torch.from_numpy(draw_tshirt().astype(np.float32) / 255.0)[None, None]
    copies = torch.cat([tshirt] + [gaussian_blur(tshirt, kernel_size=[9, 9], sigma=[s, s]) for s in (0.5, 1.0, 1.5, 2.0)])
    copy_probs = classifier.probabilities(copies * 2 - 1)
    assert (copy_probs.argmax(axis=1) == TSHIRT_LABEL).all()
    images, labels = mnist_digits()
    digit_probs = classifier.probabilities(images[classifier_held_out(labels)])
    assert copy_probs[:, TSHIRT_LABEL].min() > digit_probs[:, TSHIRT_LABEL].max()
    assert copy_probs[:, TSHIRT_LABEL].min() > 0.5
