"""Train DigitsCNN on scikit-learn's bundled digits and write weights + data splits.

Deterministic (seed 0, single thread, deterministic algorithms). The 1797 images of
``sklearn.datasets.load_digits`` are split with ``np.random.RandomState(0).permutation``:
the first 300 indices are the calibration split, the next 300 the evaluation
split, the remaining 1197 the training split (three disjoint parts).

Writes, relative to this script:
    digits_cnn.pt                       state_dict of the trained model
    ../calibration/digits-calib.npz     keys image (float32 N x 1 x 8 x 8, /16), label (int64 N)
    ../calibration/digits-eval.npz      same layout

Usage: python examples/train_digits.py
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from digits_cnn import DigitsCNN  # noqa: E402

SEED = 0
N_CALIB = 300
N_EVAL = 300
EPOCHS = 15
BATCH_SIZE = 32
LR = 1e-3


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed .npz (readable by np.load) with fixed zip timestamps, so bytes are reproducible."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def split_indices(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.RandomState(SEED).permutation(n)
    calib = perm[:N_CALIB]
    evaluation = perm[N_CALIB : N_CALIB + N_EVAL]
    train = perm[N_CALIB + N_EVAL :]
    return train, calib, evaluation


def main() -> None:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]  # (1797, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    train_idx, calib_idx, eval_idx = split_indices(len(labels))
    assert not (set(train_idx) & set(calib_idx) or set(train_idx) & set(eval_idx) or set(calib_idx) & set(eval_idx))

    x_train = torch.from_numpy(images[train_idx])
    y_train = torch.from_numpy(labels[train_idx])
    x_eval = torch.from_numpy(images[eval_idx])
    y_eval = torch.from_numpy(labels[eval_idx])

    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(SEED)

    start = time.perf_counter()
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(y_train), generator=gen)
        total = 0.0
        for i in range(0, len(order), BATCH_SIZE):
            idx = order[i : i + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1:2d}/{EPOCHS} train loss {total / len(order):.4f}")
    train_time = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        acc = (model(x_eval).argmax(dim=1) == y_eval).float().mean().item()
    print(f"train time: {train_time:.2f} s (train={len(train_idx)}, calib={len(calib_idx)}, eval={len(eval_idx)})")
    print(f"eval top-1 accuracy: {acc:.4f}")

    weights = io.BytesIO()
    torch.save(model.state_dict(), weights)
    _atomic_write_bytes(HERE / "digits_cnn.pt", weights.getvalue())
    calib_dir = HERE.parent / "calibration"
    _atomic_write_bytes(
        calib_dir / "digits-calib.npz", _npz_bytes({"image": images[calib_idx], "label": labels[calib_idx]})
    )
    _atomic_write_bytes(
        calib_dir / "digits-eval.npz", _npz_bytes({"image": images[eval_idx], "label": labels[eval_idx]})
    )
    print("wrote", HERE / "digits_cnn.pt", calib_dir / "digits-calib.npz", calib_dir / "digits-eval.npz")


if __name__ == "__main__":
    main()
