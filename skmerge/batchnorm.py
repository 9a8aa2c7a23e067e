"""Re-estimate BatchNorm running statistics of a model on data.

Averaging aligned weights shrinks and shifts the merged model's activations, so
the running statistics copied from the base models no longer describe them;
re-estimating them on data restores most of the accuracy (the default of CCA
Merge, ZipIt! and REPAIR-style pipelines).

The statistics computed here are population statistics: each layer gets the
mean and the (unbiased) variance, over all the samples and positions of the
data, of the inputs it receives in evaluation mode, i.e. when the layers
before it normalize with their own new statistics, as the model will at
inference. They are accumulated as float64 per-channel sums (all-reduced
under ``torch.distributed``), so a batch of one sample is fine.

Two passes by default: the first normalizes every layer with its batch's
statistics, as training mode does, and estimates all layers at once; the
second measures every layer in evaluation mode with the layers before it
using those estimates. ``exact=True`` measures the layers one after the
other instead (about ``(L + 1) / 2`` forward passes for ``L`` layers): the
result is then exactly the fixed point, independent of the batches and of the
shards to the last float rounding; the two-pass result differs from it by
what one pass of batch normalization upstream changes (measured on the
benchmarks page).
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
    exact: bool = False,
) -> nn.Module:
    """Recompute the running mean and variance of every BatchNorm layer, in place.

    Every layer that tracks running statistics gets the exact mean and
    unbiased variance (``n / (n - 1)`` times the biased one, as BatchNorm
    defines ``running_var``), over all samples and positions of ``X``, of its
    input in evaluation mode, where the layers before it already use their
    new statistics: what the model sees at inference. The layers' momentum
    plays no role, and ``num_batches_tracked`` is left as it is (it counts
    training batches; the result does not depend on batches).

    A layer's input depends on the statistics of the layers before it. By
    default two passes over ``X`` estimate them (the first with batch
    statistics upstream, as in training mode; the second in evaluation mode,
    every layer measured at once given the first pass's estimates).
    ``exact=True`` measures the layers one after the other, in the order of
    the forward pass, with one pass over ``X`` each that stops at the
    measured layer (about ``(L + 1) / 2`` full forward passes for ``L``
    layers in a chain), which makes the result independent of the batches.
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
    exact : bool, default=False
        Measure the layers one after the other (the exact evaluation-mode
        statistics, ``(L + 1) / 2`` passes) instead of in two passes.

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
    passes = len(order) if exact else 2
    progress = tqdm(total=None if n_batches is None else n_batches * passes,
                    desc="BatchNorm statistics", disable=not verbose, leave=False)
    try:
        if exact:
            for layer in order:
                _measure(model, [layer], loader, device, dtype, progress, stop=True)
        else:
            _measure(model, order, loader, device, dtype, progress, batch_statistics=True)
            _measure(model, order, loader, device, dtype, progress)
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


def _measure(model: nn.Module, layers: list, loader, device, dtype, progress, stop: bool = False,
             batch_statistics: bool = False) -> None:
    """One pass over the data: float64 sums of the inputs of ``layers``, then their statistics.

    ``stop``: end each forward pass at the (single) measured layer.
    ``batch_statistics``: normalize each batch with its own statistics as it
    passes a layer (training mode's normalization, without touching the
    running statistics); a batch with one value per channel is normalized
    with the running statistics instead.
    """
    sums = {}
    for layer in layers:
        shift = layer.running_mean.detach().to(device=device, dtype=torch.float64)
        sums[layer] = (shift, torch.zeros(2 * shift.numel() + 1, dtype=torch.float64, device=device))

    def add(module, x, mean, var):
        """Per-batch mean and biased variance (one fused kernel) into the float64 sums."""
        shift, acc = sums[module]
        channels = shift.numel()
        n = x.numel() // channels
        delta = mean.to(torch.float64) - shift
        acc[:channels] += n * delta
        acc[channels:2 * channels] += n * (var.to(torch.float64) + delta.square())
        acc[-1] += n

    def checked(module, x):
        channels = sums[module][0].numel()
        if x.ndim < 2 or x.shape[1] != channels:
            raise ValueError(f"A BatchNorm layer of {channels} channels got an input of shape "
                             f"{tuple(x.shape)}.")
        return [0] + list(range(2, x.ndim))

    def stats(module, x):
        """Batch mean and biased variance; BatchNorm's own kernel is the fastest reduction."""
        axes = checked(module, x)
        if x.numel() // x.shape[1] <= 1 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32,
                                                            torch.float64):
            var, mean = torch.var_mean(x, dim=axes, correction=0)
            return None, mean, var
        out, mean, invstd = torch.ops.aten.native_batch_norm(
            x, module.weight, module.bias, None, None, True, 0.0, module.eps)
        return out, mean, (invstd.to(torch.float64).pow(-2) - module.eps).clamp_min(0.0)

    def measure(module, args):
        x = args[0].detach()
        _, mean, var = stats(module, x)
        add(module, x, mean, var)
        if stop:
            raise _Reached

    def normalize(module, args, out):
        x = args[0].detach()
        normalized, mean, var = stats(module, x)
        add(module, x, mean, var)
        # without batch statistics (one value per channel) the running ones normalize
        return out if normalized is None else normalized

    handles = [layer.register_forward_hook(normalize) if batch_statistics
               else layer.register_forward_pre_hook(measure) for layer in layers]
    try:
        for inputs in iter_inputs(loader, device, dtype):
            progress.update()
            try:
                model(inputs)
            except _Reached:
                continue
    finally:
        for handle in handles:
            handle.remove()
    for layer in layers:
        shift, acc = sums[layer]
        _set_statistics(layer, shift, acc)


def _set_statistics(layer, shift: torch.Tensor, sums: torch.Tensor) -> None:
    channels = shift.numel()
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
