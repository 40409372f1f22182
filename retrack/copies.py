"""When a sample counts as a copy of a forget image: the one definition, per measure.

Every reader of "is this sample a copy?" (the evaluation's rates, the live noise-and-denoise
curve, the app, the Stable Diffusion tools, the benchmarks and model cards) calls these; the
thresholds themselves are chosen once per forget set (`evaluation.Reference.build`).

* pixel L2 (pixels in [0, 1]): a copy strictly below the threshold (the paper's L2 < 10);
* CLIP: a copy at or above the similarity threshold (`metrics.calibrate_threshold` puts it
  between the forget images' own band and the closest retain image);
* classifier: a copy when the probability of the forget class exceeds `CLASSIFIER_THRESHOLD`.

    flags = pixel_copies(evaluation.l2, reference.l2_threshold)
    copy_rate(flags)   # the share of copies, 0 for no samples
"""

from __future__ import annotations

import numpy as np

# The paper's MNIST criterion: a sample is a T-shirt copy when its pixel-L2 distance to the
# T-shirt (28x28, pixels in [0, 1]) is below 10. On real MNIST digits (setting v2) the nearest
# digit lies at 10.6, so it separates; on setting v1's fat digits it does not.
PAPER_L2_THRESHOLD = 10.0
# The classifier's own decision: the forget class is more probable than all other classes together.
CLASSIFIER_THRESHOLD = 0.5


def pixel_copies(l2_distances: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean (N,): the sample lies within pixel-L2 `threshold` of a forget image (its distance
    to the nearest one, `metrics.nearest_l2_distances`, below the threshold)."""
    return np.asarray(l2_distances) < threshold


def clip_copies(similarities: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean (N,): the sample's highest CLIP cosine similarity to a forget image
    (`metrics.max_cosine_similarity`) is at or above `threshold`."""
    return np.asarray(similarities) >= threshold


def classifier_copies(forget_probabilities: np.ndarray, threshold: float = CLASSIFIER_THRESHOLD) -> np.ndarray:
    """Boolean (N,): the classifier's probability of the forget class exceeds `threshold`. Unlike a
    pixel distance, this also counts blurred copies and ghosts of the forget image, which a
    classifier trained with blurred and faded T-shirts assigns to the T-shirt class."""
    return np.asarray(forget_probabilities) > threshold


def copy_rate(flags: np.ndarray) -> float:
    """The share of copies among the samples; 0 when there are none."""
    flags = np.asarray(flags)
    return float(flags.mean()) if flags.size else 0.0
