"""The project's digit + T-shirt classifier: a small CNN that measures the built-in setting.

It sorts 28x28 grey images into the ten digits and the T-shirt (class 10, ``data.TSHIRT_LABEL``),
as the paper's MNIST evaluation does with its own classifier. retrack uses it for

* a second T-shirt rate that also counts blurred copies and T-shirt-shaped ghosts
  (``copies.classifier_copies``: probability of the T-shirt above 0.5), and
* the paper's quality measures on its features: the Inception Score over the ten digit classes
  (``metrics.digit_inception_score``) and the Fréchet distance to real digits
  (``metrics.frechet_distance`` on ``DigitClassifier.features``).

It is trained by ``scripts/train_classifier.py`` on real MNIST digits (with augmentation, and
blurred / faded / shifted T-shirts) and ships in ``assets/builtin/classifier`` as
``config.json`` + ``model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import paths
from .loading import MODEL_LOADING
from .images import to_unit_nchw

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DEFAULT_CONFIG: dict = {"channels": [32, 64], "feature_dim": 128, "num_classes": 11, "dropout": 0.3}


class DigitTshirtNet(nn.Module):
    """Two blocks of two 3x3 convolutions (each block ends in a 2x2 max-pool), a feature layer
    of ``feature_dim`` units and a linear head over ``num_classes``. Input: (N, 1, 28, 28) in [0, 1].
    """

    def __init__(self, channels: list[int], feature_dim: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width_in = 1
        for width in channels:
            layers += [nn.Conv2d(width_in, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            width_in = width
        side = 28 // 2 ** len(channels)
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(width_in * side * side, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images01))


class DigitClassifier:
    """A trained ``DigitTshirtNet`` in evaluation mode, taking any image form retrack uses:
    uint8 arrays (N, 28, 28), or float tensors (N, 1, 28, 28) in [-1, 1] as samplers return.
    """

    def __init__(self, net: DigitTshirtNet, config: dict, device: torch.device | str = "cpu") -> None:
        self.net = net.to(device).eval()
        self.config = config
        self.device = torch.device(device)

    @classmethod
    def load(cls, folder: str | Path = "builtin", device: torch.device | str = "cpu") -> "DigitClassifier":
        """Load from a folder holding config.json + model.safetensors ("builtin": the shipped one)."""
        folder = paths.BUILTIN_CLASSIFIER if str(folder) == "builtin" else Path(folder)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{folder} holds no classifier ({CONFIG_NAME} + {WEIGHTS_NAME}); "
                                    "build it with `python scripts/train_classifier.py`")
        config = json.loads((folder / CONFIG_NAME).read_text())
        with MODEL_LOADING:
            net = DigitTshirtNet(**{key: config[key] for key in DEFAULT_CONFIG})
        net.load_state_dict(load_file(folder / WEIGHTS_NAME))
        return cls(net, config, device)

    def save(self, folder: Path, extra_config: dict | None = None) -> None:
        """Write config.json + model.safetensors into an existing folder."""
        save_file({k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}, folder / WEIGHTS_NAME)
        (folder / CONFIG_NAME).write_text(json.dumps({**self.config, **(extra_config or {})}, indent=2) + "\n")

    def _batches(self, images, batch_size: int):
        unit = to_unit_nchw(images)
        if unit.shape[1] != 1 or tuple(unit.shape[2:]) != (28, 28):
            raise ValueError(f"the classifier takes 28x28 grey images, got shape {tuple(unit.shape)}")
        with torch.no_grad():
            for start in range(0, len(unit), batch_size):
                yield unit[start:start + batch_size].to(self.device)

    def probabilities(self, images, batch_size: int = 500) -> np.ndarray:
        """(N, 11) class probabilities: the ten digits, then the T-shirt."""
        return np.concatenate([torch.softmax(self.net(batch), dim=1).cpu().numpy()
                               for batch in self._batches(images, batch_size)])

    def features(self, images, batch_size: int = 500) -> np.ndarray:
        """(N, feature_dim) activations of the feature layer, for Fréchet distances."""
        return np.concatenate([self.net.body(batch).cpu().numpy() for batch in self._batches(images, batch_size)])
