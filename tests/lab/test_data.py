import pickle

import numpy as np
import pytest
import torch

from normlab.lab import data


def test_idx_roundtrip_gzipped_and_raw(tmp_path, idx_writer):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = idx_writer(tmp_path / "a-idx3-ubyte", arr, compress=False)
    gz = idx_writer(tmp_path / "b-idx3-ubyte", arr, compress=True)
    np.testing.assert_array_equal(data.read_idx(raw), arr)
    np.testing.assert_array_equal(data.read_idx(gz), arr)


def test_idx_bad_magic(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(data.DataError, match="magic"):
        data.read_idx(bad)


def test_idx_size_mismatch(tmp_path, idx_writer):
    path = idx_writer(tmp_path / "x", np.zeros((4, 5), dtype=np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(data.DataError, match=r"declares shape \(4, 5\)"):
        data.read_idx(path)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(data.DataError, match="cannot read"):
        data.read_idx(path)


def test_missing_data_names_package_and_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEFAULT_FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(data.DataError) as err:
        data.load_fashion(tmp_path)
    message = str(err.value)
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message


def test_a_data_dir_that_is_missing_or_holds_no_dataset_is_an_error(tmp_path, tiny_fashion):
    """A typo in --data-dir must not quietly train on Debian's Fashion-MNIST instead."""
    from normlab.lab.spec import Setup

    with pytest.raises(data.DataError, match="is not a folder"):
        data.load_fashion(tmp_path / "typo")
    with pytest.raises(data.DataError, match="is not a folder"):
        Setup.create("smoke", tmp_path / "typo", 0, "cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataError, match="Fashion-MNIST not found") as err:
        Setup.create("smoke", empty, 0, "cpu")
    assert str(data.DEFAULT_FASHION_DIR) not in str(err.value).split("(looked in")[1].split(")")[0]
    assert Setup.create("smoke", tiny_fashion, 0, "cpu").images == "fashion-mnist"


def test_a_cifar_data_dir_still_finds_fashion_mnist_for_the_runs_made_for_it(tmp_path, monkeypatch, tiny_fashion):
    monkeypatch.setattr(data, "DEFAULT_FASHION_DIR", tiny_fashion)
    for i in range(1, 6):
        _cifar_batch(tmp_path / f"data_batch_{i}", 4, i)
    _cifar_batch(tmp_path / "test_batch", 3, 0)
    assert data.locate_fashion(tmp_path) == tiny_fashion


def test_fashion_loader_shapes_and_labels(tiny_fashion):
    ds = data.load_images("fashion-mnist", tiny_fashion, n_train=100, n_test=None, size=16, seed=0)
    assert ds.train_x.shape == (100, 1, 16, 16) and ds.test_x.shape == (160, 1, 16, 16)
    assert ds.train_y.dtype == torch.int64 and int(ds.train_y.max()) <= 9
    full = data.load_fashion(tiny_fashion)
    assert abs(float(full.train_x.mean())) < 1e-4 and abs(float(full.train_x.std()) - 1) < 1e-3


def test_fashion_mismatched_counts(tmp_path, idx_writer):
    idx_writer(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 28, 28), np.uint8), compress=False)
    idx_writer(tmp_path / "train-labels-idx1-ubyte", np.zeros((4,), np.uint8), compress=False)
    idx_writer(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8), compress=False)
    idx_writer(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((2,), np.uint8), compress=False)
    with pytest.raises(data.DataError, match="disagree"):
        data.load_fashion(tmp_path)


def _cifar_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    payload = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
               b"labels": [int(v) for v in rng.integers(0, 10, size=n)]}
    with open(path, "wb") as fh:
        pickle.dump(payload, fh)


def test_cifar_loader(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i in range(1, 6):
        _cifar_batch(d / f"data_batch_{i}", 4, i)
    _cifar_batch(d / "test_batch", 3, 0)
    assert data.locate_cifar(tmp_path) == d
    ds = data.load_cifar10(tmp_path)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_y.shape == (3,)


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(data.DataError, match="--data-dir"):
        data.load_cifar10(tmp_path)
    for name in data.CIFAR_TRAIN + [data.CIFAR_TEST]:
        (tmp_path / name).write_bytes(b"garbage")
    with pytest.raises(data.DataError, match="cannot read CIFAR-10 batch"):
        data.load_cifar10(tmp_path)


def test_gaussian_regression_is_seeded():
    x1, y1, a1 = data.gaussian_regression(50, 10, seed=3)
    x2, y2, _ = data.gaussian_regression(50, 10, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    torch.testing.assert_close(y1, x1 @ a1.T)


def test_batches_cover_each_epoch():
    gen = torch.Generator().manual_seed(0)
    it = data.batches(10, 3, gen)
    epoch = torch.cat([next(it) for _ in range(3)])
    assert len(set(epoch.tolist())) == 9
