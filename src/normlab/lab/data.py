"""Datasets for the lab, read from local files only: Fashion-MNIST (idx), CIFAR-10 (python
batches) and seeded Gaussian data for the deep linear network."""

from __future__ import annotations

import functools
import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR_DIRNAME = "cifar-10-batches-py"
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = "test_batch"

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DataError(RuntimeError):
    """A dataset is missing or its files are not what they claim to be."""


@dataclass
class Dataset:
    """Tensors of one dataset, already normalized: images ``(N, C, H, W)`` float32, labels int64."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    def to(self, device: torch.device | str) -> "Dataset":
        return Dataset(self.name, self.train_x.to(device), self.train_y.to(device),
                       self.test_x.to(device), self.test_y.to(device), self.num_classes)

    def only(self, classes: list[int]) -> "Dataset":
        """The images of ``classes`` only (labels and ``num_classes`` kept: transfer between class sets)."""
        keep_train = torch.isin(self.train_y, torch.tensor(classes, device=self.train_y.device))
        keep_test = torch.isin(self.test_y, torch.tensor(classes, device=self.test_y.device))
        return Dataset(self.name, self.train_x[keep_train], self.train_y[keep_train],
                       self.test_x[keep_test], self.test_y[keep_test], self.num_classes)


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (gzipped or not) and check its magic number and declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an idx file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path} is not an idx file (type code 0x{code:02x}, {ndim} dimensions)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path} declares shape {shape} ({expected} bytes of data) but holds {len(raw) - header} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def check_data_dir(data_dir: Path | None) -> None:
    """A folder the user named must exist: a typo must not quietly train on the default data instead."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(
            f"--data-dir {data_dir} is not a folder. Pass the folder that holds the Fashion-MNIST idx files "
            f"or CIFAR-10's python batches, or leave --data-dir out to use {DEFAULT_FASHION_DIR}."
        )


def fashion_dir_candidates(data_dir: Path | None) -> list[Path]:
    """Where Fashion-MNIST is looked for: ``data_dir`` (and its ``fashion-mnist`` folder); Debian's
    location when no ``data_dir`` is given, or when it holds CIFAR-10 (whose lab runs use it, while the
    runs made for Fashion-MNIST still find theirs)."""
    if data_dir is None:
        return [DEFAULT_FASHION_DIR]
    dirs = [Path(data_dir), Path(data_dir) / "fashion-mnist"]
    if locate_cifar(data_dir) is not None:
        dirs.append(DEFAULT_FASHION_DIR)
    return dirs


def missing_fashion_message(searched: list[Path]) -> str:
    where = ", ".join(str(d) for d in searched)
    return (
        f"Fashion-MNIST not found (looked in {where}). Install it with "
        f"`sudo apt-get install {FASHION_PACKAGE}`, or pass --data-dir DIR pointing at a folder that holds "
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte "
        "(gzipped or not)."
    )


def locate_fashion(data_dir: Path | None) -> Path:
    check_data_dir(data_dir)
    searched = fashion_dir_candidates(data_dir)
    for directory in searched:
        if all(_find_idx(directory, stem) for stem in FASHION_FILES.values()):
            return directory
    raise DataError(missing_fashion_message(searched))


def locate_cifar(data_dir: Path | None) -> Path | None:
    """The folder holding CIFAR-10's python batches under ``data_dir``, or None."""
    if data_dir is None:
        return None
    for directory in (Path(data_dir), Path(data_dir) / CIFAR_DIRNAME):
        if all((directory / name).is_file() for name in CIFAR_TRAIN + [CIFAR_TEST]):
            return directory
    return None


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    train_t = torch.from_numpy(train.astype(np.float32) / 255.0)
    test_t = torch.from_numpy(test.astype(np.float32) / 255.0)
    dims = [0, 2, 3]
    mean = train_t.mean(dim=dims, keepdim=True)
    std = train_t.std(dim=dims, keepdim=True)
    return (train_t - mean) / std, (test_t - mean) / std


@functools.lru_cache(maxsize=4)
def _load_fashion_cached(directory: str) -> Dataset:
    d = Path(directory)
    arrays = {key: read_idx(_find_idx(d, stem)) for key, stem in FASHION_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"Fashion-MNIST {split} files in {d} disagree: images {images.shape}, labels {labels.shape}"
            )
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise DataError(f"Fashion-MNIST {split} labels in {d} fall outside 0..9")
    train_x, test_x = _standardize(arrays["train_images"][:, None], arrays["test_images"][:, None])
    return Dataset(
        "fashion-mnist",
        train_x,
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        test_x,
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        10,
    )


