"""The converged base models of the merging benchmarks, and their data.

``benchmarks/models/<family>/seed<k>.pt`` hold five independently trained
models per family (different initialization and data order, same training
images), trained once by ``benchmarks/base_models.py`` and committed, so that
every merging benchmark starts from the same well-trained networks.
``benchmarks/models/MANIFEST.json`` records each family's recipe, per-seed
test accuracy, training time and the command that regenerates it.

Data (Fashion-MNIST, 28x28, 1 channel, standardized as
:func:`skmerge.datasets.load_fashion_mnist` does):

* ``train``: the 55,000 training images the models were trained on,
* ``heldout``: the other 5,000 training images (stratified, listed in
  ``benchmarks/models/split.json``), never trained on: the alignment and
  validation data of the merging benchmarks,
* ``test``: the 10,000 test images.

Use from a benchmark script (after ``import _common``)::

    from _base_models import load_base_models
    models, data = load_base_models("resnet20-x1")    # 5 float32 eval-mode models
"""

from __future__ import annotations

import _common  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)

import dataclasses  # noqa: E402
import json  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from _common import HERE, _stratified_pick  # noqa: E402

MODELS_DIR = HERE / "models"
DATASET = "fashion-mnist"
IMAGE_SIZE = 28
N_HELDOUT = 5000
SPLIT_SEED = 0
SEEDS = (0, 1, 2, 3, 4)


@dataclasses.dataclass(frozen=True)
class BaseFamily:
    """One architecture at one width and the recipe its base models were trained with."""

    label: str
    model: str
    kwargs: dict
    epochs: int
    lr: float
    #: keywords of ``RECIPE`` this family trains with instead (e.g. its optimizer)
    recipe: dict | None = None


#: Training recipe shared by every family (``skmerge.training.train_model``
#: keywords; ``epochs`` and ``lr`` are per family). ``momentum``, ``nesterov``
#: and ``warmup_fraction`` record what train_model's ``"sgd"`` and
#: ``"warmup_cosine"`` do (10 % linear warmup, then cosine decay to zero).
#: Flips are the only augmentation: in pilot runs random crops lowered the
#: test accuracy of these short schedules.
RECIPE = {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
          "batch_size": 128, "schedule": "warmup_cosine", "warmup_fraction": 0.1,
          "label_smoothing": 0.1, "augment": "flip", "channels_last": True}

#: Epochs fit about 5 hours of one CPU core for all 25 models (measured with
#: ``base_models.py --time-steps``); the cheap narrow VGGs get more epochs.
FAMILIES = {
    # The CCA Merge reference code's VGG11: conv3x3 (bias) -> ReLU, 2x2 max pools, one
    # Linear head; no BatchNorm. At 28x28 the fifth pool is an Identity (28-14-7-3-1).
    "vgg11-ref-x0.5": BaseFamily("VGG11 x1/2 (no BN)", "vgg11",
                                 {"width": 0.5, "batch_norm": False}, epochs=8, lr=0.1),
    "vgg11-ref-x0.25": BaseFamily("VGG11 x1/4 (no BN)", "vgg11",
                                  {"width": 0.25, "batch_norm": False}, epochs=12, lr=0.1),
    "vgg11-bn-x0.25": BaseFamily("VGG11-BN x1/4", "vgg11",
                                 {"width": 0.25, "batch_norm": True}, epochs=12, lr=0.1),
    "resnet20-x1": BaseFamily("ResNet20 x1", "resnet20", {"width": 1}, epochs=8, lr=0.1),
    "resnet20-x2": BaseFamily("ResNet20 x2", "resnet20", {"width": 2}, epochs=4, lr=0.1),
    # skmerge.models.ViT: 7x7 patches of 4x4 pixels and a class token, 4 pre-norm blocks of
    # width 64 with 4 heads; AdamW, as vision transformers are trained.
    "vit-x1": BaseFamily("ViT x1", "vit", {"patch_size": 4}, epochs=15, lr=2e-3,
                         recipe={"optimizer": "adamw", "weight_decay": 0.05, "momentum": None,
                                 "nesterov": None, "betas": [0.9, 0.999]}),
}


def model_kwargs(family: str) -> dict:
    """The ``skmerge.models.get_model`` keywords of a family (data keywords included)."""
    spec = _family(family)
    return {"in_channels": 1, "num_classes": 10, "image_size": IMAGE_SIZE, **spec.kwargs}


