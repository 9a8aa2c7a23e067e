"""Image classification data sets from local files, and the splits used in
the model-merging literature.

Nothing is downloaded at run time. Every loader returns a
:class:`torch.utils.data.TensorDataset` of ``float32`` images shaped
``(N, C, H, W)`` and ``int64`` labels. Pixels are scaled to ``[0, 1]`` and, by
default, standardized per channel with the constants in :data:`NORMALIZATION`
(mean and standard deviation of each training set's ``[0, 1]`` pixels).

Sources:

* ``"digits"``: scikit-learn's 8x8 digits (shipped with scikit-learn), split
  into a fixed stratified train/test split.
* ``"fashion-mnist"``: IDX files as installed by ``apt-get install
  dataset-fashion-mnist`` into ``/usr/share/datasets/fashion-mnist``.
* ``"cifar10"`` / ``"cifar100"``: the "python version" folders
  ``cifar-10-batches-py`` / ``cifar-100-python`` from
  https://www.cs.toronto.edu/~kriz/cifar.html. They are pickle files, read
  with an unpickler that builds only what such a file holds (dicts, lists,
  strings, bytes, numbers and NumPy arrays): a crafted file that would run
  code is refused with an error instead.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

__all__ = [
    "NORMALIZATION",
    "FASHION_MNIST_DEFAULT_ROOT",
    "available_datasets",
    "dataset_info",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_cifar10",
    "load_cifar100",
    "read_idx",
    "split_same",
    "split_disjoint_classes",
    "split_skewed",
]

#: Per-channel ``(mean, std)`` of the training images scaled to ``[0, 1]``.
#: digits: computed on the default training split (``x / 16``);
#: Fashion-MNIST: the 60,000 training images; CIFAR: the 50,000 training
#: images (per-pixel standard deviation, not the often quoted per-image one).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3054,), (0.3759,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

#: Where the Debian package ``dataset-fashion-mnist`` installs its files.
FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"

_INFO: dict[str, dict[str, Any]] = {
    "digits": dict(in_channels=1, image_size=8, num_classes=10, n_train=1198, n_test=599),
    "fashion-mnist": dict(in_channels=1, image_size=28, num_classes=10,
                          n_train=60000, n_test=10000),
    "cifar10": dict(in_channels=3, image_size=32, num_classes=10,
                    n_train=50000, n_test=10000),
    "cifar100": dict(in_channels=3, image_size=32, num_classes=100,
                     n_train=50000, n_test=10000),
}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
            "cifar-10": "cifar10", "cifar-100": "cifar100"}


# --------------------------------------------------------------------------
# helpers


def _canonical(name: str) -> str:
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in _INFO:
        raise ValueError(
            f"unknown dataset {name!r}; available datasets: {', '.join(available_datasets())}"
        )
    return key


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _to_dataset(images: np.ndarray, labels: np.ndarray, name: str,
                normalize: bool) -> TensorDataset:
    """uint8-or-float images in [0, 1] scale -> standardized float32 tensors."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    if normalize:
        mean, std = NORMALIZATION[name]
        shape = (1, len(mean)) + (1,) * (x.ndim - 2)
        x.sub_(torch.tensor(mean).view(shape)).div_(torch.tensor(std).view(shape))
    y = torch.from_numpy(np.array(labels, dtype=np.int64))
    return TensorDataset(x, y)


def available_datasets() -> list[str]:
    """List the names accepted by :func:`load_dataset` and :func:`dataset_info`.

    Returns
    -------
    list of str
        ``["cifar10", "cifar100", "digits", "fashion-mnist"]``.
    """
    return sorted(_INFO)


def dataset_info(name: str) -> dict[str, Any]:
    """Describe a data set without loading it.

    Parameters
    ----------
    name : {"digits", "fashion-mnist", "cifar10", "cifar100"}
        Data set name (case-insensitive; ``fashion_mnist`` also accepted).

    Returns
    -------
    dict
        ``name``, ``in_channels``, ``image_size``, ``num_classes`` (fine labels
        for CIFAR-100; the coarse labels have 20), ``input_shape``
        ``(C, H, W)``, ``n_train``, ``n_test``, ``mean`` and ``std`` (the
        normalization constants). ``in_channels``, ``image_size`` and
        ``num_classes`` can be passed straight to
        :func:`skmerge.models.get_model`.
    """
    key = _canonical(name)
    info = dict(_INFO[key], name=key)
    info["input_shape"] = (info["in_channels"], info["image_size"], info["image_size"])
    info["mean"], info["std"] = NORMALIZATION[key]
    return info


