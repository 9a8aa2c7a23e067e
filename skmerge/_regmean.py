"""RegMean (Jin, Ren, Preotiuc-Pietro and Cheng, ICLR 2023): per-layer least squares on the inputs' Gram matrices.

For a Linear or Conv layer with weights ``W_k`` (bias as one more input
column, against a constant input 1) and uncentered input Gram matrices
``G_k = X_k^T X_k`` in the common basis, the merged layer minimizes
``sum_k w_k ||X_k W^T - X_k W_k^T||^2``:

    ``W = (sum_k w_k W_k G_k) (sum_k w_k G_k)^-1``,

with the off-diagonal entries of every ``G_k`` scaled by ``alpha`` (the
paper's remedy for degenerate merges; ``alpha = 1``: plain least squares).
The Gram matrices are those of each model's actual layer inputs, measured in
the alignment pass (or by a pass of their own through a structural copy of
the model, for layers that pass cannot report), then expressed
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

__all__ = ["GramSums", "input_grams", "input_transform", "regmean_layers", "regmean_solve"]

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


class GramSums:
    """Running uncentered Gram matrices of the inputs of some layers of one model.

    Parameters
    ----------
    layers : dict
        Path -> module (:func:`regmean_layers`).
    device : torch.device
    precision : {"double", "single"}
        Precision of each batch's product (accumulated in float64).
    """

    def __init__(self, layers: dict, device: torch.device, precision: str = "double") -> None:
        self.layers = layers
        self.product = torch.float32 if precision == "single" else torch.float64
        self.grams = {path: torch.zeros(_width(m) + (m.bias is not None), _width(m) + (m.bias is not None),
                                        dtype=torch.float64, device=device) for path, m in layers.items()}
        self.calls = torch.zeros(len(layers), dtype=torch.float64, device=device)
        self.position = {path: i for i, path in enumerate(layers)}

    def observe(self, tensor: torch.Tensor, path: str) -> None:
        """Add one call's input of layer ``path``."""
        module = self.layers[path]
        rows = _rows(module, tensor).to(self.product)
        if module.bias is not None:
            rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=self.product, device=rows.device)], dim=1)
        self.grams[path] += (rows.T @ rows).to(torch.float64)
        self.calls[self.position[path]] += 1

    def result(self) -> dict:
        """Path -> Gram matrix of every layer that was called (summed over every rank's shard)."""
        if is_distributed():
            all_reduce_sum_(self.calls)
            for gram in self.grams.values():
                all_reduce_sum_(gram)
        return {path: gram for path, gram in self.grams.items() if self.calls[self.position[path]] > 0}


@torch.no_grad()
def input_grams(model: nn.Module, layers: dict, loader, device: torch.device, dtype: torch.dtype,
                precision: str = "double", verbose: bool = False, description: str = "Input Gram matrices"
                ) -> dict:
    """Uncentered Gram matrices of every layer's inputs, with a constant column for the bias.

    The pass of its own that measures them when the alignment pass could not
    (:class:`GramSums` fed by the merger's runner otherwise).

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
    sums = GramSums(layers, device, precision)

    class _Observer:
        def observe(self, tensor, path):
            sums.observe(tensor, path)

    for inputs in tqdm(iter_inputs(loader, device, dtype), desc=description, disable=not verbose, leave=False):
        runner.run(tensors, (inputs,), _Observer())
    return sums.result()


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
    values, vectors = _symmetric_eigh(0.5 * (total + total.T))
    keep = values > values.max().clamp_min(0) * values.numel() * torch.finfo(torch.float64).eps
    kept = vectors[:, keep]
    solution = (target @ kept) / values[keep] @ kept.T
    return solution + average - (average @ kept) @ kept.T


def _symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and vectors of a symmetric positive semi-definite matrix.

    LAPACK's ``syevd`` can fail to converge on badly conditioned Gram
    matrices (few samples, many patch features); the SVD, which equals the
    eigendecomposition of a positive semi-definite matrix, does not.
    """
    try:
        return torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        vectors, values, _ = torch.linalg.svd(matrix)
        return values, vectors
