"""Re-estimate BatchNorm running statistics of a model on data.

Averaging aligned weights shrinks and shifts the merged model's activations, so
the running statistics copied from the base models no longer describe them;
re-estimating them on a few batches of data restores most of the accuracy
(the default of CCA Merge, ZipIt! and REPAIR-style pipelines).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ._batches import as_loader, iter_inputs
from ._distributed import is_distributed

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer that tracks running statistics."""
    return any(isinstance(m, _BN_TYPES) and m.track_running_stats for m in model.modules())


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

    The statistics become the average of the per-batch statistics over all
    batches of ``X`` (cumulative moving average, ``momentum=None``), whatever
    the layers' momentum; only BatchNorm layers run in training mode, so
    dropout stays off. Batches of equal size weigh every sample equally.

    Parameters
    ----------
    model : torch.nn.Module
        Model whose BatchNorm layers are updated in place.
    X : torch.Tensor, numpy.ndarray, Dataset or DataLoader
        Data to estimate the statistics on (inputs, or batches of ``(x, y)``).
    batch_size : int, default=256
        Batch size when ``X`` is not a DataLoader.
    device : torch.device or str, optional
        Device of the forward passes; the model's device by default.
    verbose : bool, default=False
        Show a progress bar.

    Returns
    -------
    torch.nn.Module
        ``model``, in evaluation mode.
    """
    layers = [m for m in model.modules() if isinstance(m, _BN_TYPES) and m.track_running_stats]
    if not layers:
        return model.eval()
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    saved_momentum = [m.momentum for m in layers]
    model.eval()
    try:
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None
            layer.train()
        loader = as_loader(X, batch_size)
        seen = 0
        for inputs in tqdm(iter_inputs(loader, device, param.dtype), total=len(loader),
                           desc="BatchNorm statistics", disable=not verbose, leave=False):
            model(inputs)
            seen += len(inputs)
        if seen == 0:
            raise ValueError("Cannot re-estimate BatchNorm statistics on empty data.")
        _average_over_ranks(layers)
    finally:
        for layer, momentum in zip(layers, saved_momentum):
            layer.momentum = momentum
        model.eval()
    return model


def _average_over_ranks(layers) -> None:
    """Under torch.distributed, make every rank hold the average over all ranks' batches.

    With ``momentum=None`` every layer holds the mean of its per-batch
    statistics and ``num_batches_tracked`` counts the batches, so the
    batch-count-weighted mean over ranks is exactly what one process would
    compute on all the batches. One float64 all-reduce for all layers; every
    rank ends with identical buffers. A rank without batches contributes zero.
    """
    if not is_distributed():
        return
    from ._distributed import all_reduce_sum_

    pieces = []
    for layer in layers:
        batches = layer.num_batches_tracked.to(torch.float64)
        pieces += [layer.running_mean.to(torch.float64) * batches,
                   layer.running_var.to(torch.float64) * batches, batches.reshape(1)]
    packed = all_reduce_sum_(torch.cat([p.to(pieces[0].device) for p in pieces]))
    offset = 0
    for layer in layers:
        n = layer.running_mean.numel()
        total = packed[offset + 2 * n]
        if total > 0:
            layer.running_mean.copy_(packed[offset:offset + n] / total)
            layer.running_var.copy_(packed[offset + n:offset + 2 * n] / total)
        layer.num_batches_tracked.fill_(int(total.item()))
        offset += 2 * n + 1