# --------------------------------------------------------------------------
# digits


def load_digits(split: str = "train", flatten: bool = False, *, normalize: bool = True,
                test_size: float = 1 / 3, random_state: int = 0) -> TensorDataset:
    """Load scikit-learn's 8x8 handwritten digits (the embedded default).

    The 1,797 images are split once, stratified by class, with
    :func:`sklearn.model_selection.train_test_split` (1,198 train / 599 test
    with the defaults). Pixels (0..16) are divided by 16 and, if
    ``normalize``, standardized with ``NORMALIZATION["digits"]``.

    Parameters
    ----------
    split : {"train", "test"}, default="train"
        Which part of the fixed split to return.
    flatten : bool, default=False
        Return ``(N, 64)`` vectors instead of ``(N, 1, 8, 8)`` images.
    normalize : bool, default=True
        Standardize with the training-set mean and std (else values in [0, 1]).
    test_size : float, default=1/3
        Fraction of the test split.
    random_state : int, default=0
        Seed of the split; keep the default for comparable numbers.

    Returns
    -------
    torch.utils.data.TensorDataset
        ``(images float32, labels int64)``.
    """
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    _check_split(split)
    x, y = _sk_load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, random_state=random_state, stratify=y
    )
    x, y = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    x = (x / 16.0).reshape(-1, 1, 8, 8)
    ds = _to_dataset(x, y, "digits", normalize)
    if flatten:
        ds = TensorDataset(ds.tensors[0].reshape(len(y), -1), ds.tensors[1])
    return ds


# --------------------------------------------------------------------------
# Fashion-MNIST (IDX files)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not.

    Compression is detected from the content, not the file name.

    Parameters
    ----------
    path : str or path-like
        File to read.

    Returns
    -------
    numpy.ndarray
        Writable array (native byte order) with the dimensions and dtype
        stored in the header.

    Raises
    ------
    ValueError
        If the header is not a valid IDX header or the size does not match.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    count = int(np.prod(dims, dtype=np.int64))
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: header says {dims} but the file holds "
                         f"{len(raw) - offset} bytes of data")
    # astype copies into a writable, native-byte-order array.
    data = np.frombuffer(raw, dtype, count=count, offset=offset)
    return data.astype(dtype.newbyteorder("=")).reshape(dims)


def _candidates(root: str | os.PathLike | None, env: str, default: str | None
                ) -> tuple[list[Path], str]:
    """Folders to search, and a phrase saying where they came from."""
    if root is not None:
        return [Path(root).expanduser()], f"root={str(root)!r}"
    if os.environ.get(env):
        return [Path(os.environ[env]).expanduser()], f"${env}={os.environ[env]!r}"
    if default is not None:
        return [Path(default)], f"the default {default!r}"
    return [], f"no root= argument and ${env} unset"


