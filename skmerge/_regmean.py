"""RegMean (Jin, Ren, Preotiuc-Pietro and Cheng, ICLR 2023): per-layer least squares on the inputs' Gram matrices.

For a Linear or Conv layer with weights ``W_k`` (bias as one more input
column, against a constant input 1) and uncentered input Gram matrices
``G_k = X_k^T X_k`` in the common basis, the merged layer minimizes
``sum_k w_k ||X_k W^T - X_k W_k^T||^2``:

    ``W = (sum_k w_k W_k G_k) (sum_k w_k G_k)^-1``,

with the off-diagonal entries of every ``G_k`` scaled by ``alpha`` (the
paper's remedy for degenerate merges; ``alpha = 1``: plain least squares).
The Gram matrices are those of each model's actual layer inputs, measured by
a pass over the data through a structural copy of the model, then expressed
in the aligned basis: ``G'_k = A_k^T G_k A_k`` with ``A_k`` the transform
of the layer's input columns (each input channel's features ``x`` become
``x @ mapping`` along all its positions and kernel offsets).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._batches import iter_inputs
from ._distributed import all_reduce_sum_, is_distributed

__all__ = ["input_grams", "input_transform", "regmean_layers", "regmean_solve"]

_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def regmean_layers(model: nn.Module, max_features: int) -> tuple[dict, dict]:
    """``(layers, skipped)``: the Linear/Conv layers RegMean merges, by path, and why others are not.

    Merged: ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` with one group,
    zero padding, untied weights and at most ``max_features`` input features
    (``in_features``, or ``in_channels * kernel size``).
    """
    counts: dict = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    layers, skipped = {}, {}
    for path, module in model.named_modules():
        if not isinstance(module, _TYPES):
            continue
        width = _width(module)
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
            skipped[path] = "grouped convolution"
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode != "zeros":
            skipped[path] = f"padding_mode={module.padding_mode!r}"
        elif any(counts[id(p)] > 1 for p in module.parameters(recurse=False)):
            skipped[path] = "tied weight"
        elif width > max_features:
            skipped[path] = f"{width} input features > max_features={max_features}"
        else:
            layers[path] = module
    return layers, skipped


def _width(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.in_channels * math.prod(module.kernel_size)


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as a ``(n_rows, width)`` matrix (convolutions: their patches)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv1d):
        x, kernel = x.unsqueeze(2), (1, module.kernel_size[0])
        stride, padding, dilation = (1, module.stride[0]), (0, module.padding[0]), (1, module.dilation[0])
    else:
        kernel, stride, padding, dilation = module.kernel_size, module.stride, module.padding, module.dilation
    if isinstance(padding, str):
        raise ValueError(f"padding={padding!r} is not supported by RegMean")
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


@torch.no_grad()
def input_grams(model: nn.Module, layers: dict, loader, device: torch.device, dtype: torch.dtype,
                precision: str = "double", verbose: bool = False, description: str = "Input Gram matrices"
                ) -> dict:
    """Uncentered Gram matrices of every layer's inputs, with a constant column for the bias.

    Parameters
    ----------
    model : torch.nn.Module
        Read, never modified: a structural copy runs with its tensors.
    layers : dict
        Path -> module (:func:`regmean_layers`).
    loader : DataLoader
    device, dtype
        Where and in which dtype the inputs run.
    precision : {"double", "single"}, default="double"
        Precision of each batch's product (accumulated in float64).
    verbose : bool, default=False
    description : str

    Returns
    -------
    dict
        Path -> float64 ``(width + 1, width + 1)`` matrix (``(width, width)``
        for a layer without bias), summed over every row of every call.
    """
    from .graph._runner import ModuleRunner, model_tensors

    runner = ModuleRunner(model, list(layers))
    tensors = {name: t.to(device) for name, t in model_tensors(model).items()}
    product = torch.float32 if precision == "single" else torch.float64
    grams = {path: torch.zeros(_width(m) + (m.bias is not None), _width(m) + (m.bias is not None),
                               dtype=torch.float64, device=device) for path, m in layers.items()}
    calls = torch.zeros(len(layers), dtype=torch.float64, device=device)
    position = {path: i for i, path in enumerate(layers)}

    class _Observer:
        def observe(self, tensor, path):
            module = layers[path]
            rows = _rows(module, tensor).to(product)
            if module.bias is not None:
                rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=product, device=rows.device)], dim=1)
            grams[path] += (rows.T @ rows).to(torch.float64)
            calls[position[path]] += 1

    for inputs in tqdm(iter_inputs(loader, device, dtype), desc=description, disable=not verbose, leave=False):
        runner.run(tensors, (inputs,), _Observer())
    if is_distributed():  # sums over every rank's shard
        all_reduce_sum_(calls)
        for gram in grams.values():
            all_reduce_sum_(gram)
    return {path: gram for path, gram in grams.items() if calls[position[path]] > 0}


def input_transform(module: nn.Module, weight_name: str, spaces, transforms: Sequence,
                    device) -> torch.Tensor | None:
    """``A``: the layer's input features in the aligned basis are ``x @ A`` (None: unchanged).

    ``transforms[i]`` is the dense ``(d, d)`` mapping of space ``i`` (or
    None); a space's consumer slice on ``weight_name`` tells which input
    features (positions, kernel offsets) each of its channels owns.
    """
    width = _width(module)
    kernel = 1 if isinstance(module, nn.Linear) else math.prod(module.kernel_size)
    channels = width // kernel
    out = None
    for space, mapping in zip(spaces, transforms):
        if mapping is None:
            continue
        for sl in space.consumers:
            if sl.name != weight_name or sl.axis != 1:
                continue
            index = sl.index.to(device)
            flat = sl.flat if sl.flat is not None else (index.shape[1] > 1 or int(index.max()) >= channels)
            if not flat and kernel > 1:  # channel c owns its kernel offsets c * kernel + r
                index = (index.unsqueeze(-1) * kernel + torch.arange(kernel, device=device)).flatten(1)
            if out is None:
                out = torch.eye(width, dtype=torch.float64, device=device)
            mapping = torch.as_tensor(mapping, dtype=torch.float64).to(device)
            for column in index.T:
                out[column[:, None], column[None, :]] = mapping
    return out


def regmean_solve(weights_k: Sequence[torch.Tensor], grams_k: Sequence[torch.Tensor], weights: Sequence[float],
                  alpha: float) -> torch.Tensor:
    """``(sum_k w_k W_k G_k) (sum_k w_k G_k)^+`` with off-diagonals scaled by ``alpha``.

    ``W_k`` are ``(out, width)`` matrices (bias as the last column when the
    Gram matrices have a constant column). Directions that no model's inputs
    reach (zero eigenvalues of the summed Gram matrix) keep the weighted
    average of the ``W_k``, which the data cannot distinguish from anything
    else there.
    """
    total, target, average = None, None, None
    for w, weight, gram in zip(weights, weights_k, grams_k):
        w = float(w)
        diagonal = torch.diag(gram.diagonal())
        scaled = alpha * gram + (1 - alpha) * diagonal
        term, part = w * (weight.to(torch.float64) @ scaled), w * weight.to(torch.float64)
        total = w * scaled if total is None else total + w * scaled
        target = term if target is None else target + term
        average = part if average is None else average + part
    values, vectors = torch.linalg.eigh(0.5 * (total + total.T))
    keep = values > values.max().clamp_min(0) * values.numel() * torch.finfo(torch.float64).eps
    kept = vectors[:, keep]
    solution = (target @ kept) / values[keep] @ kept.T
    return solution + average - (average @ kept) @ kept.T
