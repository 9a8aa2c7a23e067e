"""Tests of skmerge.datasets on fake local files (the real data is optional)."""

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from skmerge.datasets import (
    FASHION_MNIST_DEFAULT_ROOT,
    NORMALIZATION,
    available_datasets,
    dataset_info,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    read_idx,
    split_disjoint_classes,
    split_same,
    split_skewed,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run on one intra-op thread: these tiny models gain nothing from more,
    and OpenMP spin-waiting makes them very slow when other processes load
    the cores. Restored afterwards, so other test modules are unaffected."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------
# fake files


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    array = np.asarray(array)
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    raw = header + array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def make_fashion(folder: Path, compress: bool, n_train: int = 12, n_test: int = 5):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress)
        out[split] = (images, labels)
    return out


def make_cifar(folder: Path, n_per_batch: int = 4, hundred: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    if hundred:
        names = ["train", "test"]
    else:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    content = {}
    for name in names:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        if hundred:
            batch = {b"data": data, b"fine_labels": list(rng.integers(0, 100, n_per_batch)),
                     b"coarse_labels": list(rng.integers(0, 20, n_per_batch))}
        else:
            batch = {b"data": data, b"labels": list(rng.integers(0, 10, n_per_batch))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        content[name] = batch
    return content


@pytest.fixture
def no_env(monkeypatch):
    for var in ("SKMERGE_FASHION_MNIST", "SKMERGE_CIFAR10", "SKMERGE_CIFAR100"):
        monkeypatch.delenv(var, raising=False)


# --------------------------------------------------------------------------
# IDX and Fashion-MNIST


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    for arr in (np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
                np.array([1, -5, 70000], dtype=">i4"),
                np.array([[0.5, -1.25]], dtype=">f4")):
        out = read_idx(write_idx(tmp_path / "a", arr, compress))
        np.testing.assert_array_equal(out, arr)
        assert out.flags.writeable and out.dtype.isnative


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    path = write_idx(tmp_path / "short", np.zeros(5, np.uint8), False)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        read_idx(path)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_from_root(tmp_path, no_env, compress):
    raw = make_fashion(tmp_path, compress)
    for split in ("train", "test"):
        images, labels = raw[split]
        ds = load_fashion_mnist(split, root=tmp_path, normalize=False)
        x, y = ds.tensors
        assert isinstance(ds, TensorDataset)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (len(images), 1, 28, 28)
        np.testing.assert_allclose(x[:, 0].numpy(), images / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(y.numpy(), labels)
    x = load_fashion_mnist("train", root=str(tmp_path)).tensors[0]
    (mean,), (std,) = NORMALIZATION["fashion-mnist"]
    np.testing.assert_allclose(x[:, 0].numpy(), (raw["train"][0] / 255.0 - mean) / std,
                               rtol=1e-5, atol=1e-5)


def test_fashion_mnist_env_var_and_parent_folder(tmp_path, no_env, monkeypatch):
    make_fashion(tmp_path / "fashion-mnist", compress=True, n_test=3)
    monkeypatch.setenv("SKMERGE_FASHION_MNIST", str(tmp_path))
    assert len(load_fashion_mnist("test")) == 3
    assert len(load_dataset("Fashion_MNIST", "test")) == 3
    # An explicit root wins over the environment variable.
    with pytest.raises(FileNotFoundError):
        load_fashion_mnist("test", root=tmp_path / "elsewhere")


def test_fashion_mnist_missing_message(tmp_path, no_env):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")  # labels missing
    with pytest.raises(FileNotFoundError) as err:
        load_fashion_mnist("train", root=tmp_path)
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "SKMERGE_FASHION_MNIST" in msg and "root=" in msg
    assert "train-labels-idx1-ubyte" in msg and str(tmp_path) in msg


def test_fashion_mnist_bad_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("valid", root=tmp_path)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DEFAULT_ROOT),
                    reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_test_split(no_env):
    x, y = load_fashion_mnist("test").tensors
    assert x.shape == (10000, 1, 28, 28)
    assert torch.bincount(y).tolist() == [1000] * 10
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05


# --------------------------------------------------------------------------
# CIFAR


@pytest.mark.parametrize("use_parent", [False, True])
def test_cifar10_from_folder_or_parent(tmp_path, no_env, use_parent):
    folder = tmp_path / "cifar-10-batches-py"
    content = make_cifar(folder)
    root = tmp_path if use_parent else folder
    x, y = load_cifar10("train", root=root, normalize=False).tensors
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32
    data = np.concatenate([content[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    labels = np.concatenate([content[f"data_batch_{i}"][b"labels"] for i in range(1, 6)])
    # Row layout: 1024 red, then green, then blue values, each row-major.
    np.testing.assert_allclose(x.numpy() * 255, data.reshape(-1, 3, 32, 32), atol=1e-3)
    np.testing.assert_array_equal(y.numpy(), labels)
    xt = load_cifar10("test", root=root).tensors[0]
    mean, std = (np.array(v)[None, :, None, None] for v in NORMALIZATION["cifar10"])
    expected = (content["test_batch"][b"data"].reshape(-1, 3, 32, 32) / 255 - mean) / std
    np.testing.assert_allclose(xt.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_cifar100_fine_and_coarse(tmp_path, no_env, monkeypatch):
    content = make_cifar(tmp_path / "cifar-100-python", hundred=True)
    monkeypatch.setenv("SKMERGE_CIFAR100", str(tmp_path))
    fine = load_cifar100("test").tensors[1]
    coarse = load_cifar100("test", label="coarse").tensors[1]
    np.testing.assert_array_equal(fine.numpy(), content["test"][b"fine_labels"])
    np.testing.assert_array_equal(coarse.numpy(), content["test"][b"coarse_labels"])
    assert load_dataset("cifar100", "train").tensors[0].shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="coarse"):
        load_cifar100("test", label="super")


class _WritesMarker:
    """Unpickling this object runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _write_genuine_cifar(folder: Path, protocol: int, n: int = 3) -> dict:
    """The layout of the real files: bytes keys, a uint8 array, lists of ints and of bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(protocol)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": f"{name} of 6".encode(),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        batches[name] = batch
    return batches


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_load(tmp_path, no_env, protocol):
    batches = _write_genuine_cifar(tmp_path, protocol)
    x, y = load_cifar10("test", root=tmp_path, normalize=False).tensors
    np.testing.assert_array_equal(y.numpy(), batches["test_batch"][b"labels"])
    np.testing.assert_allclose(x.numpy().reshape(3, -1) * 255, batches["test_batch"][b"data"], atol=1e-3)


@pytest.mark.parametrize("where", ["data", "labels", "top"])
def test_cifar_batch_that_would_run_code_is_refused(tmp_path, no_env, where):
    make_cifar(tmp_path)
    marker = tmp_path / "marker"
    evil = _WritesMarker(marker)
    if where == "top":
        crafted = evil
    else:
        crafted = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
        crafted[where.encode()] = evil
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump(crafted, f)
    with pytest.raises(ValueError, match=r"data_batch_3 is not a CIFAR batch file that can be read "
                                         r"safely: it refers to builtins\.exec"):
        load_cifar10("train", root=tmp_path)
    assert not marker.exists()
    # The file really runs code when unpickled without restriction (what the loader did before).
    with open(tmp_path / "data_batch_3", "rb") as f:
        pickle.load(f, encoding="bytes")
    assert marker.read_text() == "ran"


def test_cifar_batch_of_another_layout_gets_a_clear_error(tmp_path, no_env):
    make_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"images": np.zeros((2, 3072), np.uint8)}, f)
    with pytest.raises(ValueError, match="no data, labels entry"):
        load_cifar10("test", root=tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump([1, 2], f)
    with pytest.raises(ValueError, match="holds a list, not a dict"):
        load_cifar10("test", root=tmp_path)
    (tmp_path / "test_batch").write_bytes(b"\x80\x04truncated")
    with pytest.raises(ValueError, match="can be read safely"):
        load_cifar10("test", root=tmp_path)


@pytest.mark.parametrize("name,env,folder", [
    ("cifar10", "SKMERGE_CIFAR10", "cifar-10-batches-py"),
    ("cifar100", "SKMERGE_CIFAR100", "cifar-100-python"),
])
def test_cifar_missing_message(tmp_path, no_env, monkeypatch, name, env, folder):
    for kwargs in ({}, {"root": tmp_path}):
        with pytest.raises(FileNotFoundError) as err:
            load_dataset(name, "train", **kwargs)
        msg = str(err.value)
        assert env in msg and folder in msg and "root=" in msg
        assert "https://www.cs.toronto.edu/~kriz/cifar.html" in msg
    monkeypatch.setenv(env, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset(name, "test")


# --------------------------------------------------------------------------
# digits, registry


def test_digits_shapes_and_normalization():
    train, test = load_digits("train"), load_digits("test")
    assert train.tensors[0].shape == (1198, 1, 8, 8) and test.tensors[0].shape == (599, 1, 8, 8)
    assert train.tensors[0].dtype == torch.float32 and train.tensors[1].dtype == torch.int64
    # The documented constants are the training split's statistics.
    x = train.tensors[0]
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
    raw = load_digits("train", normalize=False).tensors[0]
    assert raw.min() >= 0 and raw.max() <= 1
    (mean,), (std,) = NORMALIZATION["digits"]
    assert abs(raw.mean().item() - mean) < 1e-4 and abs(raw.std().item() - std) < 1e-3
    flat = load_digits("test", flatten=True)
    assert flat.tensors[0].shape == (599, 64)
    torch.testing.assert_close(flat.tensors[0], test.tensors[0].reshape(599, 64))
    with pytest.raises(ValueError, match="split"):
        load_digits("all")


def test_digits_split_is_stratified_fixed_and_disjoint():
    from sklearn.datasets import load_digits as sk_digits

    x_all, y_all = sk_digits(return_X_y=True)
    y_tr, y_te = load_digits("train").tensors[1], load_digits("test").tensors[1]
    total = np.bincount(y_all)
    # Each class is split 2/3 : 1/3 up to rounding.
    assert np.all(np.abs(np.bincount(y_te.numpy()) - total / 3) <= 1)
    np.testing.assert_array_equal(np.bincount(y_tr.numpy()) + np.bincount(y_te.numpy()), total)
    x_tr = load_digits("train", flatten=True, normalize=False).tensors[0].numpy() * 16
    x_te = load_digits("test", flatten=True, normalize=False).tensors[0].numpy() * 16
    rows = {r.tobytes() for r in np.round(x_all).astype(np.uint8)}
    assert {r.tobytes() for r in np.round(x_tr).astype(np.uint8)} <= rows
    assert len(x_tr) + len(x_te) == len(x_all)
    torch.testing.assert_close(load_digits("train").tensors[0], load_digits("train").tensors[0])


def test_dataset_info_and_dispatch():
    assert available_datasets() == ["cifar10", "cifar100", "digits", "fashion-mnist"]
    info = dataset_info("digits")
    assert info["in_channels"] == 1 and info["image_size"] == 8 and info["num_classes"] == 10
    assert info["input_shape"] == (1, 8, 8) and info["n_train"] == len(load_digits("train"))
    assert info["n_test"] == len(load_dataset("digits", "test"))
    assert dataset_info("CIFAR-10")["input_shape"] == (3, 32, 32)
    assert dataset_info("fashion_mnist")["image_size"] == 28
    assert dataset_info("cifar100")["num_classes"] == 100
    with pytest.raises(ValueError, match="cifar10, cifar100, digits, fashion-mnist"):
        load_dataset("imagenet")


# --------------------------------------------------------------------------
# splits


def _toy(n_per_class=(10, 20, 30, 40, 50, 25)):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])
    labels = np.random.default_rng(0).permutation(labels)
    return TensorDataset(torch.randn(len(labels), 2), torch.as_tensor(labels))


def _labels(subset):
    return subset.dataset.tensors[1][subset.indices].numpy()


def _assert_partition(parts, n):
    idx = np.concatenate([np.asarray(p.indices) for p in parts])
    assert len(idx) == n and len(np.unique(idx)) == n


def test_split_same():
    ds = _toy()
    parts = split_same(ds, 3)
    assert len(parts) == 3 and all(isinstance(p, Subset) for p in parts)
    assert all(list(p.indices) == list(range(len(ds))) for p in parts)


@pytest.mark.parametrize("n_models", [2, 3, 6])
def test_split_disjoint_classes(n_models):
    ds = _toy()
    parts = split_disjoint_classes(ds, n_models, seed=1)
    _assert_partition(parts, len(ds))
    seen = []
    for p in parts:
        assert sorted(set(_labels(p))) == p.classes
        seen += p.classes
    assert sorted(seen) == list(range(6))
    assert max(len(p.classes) for p in parts) - min(len(p.classes) for p in parts) <= 1
    again = split_disjoint_classes(ds, n_models, seed=1)
    assert [p.indices for p in again] == [p.indices for p in parts]
    with pytest.raises(ValueError, match="only 6 classes"):
        split_disjoint_classes(ds, 7)


def test_split_skewed_80_20():
    ds = _toy()
    parts = split_skewed(ds, 2, majority=0.8, seed=3)
    _assert_partition(parts, len(ds))
    assert sorted(parts[0].classes + parts[1].classes) == list(range(6))
    all_labels = ds.tensors[1].numpy()
    for owner, p in enumerate(parts):
        other = parts[1 - owner]
        for c in p.classes:
            n_c = (all_labels == c).sum()
            assert (_labels(p) == c).sum() == round(0.8 * n_c)
            assert (_labels(other) == c).sum() == n_c - round(0.8 * n_c)
    # majority=1 is the disjoint-classes split.
    ones = split_skewed(ds, 2, majority=1.0, seed=3)
    assert [sorted(set(_labels(p))) for p in ones] == [p.classes for p in parts]


def test_split_skewed_many_models_and_subsets():
    ds = Subset(_toy(), list(range(5, 170)))  # nested Subset works too
    parts = split_skewed(ds, 3, majority=0.6, seed=0)
    _assert_partition(parts, len(ds))
    labels = np.asarray([ds[i][1].item() for i in range(len(ds))])
    for owner, p in enumerate(parts):
        for c in p.classes:
            n_c = (labels == c).sum()
            counts = [(labels[q.indices] == c).sum() for q in parts]
            assert counts[owner] == round(0.6 * n_c)
            rest = [k for i, k in enumerate(counts) if i != owner]
            assert max(rest) - min(rest) <= 1  # the rest is shared equally
    generic = [(torch.zeros(1), int(y)) for y in labels]  # not tensor-backed
    assert [q.indices for q in split_skewed(generic, 3, majority=0.6, seed=0)] == \
        [p.indices for p in parts]
    with pytest.raises(ValueError, match="majority"):
        split_skewed(ds, 2, majority=1.5)
    with pytest.raises(ValueError, match="n_models"):
        split_same(ds, 0)