def _find_file(folders: Sequence[Path], stem: str) -> Path | None:
    for folder in folders:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None, *,
                       normalize: bool = True) -> TensorDataset:
    """Load Fashion-MNIST from local IDX files.

    The folder is ``root`` if given, else ``$SKMERGE_FASHION_MNIST`` if set,
    else ``/usr/share/datasets/fashion-mnist`` (where ``apt-get install
    dataset-fashion-mnist`` puts the files). The folder may also be a parent
    holding ``fashion-mnist/`` or torchvision's ``FashionMNIST/raw/``. Files:
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally
    ``.gz``.

    Parameters
    ----------
    split : {"train", "test"}, default="train"
        60,000 training or 10,000 test images.
    root : str or path-like, optional
        Folder holding the files (overrides the environment variable).
    normalize : bool, default=True
        Standardize with ``NORMALIZATION["fashion-mnist"]`` (else [0, 1]).

    Returns
    -------
    torch.utils.data.TensorDataset
        Images ``(N, 1, 28, 28)`` float32 and labels int64.

    Raises
    ------
    FileNotFoundError
        If the files are missing; the message says how to install them.
    """
    _check_split(split)
    bases, origin = _candidates(root, "SKMERGE_FASHION_MNIST", FASHION_MNIST_DEFAULT_ROOT)
    folders = [p for b in bases for p in (b, b / "fashion-mnist", b / "FashionMNIST" / "raw")]
    img_stem, lbl_stem = _FASHION_FILES[split]
    img, lbl = _find_file(folders, img_stem), _find_file(folders, lbl_stem)
    if img is None or lbl is None:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files not found (searched {', '.join(map(str, folders))}"
            f" from {origin}). Install them with `apt-get install dataset-fashion-mnist` "
            f"(files go to {FASHION_MNIST_DEFAULT_ROOT}), or put {img_stem}[.gz] and "
            f"{lbl_stem}[.gz] (from https://github.com/zalandoresearch/fashion-mnist) in "
            "a folder and pass it as root= or set SKMERGE_FASHION_MNIST."
        )
    images, labels = read_idx(img), read_idx(lbl)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"unexpected IDX shapes {images.shape} and {labels.shape} "
                         f"in {img} and {lbl}")
    x = images[:, None].astype(np.float32) / 255.0
    return _to_dataset(x, labels, "fashion-mnist", normalize)


# --------------------------------------------------------------------------
# CIFAR (pickled "python version" batches)

_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", env="SKMERGE_CIFAR10",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    archive="cifar-10-python.tar.gz"),
    "cifar100": dict(folder="cifar-100-python", env="SKMERGE_CIFAR100",
                     train=["train"], test=["test"], archive="cifar-100-python.tar.gz"),
}


def _numpy_global(module: str, name: str):
    """A NumPy function by its pickled path (``numpy.core`` in NumPy 1 files, ``numpy._core`` in 2)."""
    import importlib

    for candidate in (module.replace("numpy.core", "numpy._core"), module.replace("numpy._core", "numpy.core")):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"{module}.{name} is not available in this NumPy")


class _CifarUnpickler(pickle.Unpickler):
    """Builds only what CIFAR batch files hold: no pickled callable of the file ever runs.

    Dicts, lists, strings, bytes and numbers need no global; NumPy arrays
    need the few reconstruction functions below (both NumPy 1 and 2 paths,
    and ``_codecs.encode``, which Python 3 pickles of bytes use). Any other
    global (``os.system``, ``builtins.eval``, ...) is refused.
    """

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            import codecs

            return codecs.encode
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"it refers to {module}.{name}, which a CIFAR batch never contains")
        if module == "numpy":
            return getattr(np, name)
        return _numpy_global(module, name)


