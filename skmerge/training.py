"""Training, evaluation and checkpoints for the base models to be merged.

Default recipes (used when ``optimizer``/``lr``/``schedule`` are left at
``None``), chosen by model family:

* **conv nets** (any ``Conv1d/2d/3d`` inside): SGD, momentum 0.9, Nesterov,
  weight decay 5e-4, peak learning rate 0.05 (scaled linearly by
  ``batch_size / 128``), linear warmup over the first 10 % of the steps then
  cosine decay to zero (``"warmup_cosine"``).
* **MLPs** (no conv): Adam, learning rate 1e-3, no weight decay, cosine
  decay to zero over all steps (``"cosine"``).
* **transformers** (any ``LayerNorm`` inside and no ``BatchNorm``, e.g.
  :class:`skmerge.models.ViT`, ConvNeXt; this takes precedence over the
  two above): AdamW, learning rate 1e-3, weight decay 0.05, warmup and cosine
  decay (``"warmup_cosine"``).

Reproducibility: given ``seed``, shuffling and augmentation use a local
:class:`torch.Generator`; dropout uses the global torch RNG, which is seeded
with ``seed`` inside :func:`torch.random.fork_rng`, so the caller's global RNG
state is restored afterwards. On CPU the same seed gives bit-identical
weights for the same thread count; on GPU, cuDNN kernels may still be
non-deterministic.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ._modes import evaluation_mode

__all__ = [
    "train_model",
    "train_models",
    "evaluate",
    "predict_logits",
    "ensemble_accuracy",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
]

CHECKPOINT_FORMAT = "skmerge.checkpoint"
_SCHEDULES = ("constant", "cosine", "warmup_cosine")
_AUGMENTS = ("crop", "flip", "crop_flip")


# --------------------------------------------------------------------------
# data and device helpers


def _resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``None``: the model's own device; ``"auto"``: CUDA when available."""
    if device is None:
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_tensors(data: Any
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """(inputs, labels, row indices or None) of tensor-backed data, else None.

    Indexing the tensors directly is many times faster than a DataLoader's
    per-sample collation, which matters for the small CPU experiments. Subsets
    are kept as index maps so that no copy of the data is made.
    """
    if isinstance(data, np.ndarray):
        return torch.as_tensor(data), None, None
    if isinstance(data, torch.Tensor):
        return data, None, None
    if isinstance(data, TensorDataset):
        t = data.tensors
        return t[0], (t[1] if len(t) > 1 else None), None
    if isinstance(data, Subset):
        inner = _as_tensors(data.dataset)
        if inner is None:
            return None
        x, y, rows = inner
        idx = torch.as_tensor(np.asarray(data.indices, dtype=np.int64))
        return x, y, (idx if rows is None else rows[idx])
    return None


def _batches(data: Any, batch_size: int, generator: torch.Generator | None = None,
             shuffle: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (x, y) batches; y is None for unlabelled data."""
    tensors = _as_tensors(data)
    if tensors is not None:
        x, y, rows = tensors
        n = len(x) if rows is None else len(rows)
    else:
        n = len(data)
    # The same permutation for both paths, drawn from the caller's generator.
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if tensors is not None:
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            if rows is not None:
                idx = rows[idx]
            yield x[idx], (None if y is None else y[idx])
        return
    # A private generator: DataLoader would otherwise draw its worker seed
    # from the global RNG.
    loader = DataLoader(data, batch_size=batch_size, sampler=order.tolist(),
                        generator=torch.Generator())
    for batch in loader:
        if isinstance(batch, (list, tuple)):
            yield batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            yield batch, None


def _augment(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding (H // 8 px) and/or horizontal flip."""
    if x.ndim != 4:
        raise ValueError(f"augment needs image batches (N, C, H, W), got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    if "crop" in mode:
        pad = max(1, h // 8)
        padded = F.pad(x, (pad, pad, pad, pad))
        top = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        left = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    if "flip" in mode:
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


# --------------------------------------------------------------------------
# training


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNGs of the CPU (and ``device``), restore them on exit.

    ``torch.manual_seed`` would also reseed every CUDA device, which
    ``fork_rng`` does not restore unless listed, so seed only what is forked.
    """
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def _is_convnet(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in model.modules())


def _family(model: nn.Module) -> str:
    """``"transformer"``, ``"conv"`` or ``"mlp"``: which default recipe trains the model."""
    modules = list(model.modules())
    if any(isinstance(m, nn.LayerNorm) for m in modules) and not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules):
        return "transformer"
    return "conv" if _is_convnet(model) else "mlp"


def _make_optimizer(model: nn.Module, optimizer: Any, lr: float | None,
                    weight_decay: float | None, batch_size: int, family: str
                    ) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if callable(optimizer) and not isinstance(optimizer, str):
        opt = optimizer(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError("optimizer callable must return a torch.optim.Optimizer")
        return opt
    name = optimizer or {"conv": "sgd", "mlp": "adam", "transformer": "adamw"}[family]
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr if lr is not None else 0.05 * batch_size / 128, momentum=0.9,
            nesterov=True, weight_decay=5e-4 if weight_decay is None else weight_decay)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        default_wd = 0.0 if name == "adam" else 0.05 if family == "transformer" else 1e-2
        return cls(params, lr=lr if lr is not None else 1e-3,
                   weight_decay=default_wd if weight_decay is None else weight_decay)
    raise ValueError(f"optimizer must be None, 'sgd', 'adam', 'adamw' or a callable "
                     f"params -> Optimizer, got {optimizer!r}")


def _lr_factor(schedule: str, total: int) -> Callable[[int], float]:
    warmup = max(1, int(0.1 * total)) if schedule == "warmup_cosine" else 0

    def factor(step: int) -> float:
        if schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def train_model(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float | None = None,
    optimizer: str | Callable[..., torch.optim.Optimizer] | None = None,
    weight_decay: float | None = None,
    schedule: str | None = None,
    augment: str | None = None,
    label_smoothing: float = 0.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    eval_dataset: Dataset | None = None,
    verbose: bool = False,
) -> nn.Module:
    """Train a classifier with cross-entropy, reproducibly.

    Parameters
    ----------
    model : torch.nn.Module
        Model returning logits; trained in place.
    dataset : torch.utils.data.Dataset
        Yields ``(input, label)``. ``TensorDataset`` and (nested) ``Subset``
        of one are batched by direct tensor indexing (fast path).
    epochs : int
        Number of passes over ``dataset``.
    batch_size : int, default=128
        Mini-batch size. A final batch of a single sample is skipped
        (BatchNorm cannot train on it).
    lr : float, optional
        Peak learning rate. Default: 0.05 * batch_size / 128 for SGD, 1e-3
        for Adam/AdamW.
    optimizer : {"sgd", "adam", "adamw"} or callable, optional
        Default by family: SGD (momentum 0.9, Nesterov) for conv nets, Adam
        for MLPs, AdamW for transformers (see the module docstring). A callable receives the trainable parameters and returns an
        optimizer (``lr``/``weight_decay`` are then ignored; the schedule
        multiplies its learning rate).
    weight_decay : float, optional
        Default: 5e-4 for SGD, 0 for Adam, 1e-2 for AdamW (0.05 for
        transformers).
    schedule : {"warmup_cosine", "cosine", "constant"}, optional
        Per-step learning-rate schedule. Default: ``"warmup_cosine"`` (10 %
        linear warmup, then cosine to 0) for conv nets and transformers,
        ``"cosine"`` for MLPs.
    augment : {"crop", "flip", "crop_flip"}, optional
        On-the-fly augmentation of image batches: random crop after zero
        padding of ``H // 8`` pixels (4 for 32x32) and/or random horizontal
        flip (``"crop_flip"`` is the usual CIFAR recipe; do not flip digits).
    label_smoothing : float, default=0.0
        Passed to :func:`torch.nn.functional.cross_entropy`.
    seed : int, default=0
        Seeds the shuffling/augmentation generator and (inside
        :func:`torch.random.fork_rng`) dropout. Initialization happens before
        this call: use :func:`train_models` to seed it too.
    device : str or torch.device, optional
        Device to train on; the model is moved there. ``None`` keeps the
        model's current device, ``"auto"`` picks CUDA when available.
    eval_dataset : torch.utils.data.Dataset, optional
        If given and ``verbose``, its accuracy is shown after each epoch.
    verbose : bool, default=False
        Show a tqdm progress bar with per-epoch loss and accuracy.

    Returns
    -------
    torch.nn.Module
        The same ``model``, trained, on ``device``, in eval mode.

    Raises
    ------
    RuntimeError
        If the loss becomes NaN or infinite (lower ``lr``).
    """
    from tqdm.auto import tqdm

    if epochs < 0 or int(epochs) != epochs:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if augment is not None and augment not in _AUGMENTS:
        raise ValueError(f"augment must be None or one of {_AUGMENTS}, got {augment!r}")
    dev = _resolve_device(model, device)
    model.to(dev)
    family = _family(model)
    schedule = schedule or ("cosine" if family == "mlp" else "warmup_cosine")
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
    opt = _make_optimizer(model, optimizer, lr, weight_decay, batch_size, family)
    n = len(dataset)
    steps_per_epoch = n // batch_size + (n % batch_size > 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_factor(schedule, max(1, epochs * steps_per_epoch)))
    gen = torch.Generator().manual_seed(seed)

    with _seeded(seed, dev):
        bar = tqdm(range(epochs), desc="train", unit="epoch", disable=not verbose)
        for _ in bar:
            model.train()
            total_loss, correct, seen = 0.0, 0, 0
            for xb, yb in _batches(dataset, batch_size, gen, shuffle=True):
                if yb is None:
                    raise ValueError("training data must yield (input, label) pairs")
                if len(xb) < 2:
                    continue
                xb, yb = xb.to(dev), yb.to(dev)
                if augment is not None:
                    xb = _augment(xb, augment, gen)
                logits = model(xb)
                loss = F.cross_entropy(logits, yb, label_smoothing=label_smoothing)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"training diverged (loss={loss.item()}); "
                                       "try a lower lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total_loss += loss.item() * len(xb)
                correct += (logits.argmax(1) == yb).sum().item()
                seen += len(xb)
            if verbose:
                stats = {"loss": f"{total_loss / max(seen, 1):.4f}",
                         "acc": f"{correct / max(seen, 1):.4f}"}
                if eval_dataset is not None:
                    stats["test_acc"] = f"{evaluate(model, eval_dataset)['accuracy']:.4f}"
                bar.set_postfix(stats)
    return model.eval()


def train_models(
    factory: Callable[[], nn.Module],
    dataset_or_list: Dataset | Sequence[Dataset],
    n_models: int,
    *,
    seeds: int | Sequence[int] | None = None,
    **kwargs: Any,
) -> list[nn.Module]:
    """Build and train several models with different seeds.

    Model ``i`` is built by ``factory()`` right after seeding the global CPU
    RNG with ``s_i`` (inside :func:`torch.random.fork_rng`, so the global RNG
    is left as it was; build on the CPU, ``train_model`` moves the model) and
    trained with ``train_model(..., seed=s_i)``: different seeds give
    different initializations and data orders.

    Parameters
    ----------
    factory : callable
        ``factory() -> nn.Module``, e.g. ``lambda: get_model("mlp", ...)``.
    dataset_or_list : Dataset or sequence of Dataset
        One data set for all models, or one per model (e.g. the output of
        :func:`skmerge.datasets.split_disjoint_classes`).
    n_models : int
        Number of models.
    seeds : int or sequence of int, optional
        Per-model seeds. ``None``: ``0, 1, ..., n_models - 1``; an int ``s``:
        ``s, s + 1, ...``.
    **kwargs
        Passed to :func:`train_model` (``epochs`` is required).

    Returns
    -------
    list of torch.nn.Module
        The trained models, in eval mode.
    """
    if seeds is None:
        seeds = list(range(n_models))
    elif isinstance(seeds, (int, np.integer)):
        seeds = [int(seeds) + i for i in range(n_models)]
    seeds = list(seeds)
    if len(seeds) != n_models:
        raise ValueError(f"got {len(seeds)} seeds for {n_models} models")
    if isinstance(dataset_or_list, (list, tuple)):
        if len(dataset_or_list) != n_models:
            raise ValueError(f"got {len(dataset_or_list)} datasets for {n_models} models")
        datasets = list(dataset_or_list)
    else:
        datasets = [dataset_or_list] * n_models
    models = []
    for s, ds in zip(seeds, datasets):
        with _seeded(s, torch.device("cpu")):
            model = factory()
        models.append(train_model(model, ds, seed=s, **kwargs))
    return models


# --------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def _logits_and_labels(model: nn.Module, data: Any, batch_size: int,
                       device: str | torch.device | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    dev = _resolve_device(model, device)
    model.to(dev)
    with evaluation_mode([model]):
        outs, labels = [], []
        for xb, yb in _batches(data, batch_size):
            outs.append(model(xb.to(dev)).float().cpu())
            if yb is not None:
                labels.append(yb.cpu())
    logits = torch.cat(outs) if outs else torch.empty(0)
    return logits, (torch.cat(labels).long() if labels else None)


def predict_logits(model: nn.Module, dataset_or_tensor: Any, batch_size: int = 512,
                   device: str | torch.device | None = None) -> torch.Tensor:
    """Compute the logits of a model on a data set or a tensor.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier; evaluated in eval mode, its mode is restored afterwards.
    dataset_or_tensor : Dataset, torch.Tensor or numpy.ndarray
        Inputs, or a data set yielding ``(input, label)`` (labels ignored).
    batch_size : int, default=512
        Evaluation batch size.
    device : str or torch.device, optional
        Device to run on (the model is moved there); ``None`` keeps the
        model's device.

    Returns
    -------
    torch.Tensor
        ``float32`` logits of shape ``(N, num_classes)``, on the CPU.
    """
    return _logits_and_labels(model, dataset_or_tensor, batch_size, device)[0]


def _require_labels(labels: torch.Tensor | None) -> torch.Tensor:
    if labels is None:
        raise ValueError("the dataset must yield (input, label) pairs")
    return labels


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 512,
             device: str | torch.device | None = None) -> dict[str, float]:
    """Accuracy and mean cross-entropy of a classifier.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier; evaluated in eval mode, its mode is restored afterwards.
    dataset : torch.utils.data.Dataset
        Yields ``(input, label)``.
    batch_size : int, default=512
        Evaluation batch size.
    device : str or torch.device, optional
        Device to run on; ``None`` keeps the model's device.

    Returns
    -------
    dict
        ``{"accuracy": float in [0, 1], "loss": mean cross-entropy}``.
    """
    logits, labels = _logits_and_labels(model, dataset, batch_size, device)
    labels = _require_labels(labels)
    return {"accuracy": (logits.argmax(1) == labels).float().mean().item(),
            "loss": F.cross_entropy(logits, labels).item()}


def ensemble_accuracy(models: Sequence[nn.Module], dataset: Dataset, batch_size: int = 512,
                      device: str | torch.device | None = None) -> float:
    """Accuracy of the ensemble that averages the models' softmax outputs.

    Parameters
    ----------
    models : sequence of torch.nn.Module
        Classifiers with the same number of outputs.
    dataset : torch.utils.data.Dataset
        Yields ``(input, label)``.
    batch_size : int, default=512
        Evaluation batch size.
    device : str or torch.device, optional
        Device to run on; ``None`` keeps each model's device.

    Returns
    -------
    float
        Accuracy in [0, 1] of ``argmax(mean_i softmax(model_i(x)))``.
    """
    if len(models) == 0:
        raise ValueError("need at least one model")
    probs, labels = None, None
    for m in models:
        logits, labels = _logits_and_labels(m, dataset, batch_size, device)
        p = logits.softmax(1)
        probs = p if probs is None else probs + p
    labels = _require_labels(labels)
    return (probs.argmax(1) == labels).float().mean().item()


# --------------------------------------------------------------------------
# checkpoints

_PLAIN = (type(None), bool, int, float, str, bytes, torch.Tensor, torch.Size)


def _plain(value: Any, where: str) -> Any:
    """Convert metadata to types that ``torch.load(weights_only=True)`` accepts."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, _PLAIN):
        return value.detach().cpu() if isinstance(value, torch.Tensor) else value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"metadata key {where}[{k!r}] must be str or int")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    raise TypeError(f"metadata {where} has type {type(value).__name__}; use plain "
                    "Python types (str, int, float, bool, None, list, tuple, dict) "
                    "or tensors so the file loads with torch.load(weights_only=True)")


def save_checkpoint(model: nn.Module | dict[str, torch.Tensor], path: str | os.PathLike,
                    **metadata: Any) -> Path:
    """Save a model's ``state_dict`` and metadata to one weights-only file.

    The file holds ``{"format": "skmerge.checkpoint", "version": 1,
    "state_dict": ..., "metadata": {...}}`` with CPU tensors and plain Python
    types only, so ``torch.load(path, weights_only=True)`` reads it. For
    models built by :func:`skmerge.models.get_model`, ``metadata`` gets an
    ``"architecture"`` entry (``{"name", "kwargs"}``) unless one is given,
    which :func:`load_model` uses to rebuild the model. The file is written
    atomically (a temporary file in the same folder, then renamed over
    ``path``), so an interrupted write leaves any previous file intact and no
    partial one; it gets the permissions of the umask, like any new file.

    Parameters
    ----------
    model : torch.nn.Module or dict
        Model, or a ``state_dict``.
    path : str or path-like
        Destination; parent folders are created.
    **metadata
        Extra plain-typed information (seed, epochs, accuracy, dataset, ...).

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    TypeError
        If a metadata value is not a plain type (the message names it).
    """
    from .models import architecture_of

    if isinstance(model, nn.Module):
        arch = architecture_of(model)
        if arch is not None:
            metadata.setdefault("architecture", arch)
        state = model.state_dict()
    else:
        state = model
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "state_dict": {k: v.detach().cpu().clone() for k, v in state.items()},
        "metadata": _plain(metadata, "metadata"),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        # mkstemp creates the file 0600; a checkpoint gets the mode any other
        # new file would (0666 less the umask).
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(mask)
    return mask


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None, *,
                    map_location: str | torch.device = "cpu", strict: bool = True
                    ) -> tuple[dict[str, torch.Tensor] | nn.Module, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint` (or a bare state_dict).

    Loading uses ``torch.load(weights_only=True)``: no code from the file runs.

    Parameters
    ----------
    path : str or path-like
        Checkpoint file. A file holding a plain ``state_dict`` (e.g. from
        ``torch.save(model.state_dict(), path)``) also works, with empty
        metadata.
    model : torch.nn.Module, optional
        If given, the weights are loaded into it and it is returned.
    map_location : str or torch.device, default="cpu"
        Where to put the tensors.
    strict : bool, default=True
        Passed to :meth:`torch.nn.Module.load_state_dict`.

    Returns
    -------
    state_dict_or_model : dict or torch.nn.Module
        The ``state_dict``, or ``model`` with the weights loaded.
    metadata : dict
        The metadata saved with it.
    """
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        state, metadata = obj["state_dict"], dict(obj.get("metadata", {}))
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, metadata = obj, {}
    else:
        raise ValueError(f"{path} is neither an skmerge checkpoint nor a state_dict")
    if model is None:
        return state, metadata
    model.load_state_dict(state, strict=strict)
    return model, metadata


def load_model(path: str | os.PathLike, *, map_location: str | torch.device = "cpu"
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load a model saved from :func:`skmerge.models.get_model`.

    Parameters
    ----------
    path : str or path-like
        Checkpoint written by :func:`save_checkpoint`.
    map_location : str or torch.device, default="cpu"
        Where to put the tensors.

    Returns
    -------
    model : torch.nn.Module
        The rebuilt model with its weights, in eval mode.
    metadata : dict
        The checkpoint's metadata.

    Raises
    ------
    ValueError
        If the checkpoint does not record its architecture.
    """
    from .models import get_model

    state, metadata = load_checkpoint(path, map_location=map_location)
    arch = metadata.get("architecture")
    if not isinstance(arch, dict) or "name" not in arch:
        raise ValueError(f"{path} does not record its architecture; build the model "
                         "yourself and call load_checkpoint(path, model)")
    model = get_model(arch["name"], **dict(arch.get("kwargs", {})))
    model.load_state_dict(state)
    return model.to(map_location).eval(), metadata