def checkpoint_path(family: str, seed: int, models_dir: Path = MODELS_DIR) -> Path:
    """Where the checkpoint of one base model lives."""
    _family(family)
    return Path(models_dir) / family / f"seed{int(seed)}.pt"


def available_seeds(family: str, models_dir: Path = MODELS_DIR) -> list[int]:
    """The seeds of a family whose checkpoint exists."""
    return sorted(int(p.stem[4:]) for p in (Path(models_dir) / family).glob("seed*.pt"))


@torch.no_grad()
def accuracy(model: nn.Module, dataset: TensorDataset, batch: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on a ``(images, labels)`` TensorDataset."""
    x, y = dataset.tensors
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                  for i in range(0, len(x), batch))
    return correct / len(x)


def _family(family: str) -> BaseFamily:
    if family not in FAMILIES:
        raise ValueError(f"unknown base-model family {family!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[family]


# --------------------------------------------------------------------------
# data


def make_split(labels: np.ndarray) -> np.ndarray:
    """The held-out training images: ``N_HELDOUT`` stratified indices, sorted."""
    (heldout,) = _stratified_pick(np.asarray(labels), [N_HELDOUT], SPLIT_SEED)
    return np.sort(heldout)


def heldout_indices(models_dir: Path = MODELS_DIR) -> np.ndarray:
    """Indices (into the 60,000 training images) of the held-out images, from split.json."""
    path = Path(models_dir) / "split.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run python benchmarks/base_models.py")
    return np.asarray(json.loads(path.read_text())["heldout_indices"], dtype=np.int64)


def base_model_data(models_dir: Path = MODELS_DIR, root: str | None = None) -> dict:
    """The training, held-out (alignment) and test images of the base models.

    Parameters
    ----------
    models_dir : path, default=benchmarks/models
        Folder holding ``split.json``.
    root : str, optional
        Fashion-MNIST folder (default: ``skmerge.datasets``' search path).

    Returns
    -------
    dict
        ``train`` (55,000 images), ``heldout`` (5,000 training images never
        trained on), ``test`` (10,000 images) as TensorDatasets of float32
        ``(N, 1, 28, 28)`` images and int64 labels, and ``info``.
    """
    from skmerge.datasets import load_dataset

    x, y = load_dataset(DATASET, "train", root=root).tensors
    xt, yt = load_dataset(DATASET, "test", root=root).tensors
    heldout = heldout_indices(models_dir)
    train = np.setdiff1d(np.arange(len(y)), heldout)
    if len(train) + len(heldout) != len(y):
        raise ValueError(f"{models_dir}/split.json lists indices outside the training set")

    def subset(idx):
        idx = torch.as_tensor(idx)
        return TensorDataset(x[idx].contiguous(), y[idx].clone())

    return {"train": subset(train), "heldout": subset(heldout), "test": TensorDataset(xt, yt),
            "info": {"dataset": DATASET, "in_channels": 1, "image_size": IMAGE_SIZE,
                     "num_classes": 10}}


# --------------------------------------------------------------------------
# models


def load_base_models(family: str, seeds: Sequence[int] | None = None, *,
                     models_dir: Path = MODELS_DIR, data: bool = True,
                     root: str | None = None) -> tuple[list[nn.Module], dict | None]:
    """Load a family's base models (float32, eval mode) and the data they were trained on.

    Parameters
    ----------
    family : str
        A key of :data:`FAMILIES`, e.g. ``"resnet20-x1"``.
    seeds : sequence of int, optional
        Which models (default: all five, seeds 0-4).
    models_dir : path, default=benchmarks/models
        Folder of the checkpoints.
    data : bool, default=True
        Also load the data splits (see :func:`base_model_data`); ``None`` is
        returned in their place otherwise.
    root : str, optional
        Fashion-MNIST folder.

    Returns
    -------
    models : list of torch.nn.Module
        Rebuilt with ``skmerge.models.get_model`` from each checkpoint's
        metadata, weights cast from float16 to float32, in eval mode.
    data : dict or None
        ``train``, ``heldout``, ``test`` and ``info``.
    """
    from skmerge.training import load_model

    models = []
    for seed in SEEDS if seeds is None else seeds:
        path = checkpoint_path(family, seed, models_dir)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run python benchmarks/base_models.py "
                                    f"--families {family} --seeds {seed}")
        model, metadata = load_model(path)
        if metadata.get("family") != family:
            raise ValueError(f"{path} holds a model of family {metadata.get('family')!r}")
        models.append(model.float().eval())
    return models, (base_model_data(models_dir, root) if data else None)
