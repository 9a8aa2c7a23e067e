"""REPAIR: renormalize the merged model's channels to the statistics of the aligned models.

Jordan, Sedghi, Saukh, Entezari and Neyshabur, "REPAIR: REnormalizing Permuted
Activations for Interpolation Repair", ICLR 2023. Averaging aligned networks
shrinks the variance of their hidden units ("variance collapse"): the merged
model's channels are weaker and shifted compared to those of the networks it
averages. REPAIR measures, on data, the mean and standard deviation of every
hidden channel in the aligned base models and in the merged model, and rescales
and shifts the merged model's channels so that their statistics become the
interpolation (with the merge weights) of the base models' ones. The
correction is folded into the layers' affine parameters, so the repaired model
has the same architecture and ``state_dict`` keys.

Repair points are the outputs of the layers whose channels the merger aligns
(the producers of a feature space, see :func:`skmerge.graph.find_spaces`), so
the network's outputs are never changed:

- a ``Conv1d/2d/3d`` or ``Linear`` layer feeding a normalization layer
  (BatchNorm, InstanceNorm, GroupNorm, LayerNorm) directly is repaired at the
  normalization layer's output, through its per-channel affine parameters;
- any other ``Conv``/``Linear`` layer is repaired at its own output, through
  its weight rows and bias (a layer without bias cannot be shifted: it is
  skipped with a warning, no parameter is added).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._batches import as_loader, iter_inputs, loader_length, split_batch
from ._distributed import all_reduce_sum_, is_distributed
from ._modes import evaluation_mode
from .graph import find_spaces
from .graph._apply import normalize_transforms

__all__ = ["repair_", "channel_maps_of", "RepairWarning"]

# Layers whose output channels are the rows of their weight (and bias).
_AFFINE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Normalization layers; _NormBase covers BatchNorm and InstanceNorm.
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class RepairWarning(UserWarning):
    """Some layers of the merged model could not be repaired."""


@dataclass
class _Point:
    """One repaired layer output."""

    module: str          # module path
    n_channels: int
    channels: torch.Tensor  # indices of the channels to repair (those the spaces align)
    kind: str            # "affine" (Conv/Linear rows + bias) or "norm" (per-channel affine)

    def axis(self, module: nn.Module, output: torch.Tensor) -> int:
        """Channel axis of an output of this layer."""
        if isinstance(module, (nn.Linear, nn.LayerNorm)):
            return output.ndim - 1
        if isinstance(module, _AFFINE_TYPES):  # convolutions: (N,) C, *spatial
            return output.ndim - len(module.kernel_size) - 1
        return 1 if output.ndim > 1 else 0  # BatchNorm, InstanceNorm, GroupNorm: (N, C, ...)


class _Moments:
    """Streaming per-channel count, mean and sum of squared deviations (float64, Chan's update)."""

    def __init__(self, n_channels: int, device: torch.device):
        self.n = 0
        self.mean = torch.zeros(n_channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(n_channels, dtype=torch.float64, device=device)

    def add(self, count: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        if count == 0:
            return
        total = self.n + count
        delta = mean - self.mean
        self.mean += delta * (count / total)
        self.m2 += var * count + delta.square() * (self.n * count / total)
        self.n = total

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / max(self.n, 1)


def _batch_moments(output: torch.Tensor, axis: int, n_channels: int, stats_device):
    """Per-channel ``(count, mean, biased variance)`` of one layer output, in float64."""
    y = output.detach()
    if y.ndim == 1:
        y = y.unsqueeze(0)
        axis = 1
    if y.shape[axis] != n_channels:
        raise ValueError(f"expected {n_channels} channels on axis {axis}, got shape {tuple(y.shape)}")
    count = y.numel() // n_channels
    if count == 0:
        return 0, None, None
    dims = tuple(d for d in range(y.ndim) if d != axis)
    var, mean = torch.var_mean(y.to(device=stats_device, dtype=torch.float64), dim=dims, correction=0)
    return count, mean, var


def _correction(mean, var, target_mean, target_std, channels, eps):
    """Per-channel ``(scale, shift)`` mapping ``(mean, var)`` to ``(target_mean, target_std)``.

    ``scale = sqrt((target_std**2 + delta) / (var + delta))`` with ``delta =
    eps * mean(target_std**2)`` over the repaired channels (a guard relative to
    the layer's scale), ``shift = target_mean - mean * scale``; channels
    outside ``channels`` keep ``(1, 0)``, and so does a channel whose merged
    and target variances are both zero.
    """
    channels = channels.to(var.device)
    target_var = target_std.square()
    delta = eps * target_var[channels].mean() if len(channels) else var.new_zeros(())
    denominator = var + delta
    safe = denominator > 0
    scale = torch.where(safe, torch.sqrt((target_var + delta) / torch.where(safe, denominator, 1.0)),
                        torch.ones_like(var))
    shift = target_mean - mean * scale
    keep = torch.ones_like(var, dtype=torch.bool)
    keep[channels] = False
    scale = torch.where(keep, torch.ones_like(scale), scale)
    shift = torch.where(keep, torch.zeros_like(shift), shift)
    return scale, shift


def _target(moments, weights):
    """Interpolated ``(mean, std)`` of the aligned models: ``sum_k w_k mean_k``, ``sum_k w_k std_k``."""
    mean = sum(w * m for w, (m, _) in zip(weights, moments))
    std = sum(w * v.clamp_min(0).sqrt() for w, (_, v) in zip(weights, moments))
    return mean, std


# ----------------------------------------------------------------------------- points
def _per_channel_affine(module: nn.Module) -> bool:
    """Whether a normalization layer has a weight and a bias of one entry per channel."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor):
        return False
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
        return False
    return weight.ndim == 1 and bias.ndim == 1


@torch.no_grad()
def _find_repair_points(model: nn.Module, example, spaces) -> tuple[list[_Point], list[str]]:
    """The layer outputs to repair, and a description of those that cannot be.

    Only modules whose output channels are producers of a feature space are
    considered (the network's outputs belong to no space). A Conv/Linear whose
    output enters a normalization layer directly (seen on ``example``) is left
    to that layer.
    """
    modules = dict(model.named_modules())
    channels_of: dict[str, set] = {}
    for space in spaces:
        for piece in space.producers:
            path = piece.name.rpartition(".")[0]
            module = modules.get(path)
            if not isinstance(module, _AFFINE_TYPES + _NORM_TYPES) or piece.axis != 0:
                continue
            channels = channels_of.setdefault(path, set())
            if piece.index.shape[1] == 1:  # one position per channel (else not a per-channel layer)
                channels.update(int(c) for c in piece.index[:, 0])

    # Which Conv/Linear outputs enter a normalization layer directly.
    outputs: dict[str, list] = {p: [] for p, m in modules.items()
                                if p in channels_of and isinstance(m, _AFFINE_TYPES)}
    norm_inputs: dict[str, list] = {p: [] for p, m in modules.items() if isinstance(m, _NORM_TYPES)}
    handles = []
    try:
        for path in outputs:
            handles.append(modules[path].register_forward_hook(
                lambda _m, _a, out, _p=path: outputs[_p].append(out)))
        for path in norm_inputs:
            handles.append(modules[path].register_forward_pre_hook(
                lambda _m, args, _p=path: norm_inputs[_p].append(args[0] if args else None)))
        model(example)
    finally:
        for handle in handles:
            handle.remove()
    feeds = {}
    for path, tensors in outputs.items():
        for norm, inputs in norm_inputs.items():
            if any(t is i for t in tensors for i in inputs):
                feeds[path] = norm
                break

    points, skipped = [], []
    for path, module in modules.items():  # model order
        if path not in channels_of:
            continue
        channels = torch.tensor(sorted(channels_of[path]), dtype=torch.long)
        if isinstance(module, _AFFINE_TYPES):
            if path in feeds:
                norm = feeds[path]
                if not _per_channel_affine(modules[norm]):
                    skipped.append(f"{path!r} (feeds {norm!r}, a {type(modules[norm]).__name__} "
                                   "without per-channel affine weight and bias)")
                continue  # repaired at the normalization layer's output
            if module.bias is None:
                skipped.append(f"{path!r} (no bias and no normalization layer after it)")
                continue
            points.append(_Point(path, int(module.weight.shape[0]), channels, "affine"))
        elif _per_channel_affine(module):
            points.append(_Point(path, int(module.weight.shape[0]), channels, "norm"))
        elif path not in feeds.values():
            skipped.append(f"{path!r} (a {type(module).__name__} without per-channel affine "
                           "weight and bias)")
    return points, skipped


# ----------------------------------------------------------------------------- helpers
def _normalized(weights, n_models: int) -> np.ndarray:
    if weights is None:
        return np.full(n_models, 1.0 / n_models)
    weights = np.asarray(weights, dtype=float)
    if weights.shape != (n_models,):
        raise ValueError(f"weights must have one entry per aligned model ({n_models}), "
                         f"got shape {weights.shape}.")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and sum to a positive value, got {weights}.")
    return weights / weights.sum()


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" (the current device) and "cuda:0" name the same device for our purpose.
    return a == b or (a.type == b.type == "cuda" and (a.index is None or b.index is None))


def _validated(merged_model, aligned_models) -> list[nn.Module]:
    if not isinstance(merged_model, nn.Module):
        raise TypeError(f"merged_model must be a torch.nn.Module, got {type(merged_model).__name__}.")
    if isinstance(aligned_models, nn.Module) or not isinstance(aligned_models, Sequence):
        raise TypeError("aligned_models must be a list or tuple of torch.nn.Module objects, "
                        f"got {type(aligned_models).__name__}.")
    aligned_models = list(aligned_models)
    if not aligned_models:
        raise ValueError("repair_ needs at least one aligned model.")
    keys = merged_model.state_dict().keys()
    for k, model in enumerate(aligned_models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"aligned_models[{k}] is a {type(model).__name__}, not a torch.nn.Module.")
        if type(model) is not type(merged_model) or model.state_dict().keys() != keys:
            raise ValueError(f"aligned_models[{k}] does not have the architecture of merged_model "
                             "(class and state_dict keys must match).")
    return aligned_models


def _all_reduce_moments(moments: list[_Moments]) -> None:
    """Under torch.distributed, make every rank hold the moments of all ranks' data (in place).

    Two float64 all-reduces: the counts and count-weighted means give the
    global means ``c``; then each rank's squared deviations re-centred on
    ``c`` (``m2 + n (mean - c)**2``) are summed. Identical on every rank.
    """
    if not is_distributed() or not moments:
        return
    device = moments[0].mean.device
    counts = torch.tensor([float(m.n) for m in moments], dtype=torch.float64, device=device)
    packed = all_reduce_sum_(torch.cat([counts] + [m.mean * m.n for m in moments]))
    totals, offset, centres = packed[:len(moments)], len(moments), []
    for m, total in zip(moments, totals):
        size = m.mean.numel()
        centres.append(packed[offset:offset + size] / total if total > 0 else torch.zeros_like(m.mean))
        offset += size
    recentred = all_reduce_sum_(torch.cat([m.m2 + m.n * (m.mean - c).square()
                                           for m, c in zip(moments, centres)]))
    offset = 0
    for m, c, total in zip(moments, centres, totals):
        size = m.mean.numel()
        m.n, m.mean, m.m2 = int(total.item()), c, recentred[offset:offset + size].clone()
        offset += size


@torch.no_grad()
def _fold(module: nn.Module, point: _Point, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Apply ``y -> y * scale + shift`` per output channel to the layer's parameters."""
    weight, bias = module.weight, module.bias
    view = (-1,) + (1,) * (weight.ndim - 1)
    weight.mul_(scale.to(weight.device, weight.dtype).reshape(view))
    bias.copy_(bias * scale.to(bias.device, bias.dtype) + shift.to(bias.device, bias.dtype))


# ----------------------------------------------------------------------------- public
@torch.no_grad()
def repair_(
    merged_model: nn.Module,
    aligned_models: Sequence[nn.Module],
    weights,
    X,
    *,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    spaces=None,
    eps: float = 1e-5,
    channel_maps: Sequence[dict | None] | None = None,
    verbose: bool = False,
) -> nn.Module:
    """Renormalize the merged model's hidden channels to the aligned models' statistics (REPAIR), in place.

    For every repair point (see Notes) and every output channel ``c``, let
    ``(m, s)`` be the mean and standard deviation of the merged model's
    channel over ``X`` (all samples and positions; every call of a layer that
    is called several times), and ``(m_k, s_k)`` those of the aligned model
    ``k`` at the same point. The target is the interpolation with the merge
    weights, ``mt = sum_k w_k m_k`` and ``st = sum_k w_k s_k``, and the
    channel becomes ``y -> (y - m) * scale + mt`` with ``scale = st / s``
    (guarded, see ``eps``), folded into the layer's parameters::

        weight[c] *= scale
        bias[c]    = (bias[c] - m) * scale + mt

    (for a normalization layer: its affine ``weight`` and ``bias``, acting on
    its output in evaluation mode). When the merged channel already has the
    target statistics, e.g. merging a model with a permuted copy of itself,
    the correction is the identity up to rounding.

    Statistics are streamed (float64 sums, no activation is stored) in one
    pass over ``X`` that runs every aligned model and the merged model on each
    batch. So that a point sees the repaired outputs of the points before it,
    the merged model's outputs are corrected on the fly during the pass, batch
    by batch (like BatchNorm in training mode: with the batch's statistics of
    the merged and the aligned models); the folded correction uses the
    statistics of all of ``X``. With one batch the repaired model matches the
    targets exactly; with several, closely (the upstream corrections differ
    slightly from batch to batch). Under :mod:`torch.distributed` each rank
    passes its shard and the statistics are all-reduced: every rank builds the
    identical model, and the result equals that of one process seeing the
    same batches.

    Parameters
    ----------
    merged_model : torch.nn.Module
        The averaged model; its parameters are modified in place (it is moved
        to ``device`` and left in evaluation mode). Its BatchNorm running
        statistics should already describe its activations
        (:func:`skmerge.batchnorm.reset_bn_stats`, which
        :class:`~skmerge.ModelMerger` runs before repairing).
    aligned_models : sequence of torch.nn.Module
        The base models expressed in the merged model's feature basis (same
        class and ``state_dict`` keys), e.g. the merger's
        :meth:`~skmerge.ModelMerger.aligned_state_dicts` loaded into copies of
        the model. Not modified (run in evaluation mode, modes restored).
    weights : array-like of shape (n_models,) or None
        The merge weights (non-negative, normalized to sum to one); uniform
        when None.
    X : torch.Tensor, numpy.ndarray, Dataset or DataLoader
        Data to measure the statistics on (inputs, or batches of ``(x, y)``),
        typically the alignment data.
    batch_size : int, default=128
        Batch size when ``X`` is not a DataLoader.
    device : torch.device or str, optional
        Device of the forward passes; the merged model's device when None.
    spaces : list of skmerge.graph.Space, optional
        Feature spaces of the model (``ModelMerger.spaces_``); found with
        :func:`skmerge.graph.find_spaces` on the first batch when None (pass
        them for models torch.fx cannot trace).
    eps : float, default=1e-5
        Guard for channels that are (nearly) constant in the merged model:
        ``scale = sqrt((st**2 + delta) / (s**2 + delta))`` with ``delta = eps *
        mean_c(st_c**2)`` over the layer's repaired channels. Unlike
        BatchNorm's absolute ``eps`` this is relative to the layer's scale, so
        channels of any magnitude reach their target to a relative error of
        about ``eps * mean(st**2) / s**2``, while a dead merged channel is
        amplified by at most about ``sqrt(1 / eps)`` (times its target std
        relative to the layer's) instead of without bound.
    channel_maps : sequence of dict or None, optional
        One entry per model of ``aligned_models``: None, or a dict from a
        repaired module's path to a ``(C, C)`` matrix ``T``; that model's
        target at that module is then the statistics of its output mapped
        into the merged basis, ``output @ T`` along the channel axis, instead
        of the output itself. This repairs against the base models as
        trained (pass them as ``aligned_models``, with ``T`` the map of
        their channels, see :func:`channel_maps_of`) when the alignment is not a
        permutation: a dense map does not commute with the nonlinearities,
        so a base model with transformed weights no longer computes its
        features, and its statistics are not those of the features it had.
    verbose : bool, default=False
        Show a progress bar.

    Returns
    -------
    torch.nn.Module
        ``merged_model``, repaired, in evaluation mode.

    Raises
    ------
    ValueError
        If ``X`` is empty, the aligned models do not match ``merged_model``,
        the weights are invalid, or an activation is not finite.

    Warns
    -----
    RepairWarning
        Once, naming the layers that cannot be repaired: a Conv/Linear layer
        without bias and without a normalization layer after it (it cannot be
        shifted, and no parameter is added), a normalization layer without
        per-channel affine parameters, or a layer never called on ``X``.

    Notes
    -----
    Repair points are the outputs of the layers whose channels belong to a
    feature space (the producers of ``spaces``), never a network output. A
    ``Conv``/``Linear`` layer whose output enters a BatchNorm (or GroupNorm,
    InstanceNorm, 1-D LayerNorm) layer directly is repaired at that layer's
    output, through its affine parameters; other ``Conv``/``Linear`` layers at
    their own output. Only the channels of the spaces are changed.

    A layer called several times (shared weights) gets one correction for
    all its calls, from the statistics of all calls pooled; during the pass
    each call is corrected with its own batch statistics, so the pooled
    targets are matched only approximately there.

    The targets come from ``aligned_models``: after a permutation they
    compute exactly the base models' functions. After a dense mapping (CCA,
    Procrustes) a model with transformed weights does not (its
    nonlinearities act on mixed channels); with ``channel_maps`` the targets
    are the base models' own outputs mapped into the merged basis, which
    is what :class:`~skmerge.ModelMerger` does for dense maps.

    Examples
    --------
    >>> import copy, torch
    >>> from skmerge.repair import repair_
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> other = copy.deepcopy(net)
    >>> _ = torch.nn.init.normal_(other[0].weight)
    >>> merged = copy.deepcopy(net)
    >>> merged.load_state_dict({k: (v + other.state_dict()[k]) / 2 for k, v in net.state_dict().items()})
    <All keys matched successfully>
    >>> x = torch.randn(500, 4)
    >>> merged = repair_(merged, [net, other], None, x, batch_size=500)
    >>> target = (net[0](x).std(0, unbiased=False) + other[0](x).std(0, unbiased=False)) / 2
    >>> torch.allclose(merged[0](x).std(0, unbiased=False), target, rtol=1e-3)
    True
    """
    aligned_models = _validated(merged_model, aligned_models)
    weights = [float(w) for w in _normalized(weights, len(aligned_models))]
    channel_maps = _validated_maps(channel_maps, len(aligned_models))
    eps = float(eps)
    if not eps >= 0:
        raise ValueError(f"eps must be non-negative, got {eps!r}.")
    device = torch.device(device) if device is not None else _device_of(merged_model)
    stats_device = torch.device("cpu") if device.type == "mps" else device  # no float64 on MPS
    merged_model.to(device)
    aligned_models = [m if _same_device(_device_of(m), device) else copy.deepcopy(m).to(device)
                      for m in aligned_models]
    dtype = next(merged_model.parameters()).dtype
    loader = as_loader(X, batch_size)
    example = _first_inputs(loader, device, dtype)

    merged_model.eval()
    try:
        with evaluation_mode(aligned_models):
            if spaces is None:
                spaces = find_spaces(merged_model, example)
            points, skipped = _find_repair_points(merged_model, example, spaces)
            if not points:
                _warn_skipped(skipped)
                return merged_model
            maps = _maps_of_points(channel_maps, points, device, dtype)
            repair_pass = _StreamingRepair(points, len(aligned_models), weights, eps, stats_device, maps)
            batches = tqdm(iter_inputs(loader, device, dtype), total=loader_length(loader),
                           desc="REPAIR statistics", disable=not verbose, leave=False)
            if repair_pass.run(merged_model, aligned_models, batches) == 0:
                raise ValueError("REPAIR got empty data X.")
    finally:
        merged_model.eval()
    repair_pass.fold(merged_model, skipped)
    _warn_skipped(skipped)
    return merged_model


class _StreamingRepair:
    """REPAIR's one pass over the data, then the correction folded into the merged model.

    Forward hooks collect the per-channel moments of every repair point in the
    aligned models (the targets) and in the merged model. The merged model's
    outputs are corrected on the fly with this batch's statistics, so that each
    point sees repaired inputs; :meth:`fold` then writes the correction from
    the statistics of all the data (all-reduced under torch.distributed).
    """

    def __init__(self, points: list, n_models: int, weights: list, eps: float,
                 stats_device: torch.device, maps: list | None = None) -> None:
        self.points, self.weights, self.eps, self.stats_device = points, weights, eps, stats_device
        # maps[k][i]: the (C, C) map of model k's output at point i into the merged basis, or None
        self.maps = maps if maps is not None else [[None] * len(points) for _ in range(n_models)]
        self.targets = [[_Moments(p.n_channels, stats_device) for p in points] for _ in range(n_models)]
        self.merged = [_Moments(p.n_channels, stats_device) for p in points]
        # This batch's (mean, var) of every call: calls[k][i] for aligned model k, point i.
        self.calls: list[list[list]] = []
        self.merged_calls = [0] * len(points)

    def _observe(self, k: int, i: int, point):
        def hook(module, _args, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"REPAIR expects a tensor output from {point.module!r}.")
            axis = point.axis(module, output)
            if self.maps[k][i] is not None:
                output, axis = _mapped(output, axis, self.maps[k][i]), 1  # (rows, channels)
            count, mean, var = _batch_moments(output, axis, point.n_channels, self.stats_device)
            _check_finite(mean, var, point, f"aligned model {k}")
            self.targets[k][i].add(count, mean, var)
            self.calls[k][i].append((mean, var))
        return hook

    def _renormalize(self, i: int, point):
        def hook(module, _args, output):
            axis = point.axis(module, output)
            count, mean, var = _batch_moments(output, axis, point.n_channels, self.stats_device)
            _check_finite(mean, var, point, "the merged model")
            self.merged[i].add(count, mean, var)
            call = self.merged_calls[i]
            self.merged_calls[i] += 1
            if count == 0:
                return None
            try:
                observed = [calls[i][call] for calls in self.calls]
            except IndexError:
                raise RuntimeError(f"{point.module!r} was called more often in the merged model "
                                   "than in the aligned models.") from None
            target_mean, target_std = _target(observed, self.weights)
            scale, shift = _correction(mean, var, target_mean, target_std, point.channels, self.eps)
            shape = [1] * output.ndim
            shape[axis] = -1
            return (output * scale.to(output.device, output.dtype).reshape(shape)
                    + shift.to(output.device, output.dtype).reshape(shape))
        return hook

    def run(self, merged_model: nn.Module, aligned_models: list, batches) -> int:
        """Stream ``batches`` through every model; return the number of samples seen."""
        handles = []
        try:
            for k, model in enumerate(aligned_models):
                for i, point in enumerate(self.points):
                    handles.append(model.get_submodule(point.module).register_forward_hook(
                        self._observe(k, i, point)))
            for i, point in enumerate(self.points):
                handles.append(merged_model.get_submodule(point.module).register_forward_hook(
                    self._renormalize(i, point)))
            n_seen = 0
            for inputs in batches:
                self.calls = [[[] for _ in self.points] for _ in aligned_models]
                self.merged_calls = [0] * len(self.points)
                for model in aligned_models:
                    model(inputs)
                merged_model(inputs)
                n_seen += len(inputs)
            return n_seen
        finally:
            for handle in handles:
                handle.remove()

    def fold(self, merged_model: nn.Module, skipped: list) -> None:
        """Fold the correction from all the data into the merged model's parameters."""
        _all_reduce_moments([m for row in self.targets for m in row] + self.merged)
        for i, point in enumerate(self.points):
            if self.merged[i].n == 0:
                skipped.append(f"{point.module!r} (never called on X)")
                continue
            target_mean, target_std = _target([(row[i].mean, row[i].var) for row in self.targets],
                                              self.weights)
            scale, shift = _correction(self.merged[i].mean, self.merged[i].var, target_mean, target_std,
                                       point.channels, self.eps)
            _fold(merged_model.get_submodule(point.module), point, scale, shift)


def _mapped(output: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """``output`` with its channel axis multiplied by ``matrix``, channels last."""
    y = output.detach()
    if y.ndim == 1:
        y = y.unsqueeze(0)
        axis = 1
    y = y.movedim(axis, -1)
    if y.shape[-1] != matrix.shape[0]:
        raise ValueError(f"a channel map of shape {tuple(matrix.shape)} does not fit an output with "
                         f"{y.shape[-1]} channels")
    if y.dtype in (torch.float16, torch.bfloat16):
        y = y.float()  # the product of a half-precision output in float32: its moments are float64 anyway
    return y.reshape(-1, y.shape[-1]) @ matrix.to(y.device, y.dtype)


def _validated_maps(channel_maps, n_models: int) -> list:
    if channel_maps is None:
        return [None] * n_models
    if isinstance(channel_maps, dict) or not isinstance(channel_maps, Sequence):
        raise TypeError("channel_maps must be a list with one dict (or None) per aligned model, "
                        f"got {type(channel_maps).__name__}.")
    channel_maps = list(channel_maps)
    if len(channel_maps) != n_models:
        raise ValueError(f"channel_maps has {len(channel_maps)} entries for {n_models} aligned models.")
    for k, maps in enumerate(channel_maps):
        if maps is not None and not isinstance(maps, dict):
            raise TypeError(f"channel_maps[{k}] must be a dict or None, got {type(maps).__name__}.")
    return channel_maps


def _maps_of_points(channel_maps: list, points: list, device: torch.device, dtype: torch.dtype) -> list:
    """``maps[k][i]``: model ``k``'s map at point ``i`` on ``device``, or None.

    Converted once, to the precision the outputs are multiplied in (float64
    for float64 models, float32 otherwise), not once per batch.
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    maps = []
    for k, by_module in enumerate(channel_maps):
        row = []
        for point in points:
            matrix = None if by_module is None else by_module.get(point.module)
            if matrix is not None:
                matrix = torch.as_tensor(matrix)
                if tuple(matrix.shape) != (point.n_channels, point.n_channels):
                    raise ValueError(f"channel_maps[{k}][{point.module!r}] has shape {tuple(matrix.shape)}, "
                                     f"expected ({point.n_channels}, {point.n_channels}).")
                if not matrix.is_floating_point() or not bool(torch.isfinite(matrix).all()):
                    raise ValueError(f"channel_maps[{k}][{point.module!r}] must be a finite float matrix.")
                matrix = matrix.to(device=device, dtype=work)
            row.append(matrix)
        maps.append(row)
    return maps


def channel_maps_of(model: nn.Module, spaces, transforms) -> dict:
    """The map of each producer module's output channels into the aligned basis.

    For every module whose output channels (axis 0 of its parameters) belong
    to a feature space, the ``(C, C)`` matrix ``T`` with ``output @ T`` equal
    to that output expressed in the aligned basis: the space's ``mapping`` on
    its channels, the identity on channels of no space. This is what
    ``repair_(..., channel_maps=...)`` needs to take its targets from a base
    model as trained.

    Parameters
    ----------
    model : torch.nn.Module
        The base model (only its modules' shapes are read).
    spaces : list of skmerge.graph.Space
    transforms : sequence
        One per space, as for :func:`skmerge.graph.apply_transforms`: None,
        a permutation, or a pair ``(mapping, inverse_mapping)``.

    Returns
    -------
    dict of str to torch.Tensor
        Module path to float64 matrix (CPU).
    """
    modules = dict(model.named_modules())
    maps: dict[str, torch.Tensor] = {}
    for space, op in zip(spaces, normalize_transforms(spaces, transforms)):
        if op is None:
            continue
        mapping = op[1].to(torch.float64) if op[0] == "pair" else _permutation_matrix(op[1])
        seen = set()
        for piece in space.producers:
            path = piece.name.rpartition(".")[0]
            module = modules.get(path)
            if path in seen or piece.axis != 0 or piece.index.shape[1] != 1 \
                    or not isinstance(module, _AFFINE_TYPES + _NORM_TYPES):
                continue
            seen.add(path)
            if path not in maps:
                n_channels = int(module.weight.shape[0])
                maps[path] = torch.eye(n_channels, dtype=torch.float64)
            index = piece.index[:, 0].cpu()
            maps[path][index.unsqueeze(1), index.unsqueeze(0)] = mapping.cpu()
    return maps


def _permutation_matrix(perm: torch.Tensor) -> torch.Tensor:
    """The mapping of a permutation: ``mapping[perm[j], j] = 1``."""
    d = perm.numel()
    matrix = torch.zeros(d, d, dtype=torch.float64)
    matrix[perm, torch.arange(d)] = 1.0
    return matrix


def _first_inputs(loader, device, dtype) -> torch.Tensor:
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise ValueError("REPAIR got empty data X.") from None
    inputs = torch.as_tensor(split_batch(batch)[0])
    if len(inputs) == 0:
        raise ValueError("REPAIR got empty data X.")
    inputs = inputs[:2]
    return inputs.to(device, dtype) if inputs.is_floating_point() else inputs.to(device)


def _check_finite(mean, var, point: _Point, where: str) -> None:
    if mean is not None and not bool(torch.isfinite(mean).all() and torch.isfinite(var).all()):
        raise ValueError(f"Non-finite activations (NaN or inf) at {point.module!r} of {where}; "
                         "check the models' weights and the data.")


def _warn_skipped(skipped: list[str]) -> None:
    if skipped:
        warnings.warn("REPAIR left these layers unchanged: " + "; ".join(skipped)
                      + ". Their channels keep the merged model's statistics.",
                      RepairWarning, stacklevel=3)
