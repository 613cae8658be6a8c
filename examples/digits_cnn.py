"""A tiny CNN for the scikit-learn ``load_digits`` images (8x8 handwritten digits).

The model takes an input named ``image``: float32 tensor of shape (N, 1, 8, 8)
with pixel values scaled to [0, 1] (scikit-learn's 0..16 values divided by 16),
and returns logits of shape (N, 10).

Weights (``digits_cnn.pt``, a state_dict) and the calibration/evaluation splits
(``../calibration/digits-calib.npz`` and ``../calibration/digits-eval.npz``) are
produced by ``train_digits.py`` in this directory. Importing this module does not
train anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
DEFAULT_WEIGHTS = HERE / "digits_cnn.pt"
EVAL_NPZ = HERE.parent / "calibration" / "digits-eval.npz"
CALIB_NPZ = HERE.parent / "calibration" / "digits-calib.npz"


class DigitsCNN(nn.Module):
    """conv(1->16) + ReLU, conv(16->32) + ReLU, maxpool 2, linear(512->64) + ReLU, linear(64->10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)
        self.relu = nn.ReLU()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(image))
        x = self.relu(self.conv2(x))
        x = self.pool(x)
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        return self.fc2(x)


def load_split(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a digits npz split; returns (image float32 (N,1,8,8) in [0,1], label int64 (N,))."""
    with np.load(path) as data:
        image = torch.from_numpy(np.ascontiguousarray(data["image"], dtype=np.float32))
        label = torch.from_numpy(np.ascontiguousarray(data["label"], dtype=np.int64))
    return image, label


def build(weights: str | None = None) -> tuple[DigitsCNN, dict[str, torch.Tensor]]:
    """Build the trained digits CNN and example inputs.

    Args:
        weights: path to a state_dict file. If None, ``digits_cnn.pt`` next to
            this module is used.

    Returns:
        ``(model, example_inputs)``: ``model`` is a :class:`DigitsCNN` in eval
        mode with the weights loaded (on CPU); ``example_inputs`` is
        ``{"image": tensor}`` with the first 2 images of the evaluation split
        (``../calibration/digits-eval.npz`` relative to this module), float32,
        shape (2, 1, 8, 8), values in [0, 1].
    """
    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    model = DigitsCNN()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    image, _ = load_split(EVAL_NPZ)
    example_inputs = {"image": image[:2].clone()}
    return model, example_inputs


def top1_accuracy(outputs: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """Task metric for the recipe: fraction of images whose arg-max logit is the true label."""
    return float((outputs["logits"].argmax(axis=-1) == labels).mean())
