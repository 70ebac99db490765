import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    """Write ``array`` (uint8) in the idx format: magic 0x0000 08 <ndim>, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)
    return path


def tiny_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 28x28 images: class c lights up a 6x6 patch at a class-dependent place."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        r, col = 2 + 8 * (c // 4), 2 + 6 * (c % 4)
        images[i, r:r + 6, col:col + 6] = 220
    return images, labels


@pytest.fixture(scope="session")
def tiny_fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Fashion-MNIST look-alike in the real idx format (images gzipped, labels raw)."""
    d = tmp_path_factory.mktemp("fashion")
    train_x, train_y = tiny_images(320, 0)
    test_x, test_y = tiny_images(160, 1)
    write_idx(d / "train-images-idx3-ubyte", train_x, compress=True)
    write_idx(d / "train-labels-idx1-ubyte", train_y, compress=False)
    write_idx(d / "t10k-images-idx3-ubyte", test_x, compress=True)
    write_idx(d / "t10k-labels-idx1-ubyte", test_y, compress=False)
    return d


@pytest.fixture
def idx_writer():
    return write_idx