def _read_cifar_batch(path: Path) -> dict:
    """One pickled CIFAR batch, read with :class:`_CifarUnpickler`."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as error:
        raise ValueError(f"{path} is not a CIFAR batch file that can be read safely: {error}. "
                         "Get the original files from https://www.cs.toronto.edu/~kriz/cifar.html."
                         ) from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR batch: it holds a {type(batch).__name__}, not a dict.")
    return batch


def _load_cifar(name: str, split: str, root: str | os.PathLike | None, label_key: bytes,
                normalize: bool) -> TensorDataset:
    spec = _CIFAR[name]
    _check_split(split)
    bases, origin = _candidates(root, spec["env"], None)
    files = spec[split]
    folder = next((f for b in bases for f in (b, b / spec["folder"])
                   if all((f / n).is_file() for n in files)), None)
    if folder is None:
        searched = ", ".join(str(f) for b in bases for f in (b, b / spec["folder"])) or "nothing"
        raise FileNotFoundError(
            f"{name.upper()} {split} files {files} not found (searched {searched}; "
            f"{origin}). Download {spec['archive']} from "
            "https://www.cs.toronto.edu/~kriz/cifar.html on a machine with internet, "
            f"extract it (`tar xzf {spec['archive']}`) to get a '{spec['folder']}' "
            f"folder, and pass that folder (or its parent) as root= or set {spec['env']}."
        )
    images, labels = [], []
    for n in files:
        batch = _read_cifar_batch(folder / n)
        missing = [key for key in (b"data", label_key) if key not in batch]
        if missing:
            raise ValueError(f"{folder / n} is not a {name.upper()} batch: it has no "
                             f"{', '.join(k.decode() for k in missing)} entry.")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    x = np.concatenate(images).reshape(-1, 3, 32, 32).astype(np.float32)
    x /= 255.0
    return _to_dataset(x, np.concatenate(labels), name, normalize)


def load_cifar10(split: str = "train", root: str | os.PathLike | None = None, *,
                 normalize: bool = True) -> TensorDataset:
    """Load CIFAR-10 from a local ``cifar-10-batches-py`` folder.

    ``root`` (or ``$SKMERGE_CIFAR10``) is the folder itself or its parent; it
    must hold ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``.

    Parameters
    ----------
    split : {"train", "test"}, default="train"
        50,000 training or 10,000 test images.
    root : str or path-like, optional
        Folder (overrides the environment variable).
    normalize : bool, default=True
        Standardize with ``NORMALIZATION["cifar10"]`` (else [0, 1]).

    Returns
    -------
    torch.utils.data.TensorDataset
        Images ``(N, 3, 32, 32)`` float32 and labels int64.

    Raises
    ------
    FileNotFoundError
        If the files are missing; the message says where to get them.
    """
    return _load_cifar("cifar10", split, root, b"labels", normalize)


def load_cifar100(split: str = "train", root: str | os.PathLike | None = None,
                  label: str = "fine", *, normalize: bool = True) -> TensorDataset:
    """Load CIFAR-100 from a local ``cifar-100-python`` folder.

    ``root`` (or ``$SKMERGE_CIFAR100``) is the folder itself or its parent; it
    must hold ``train`` and ``test``.

    Parameters
    ----------
    split : {"train", "test"}, default="train"
        50,000 training or 10,000 test images.
    root : str or path-like, optional
        Folder (overrides the environment variable).
    label : {"fine", "coarse"}, default="fine"
        100 fine classes or 20 coarse superclasses.
    normalize : bool, default=True
        Standardize with ``NORMALIZATION["cifar100"]`` (else [0, 1]).

    Returns
    -------
    torch.utils.data.TensorDataset
        Images ``(N, 3, 32, 32)`` float32 and labels int64.

    Raises
    ------
    FileNotFoundError
        If the files are missing; the message says where to get them.
    """
    if label not in ("fine", "coarse"):
        raise ValueError(f"label must be 'fine' or 'coarse', got {label!r}")
    return _load_cifar("cifar100", split, root, f"{label}_labels".encode(), normalize)


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None,
                 **kwargs: Any) -> TensorDataset:
    """Load a data set by name.

    Parameters
    ----------
    name : {"digits", "fashion-mnist", "cifar10", "cifar100"}
        Data set name (case-insensitive).
    split : {"train", "test"}, default="train"
        Which split.
    root : str or path-like, optional
        Local folder (ignored for ``"digits"``, which ships with scikit-learn).
    **kwargs
        Passed to the loader (``normalize``, ``label`` for CIFAR-100, ...).

    Returns
    -------
    torch.utils.data.TensorDataset
        Images float32 ``(N, C, H, W)`` and labels int64.
    """
    key = _canonical(name)
    if key == "digits":
        return load_digits(split, **kwargs)
    loader = {"fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10,
              "cifar100": load_cifar100}[key]
    return loader(split, root, **kwargs)


# --------------------------------------------------------------------------
# splits between models


def _labels(dataset: Dataset) -> np.ndarray:
    """Labels of a (possibly nested Subset of a) TensorDataset, cheaply."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[-1].cpu().numpy().astype(np.int64)
    if isinstance(dataset, Subset):
        return _labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def _class_groups(labels: np.ndarray, n_models: int, seed: int | None) -> list[np.ndarray]:
    classes = np.unique(labels)
    if n_models > len(classes):
        raise ValueError(f"cannot give {n_models} models disjoint classes: "
                         f"the dataset has only {len(classes)} classes")
    perm = np.random.default_rng(seed).permutation(classes)
    return [np.sort(g) for g in np.array_split(perm, n_models)]


