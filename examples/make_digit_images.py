"""Write the digits splits (calibration/digits-{calib,eval}.npz) as folders of PNG files.

For each split, image i with label k becomes ``calibration/digits-images/<split>/<k>/<i:03d>.png``:
an 8x8, 8-bit grayscale PNG whose pixel is ``round(value * 16) * 15`` (scikit-learn's 0..16 values
mapped exactly onto 0..240). An `images` dataset with ``mode: L``, ``scale: 1/240``, ``mean: [0]``,
``std: [1]``, ``layout: NCHW`` and ``labels_from_folders: true`` reads them back to exactly the npz
arrays (in the order sorted by label, then index).

The PNGs carry no metadata (no timestamps, no text or resolution chunks) and are written with zlib
level 0 (stored blocks), so their bytes do not depend on the zlib build: rerunning this script
reproduces identical files. Existing PNGs in the output folders are removed first.

Usage: python examples/make_digit_images.py
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from optimize.files import write_bytes  # atomic: temp file + fsync + rename

HERE = Path(__file__).resolve().parent
CALIBRATION = HERE.parent / "calibration"
OUT = CALIBRATION / "digits-images"
SPLITS = {"calib": CALIBRATION / "digits-calib.npz", "eval": CALIBRATION / "digits-eval.npz"}


def png_bytes(pixels: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of `pixels` (uint8, H x W), without metadata and deterministic."""
    buf = io.BytesIO()
    assert pixels.dtype == np.uint8 and pixels.ndim == 2
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=0)  # uint8 (H, W): mode L
    return buf.getvalue()


def to_pixels(image: np.ndarray) -> np.ndarray:
    """(1, 8, 8) float32 values v/16 (v in 0..16) -> (8, 8) uint8 pixels v*15 (0..240)."""
    v = np.rint(image[0].astype(np.float64) * 16)
    assert np.abs(image[0] * 16 - v).max() == 0 and v.min() >= 0 and v.max() <= 16, "not a 0..16 / 16 digit"
    return (v * 15).astype(np.uint8)


def write_split(npz: Path, folder: Path) -> int:
    with np.load(npz, allow_pickle=False) as z:
        images, labels = z["image"], z["label"]
    for old in folder.glob("*/*.png"):
        old.unlink()
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        write_bytes(folder / str(int(label)) / f"{i:03d}.png", png_bytes(to_pixels(image)))
    return len(images)


def main() -> None:
    for split, npz in SPLITS.items():
        n = write_split(npz, OUT / split)
        print(f"{OUT / split}: {n} PNG files from {npz.name}")


if __name__ == "__main__":
    main()