def load_fashion(data_dir: Path | None = None) -> Dataset:
    """Fashion-MNIST as ``(N, 1, 28, 28)`` standardized images."""
    return _load_fashion_cached(str(locate_fashion(data_dir)))


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {exc}") from exc
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a CIFAR-10 python batch (no data/labels)") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise DataError(f"{path} has data {data.shape} and labels {labels.shape}, expected (N, 3072) and (N,)")
    return data.reshape(-1, 3, 32, 32), labels


@functools.lru_cache(maxsize=2)
def _load_cifar_cached(directory: str) -> Dataset:
    d = Path(directory)
    parts = [_read_cifar_batch(d / name) for name in CIFAR_TRAIN]
    test_data, test_labels = _read_cifar_batch(d / CIFAR_TEST)
    train_x, test_x = _standardize(np.concatenate([p[0] for p in parts]), test_data)
    train_y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return Dataset("cifar10", train_x, train_y, test_x, torch.from_numpy(test_labels), 10)


def load_cifar10(data_dir: Path) -> Dataset:
    """CIFAR-10 from its python batches (data_batch_1..5, test_batch) as ``(N, 3, 32, 32)``."""
    directory = locate_cifar(data_dir)
    if directory is None:
        raise DataError(
            f"CIFAR-10 python batches not found in {data_dir}: expected {', '.join(CIFAR_TRAIN)} and "
            f"{CIFAR_TEST} there or in its {CIFAR_DIRNAME} folder (pass it with --data-dir)."
        )
    return _load_cifar_cached(str(directory))


def load_images(name: str, data_dir: Path | None, n_train: int | None, n_test: int | None,
                size: int | None, seed: int) -> Dataset:
    """A (sub)set of an image dataset. ``n_train``/``n_test`` pick a seeded random subset,
    ``size`` resizes the images (area interpolation) to ``size x size``."""
    if name == "fashion-mnist":
        full = load_fashion(data_dir)
    elif name == "cifar10":
        full = load_cifar10(data_dir)
    else:
        raise ValueError(f"unknown image dataset {name!r}")
    gen = torch.Generator().manual_seed(seed)

    def subset(x: torch.Tensor, y: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if n is not None and n < len(y):
            idx = torch.randperm(len(y), generator=gen)[:n]
            x, y = x[idx], y[idx]
        if size is not None and x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="area")
        return x.contiguous(), y

    train_x, train_y = subset(full.train_x, full.train_y, n_train)
    test_x, test_y = subset(full.test_x, full.test_y, n_test)
    return Dataset(full.name, train_x, train_y, test_x, test_y, full.num_classes)


def gaussian_regression(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The deep-linear-network task of Santurkar et al.: ``x ~ N(0, I)``, ``A ~ N(0, 1)`` entrywise,
    ``y = A x``. Returns ``(x, y, A)`` with ``x, y`` of shape ``(n, dim)``."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen)
    x = torch.randn(n, dim, generator=gen)
    return x, x @ a.T, a


def batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless index batches: a fresh seeded permutation each epoch, the last partial batch dropped
    (every batch has exactly ``batch_size`` items, so batch statistics are comparable)."""
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} exceeds the {n} training examples")
    while True:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start:start + batch_size]


def class_batches(labels: torch.Tensor, batch_size: int, group: int, classes: int, gen: torch.Generator):
    """Endless non-i.i.d. index batches: each consecutive ``group`` of a batch holds ``classes`` classes
    drawn at random, ``group // classes`` random examples of each (Ioffe 2017's "16 labels x 2 images"
    scaled down). Batch statistics over such a group see a few classes only; the population sees all."""
    if batch_size % group or group % classes:
        raise ValueError(f"the batch ({batch_size}) must be whole groups ({group}) of whole classes ({classes})")
    labels = labels.cpu()
    num_classes = int(labels.max()) + 1
    if classes > num_classes:
        raise ValueError(f"{classes} classes per group, but the data has {num_classes}")
    members = [torch.nonzero(labels == c).squeeze(1) for c in range(num_classes)]
    per_class = group // classes
    while True:
        picks = []
        for _ in range(batch_size // group):
            for c in torch.randperm(num_classes, generator=gen)[:classes].tolist():
                pool = members[c]
                picks.append(pool[torch.randint(len(pool), (per_class,), generator=gen)])
        yield torch.cat(picks)