def _check_n_models(n_models: int) -> None:
    if int(n_models) != n_models or n_models < 1:
        raise ValueError(f"n_models must be a positive integer, got {n_models!r}")


def _subset(dataset: Dataset, indices: np.ndarray, classes: np.ndarray | None) -> Subset:
    sub = Subset(dataset, np.sort(indices).tolist())
    if classes is not None:
        sub.classes = [int(c) for c in classes]  # type: ignore[attr-defined]
    return sub


def split_same(dataset: Dataset, n_models: int) -> list[Subset]:
    """Give every model the whole data set (the usual "different seeds" setup).

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        Training data.
    n_models : int
        Number of models.

    Returns
    -------
    list of torch.utils.data.Subset
        ``n_models`` subsets, each with all indices.
    """
    _check_n_models(n_models)
    idx = np.arange(len(dataset))
    return [_subset(dataset, idx, None) for _ in range(n_models)]


def split_disjoint_classes(dataset: Dataset, n_models: int, seed: int | None = 0
                           ) -> list[Subset]:
    """Give each model all samples of its own, disjoint set of classes.

    The classes are shuffled with ``seed`` and cut into ``n_models`` groups of
    (nearly) equal size; model ``i`` gets every sample whose label is in group
    ``i`` (e.g. 5 + 5 classes for two models on a 10-class data set).

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        Labelled data (``dataset[i][1]`` is the label).
    n_models : int
        Number of models; at most the number of classes.
    seed : int or None, default=0
        Seed of the class shuffle.

    Returns
    -------
    list of torch.utils.data.Subset
        Disjoint subsets covering the data set. Each has an extra attribute
        ``classes``: the sorted list of its labels.
    """
    _check_n_models(n_models)
    labels = _labels(dataset)
    return [_subset(dataset, np.flatnonzero(np.isin(labels, g)), g)
            for g in _class_groups(labels, n_models, seed)]


def split_skewed(dataset: Dataset, n_models: int = 2, majority: float = 0.8,
                 seed: int | None = 0) -> list[Subset]:
    """Split with a skewed label distribution per model (e.g. 80/20).

    Classes are assigned to models as in :func:`split_disjoint_classes`. For
    each class, a random ``majority`` fraction of its samples (rounded) goes
    to the model owning the class and the rest is shared equally among the
    other models. With two models and ``majority=0.8``, model 0 gets 80 % of
    the samples of its classes and 20 % of the others, and model 1 the
    complement. ``majority=1`` gives disjoint classes; ``majority=1/n_models``
    a stratified random split.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        Labelled data.
    n_models : int, default=2
        Number of models; at most the number of classes.
    majority : float, default=0.8
        Fraction of a class kept by its owner, in [0, 1].
    seed : int or None, default=0
        Seed of the class assignment and of the sample shuffles.

    Returns
    -------
    list of torch.utils.data.Subset
        Disjoint subsets covering the data set. Each has an extra attribute
        ``classes``: the sorted list of the classes it owns (its majority
        classes).
    """
    _check_n_models(n_models)
    if not 0.0 <= majority <= 1.0:
        raise ValueError(f"majority must be in [0, 1], got {majority!r}")
    labels = _labels(dataset)
    groups = _class_groups(labels, n_models, seed)
    rng = np.random.default_rng(None if seed is None else seed + 1)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_models)]
    for owner, group in enumerate(groups):
        others = [m for m in range(n_models) if m != owner]
        for k, c in enumerate(group):
            idx = rng.permutation(np.flatnonzero(labels == c))
            n_major = int(round(majority * len(idx))) if others else len(idx)
            parts[owner].append(idx[:n_major])
            if others:
                # Rotate which minority model gets the remainder's extra samples.
                shift = k % len(others)
                for m, chunk in zip(others[shift:] + others[:shift],
                                    np.array_split(idx[n_major:], len(others))):
                    parts[m].append(chunk)
    return [_subset(dataset, np.concatenate(p) if p else np.array([], dtype=np.int64), g)
            for p, g in zip(parts, groups)]
