"""Re-estimate BatchNorm running statistics of a model on data.

Averaging aligned weights shrinks and shifts the merged model's activations, so
the running statistics copied from the base models no longer describe them;
re-estimating them on data restores most of the accuracy (the default of CCA
Merge, ZipIt! and REPAIR-style pipelines).

The statistics computed here are exact population statistics: each layer gets
the mean and the (unbiased) variance, over all the samples and positions of
the data, of the inputs it receives in evaluation mode, i.e. when the layers
before it normalize with their own new statistics, as the model will at
inference. They are accumulated as float64 per-channel sums, so they do not
depend on how the data is cut into batches (a batch of one sample is fine) or
into ``torch.distributed`` shards (the sums are all-reduced).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ._batches import as_loader, iter_inputs, loader_length
from ._distributed import is_distributed

__all__ = ["has_batchnorm", "reset_bn_stats"]

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer that tracks running statistics."""
    return any(isinstance(m, _BN_TYPES) and m.track_running_stats for m in model.modules())


class _Reached(BaseException):
    """Ends a forward pass at the layer being measured (the rest is not needed).

    A BaseException, so that a model's own ``except Exception`` does not catch it.
    """


@torch.no_grad()
def reset_bn_stats(
    model: nn.Module,
    X,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    verbose: bool = False,
) -> nn.Module:
    """Recompute the running mean and variance of every BatchNorm layer, in place.

    Every layer that tracks running statistics gets the exact mean and
    unbiased variance (``n / (n - 1)`` times the biased one, as BatchNorm
    defines ``running_var``), over all samples and positions of ``X``, of its
    input in evaluation mode, where the layers before it already use their
    new statistics: what the model sees at inference. The layers' momentum
    plays no role, and ``num_batches_tracked`` is left as it is (it counts
    training batches; the result does not depend on batches).

    A layer's input depends on the statistics of the layers before it, so the
    layers are measured one after the other, in the order of the forward
    pass, with one pass over ``X`` each that stops at the measured layer
    (about ``(L + 1) / 2`` full forward passes for ``L`` layers in a chain).
    The per-channel sums of ``x`` and ``x^2`` (about the previous running mean,
    for accuracy) are float64, so the result does not depend on the batch
    sizes, and under ``torch.distributed`` the sums are all-reduced: every
    rank gets the statistics of all the ranks' data. A layer that the forward
    pass never calls keeps its statistics; a layer called several times per
    forward pass is measured at its first call.

    Parameters
    ----------
    model : torch.nn.Module
        Model whose BatchNorm layers are updated in place.
    X : torch.Tensor, numpy.ndarray, Dataset or DataLoader
        Data to estimate the statistics on (inputs, or batches of ``(x, y)``);
        read once per layer, so a loader must be re-iterable.
    batch_size : int, default=256
        Batch size when ``X`` is not a DataLoader (it does not change the result).
    device : torch.device or str, optional
        Device of the forward passes; the model's device by default.
    verbose : bool, default=False
        Show a progress bar.

    Returns
    -------
    torch.nn.Module
        ``model``, in evaluation mode.

    Raises
    ------
    ValueError
        If ``X`` is empty, or gives a layer a single value per channel (its
        variance is undefined), or the model's tensors are on the meta device.
    """
    layers = [m for m in model.modules() if isinstance(m, _BN_TYPES) and m.track_running_stats]
    if not layers:
        return model.eval()
    param = next(model.parameters(), None)
    reference = param if param is not None else layers[0].running_mean
    if reference.is_meta:
        raise ValueError("The model is on the meta device (no values): its BatchNorm statistics "
                         "cannot be computed. Materialize it first.")
    device = torch.device(device) if device is not None else reference.device
    dtype = reference.dtype if reference.is_floating_point() else torch.float32
    loader = as_loader(X, batch_size)
    model.eval()
    # Before the passes: the call order, from one batch (and a clear error on empty data).
    order = _call_order(model, layers, _first_inputs(loader, device, dtype))
    if order is None:
        raise ValueError("Cannot re-estimate BatchNorm statistics on empty data.")
    n_batches = loader_length(loader)
    progress = tqdm(total=None if n_batches is None else n_batches * len(order),
                    desc="BatchNorm statistics", disable=not verbose, leave=False)
    try:
        for layer in order:
            _measure(model, layer, loader, device, dtype, progress)
    finally:
        progress.close()
        model.eval()
    return model


def _first_inputs(loader, device, dtype) -> torch.Tensor | None:
    for inputs in iter_inputs(loader, device, dtype):
        if len(inputs):
            return inputs
    return None


def _call_order(model: nn.Module, layers: list, inputs: torch.Tensor | None) -> list | None:
    """The layers in the order the forward pass first calls them (never-called ones left out).

    None without data (on every rank: under torch.distributed a rank without
    data takes the order of the others).
    """
    order: list = []
    if inputs is not None:
        handles = [layer.register_forward_pre_hook(
            lambda module, _args: order.append(module) if module not in order else None)
            for layer in layers]
        try:
            model(inputs)
        finally:
            for handle in handles:
                handle.remove()
    if not is_distributed():
        return order if inputs is not None else None
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, None if inputs is None else [layers.index(m) for m in order])
    orders = [g for g in gathered if g is not None]
    if any(g != orders[0] for g in orders):
        raise ValueError("The ranks call the BatchNorm layers in different orders; every rank "
                         "must re-estimate the same model.")
    return [layers[i] for i in orders[0]] if orders else None


def _measure(model: nn.Module, layer, loader, device, dtype, progress) -> None:
    """One pass up to ``layer``: its exact statistics from float64 sums of its inputs."""
    shift = layer.running_mean.detach().to(device=device, dtype=torch.float64)
    channels = shift.numel()
    sums = torch.zeros(2 * channels + 1, dtype=torch.float64, device=device)

    def hook(_module, args):
        x = args[0].detach()
        if x.ndim < 2 or x.shape[1] != channels:
            raise ValueError(f"A BatchNorm layer of {channels} channels got an input of shape "
                             f"{tuple(x.shape)}.")
        axes = [0] + list(range(2, x.ndim))
        centered = x.to(torch.float64) - shift.view(1, -1, *([1] * (x.ndim - 2)))
        sums[:channels] += centered.sum(axes)
        sums[channels:2 * channels] += centered.square().sum(axes)
        sums[-1] += x.numel() // channels
        raise _Reached

    handle = layer.register_forward_pre_hook(hook)
    try:
        for inputs in iter_inputs(loader, device, dtype):
            progress.update()
            try:
                model(inputs)
            except _Reached:
                continue
    finally:
        handle.remove()
    if is_distributed():
        from ._distributed import all_reduce_sum_

        all_reduce_sum_(sums)
    n = float(sums[-1])
    if n < 2:
        raise ValueError(f"A BatchNorm layer of {channels} channels received {int(n)} value(s) per "
                         "channel in all the data: its variance needs at least 2 samples (or "
                         "positions).")
    offset = sums[:channels] / n
    variance = (sums[channels:2 * channels] - n * offset.square()).clamp_min(0.0) / (n - 1)
    layer.running_mean.copy_(shift + offset)
    layer.running_var.copy_(variance)
