"""Diagonal Fisher information of a classifier on data, and Fisher-weighted averaging.

The Fisher of Matena and Raffel ("Merging Models with Fisher-Weighted
Averaging", NeurIPS 2022) is the model's own: ``F = E_x E_{y ~ p(y|x)}
[(d log p(y|x) / d theta)^2]``, so no labels are needed. It is estimated with
one label per input drawn from the model's predictive distribution (an
unbiased estimate; the argmax label would give the "empirical Fisher" of the
model's own predictions, which underweights the uncertain inputs), and
per-example gradients (``torch.func.vmap``) on a private copy of the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ._batches import iter_inputs
from ._distributed import all_reduce_sum_, is_distributed

__all__ = ["FisherSums", "aligned_fisher", "diagonal_fisher", "fisher_average"]

#: Per-example gradients are computed for at most this many values at once.
_CHUNK_VALUES = 2**24


def diagonal_fisher(model: nn.Module, loader, device: torch.device, dtype: torch.dtype, seed: int = 0,
                    verbose: bool = False, description: str = "Fisher information") -> dict:
    """The diagonal Fisher of every parameter of ``model`` on the inputs of ``loader``.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier returning ``(n_samples, n_classes)`` logits; not
        modified (a private copy in evaluation mode is differentiated).
    loader : DataLoader
        The data (inputs, or ``(x, y)`` batches whose labels are ignored).
    device, dtype
        Where and in which dtype the inputs run.
    seed : int, default=0
        Seed of the labels drawn from the model's predictive distribution.
    verbose : bool, default=False
    description : str
        Progress bar label.

    Returns
    -------
    dict of str to torch.Tensor
        float64 Fisher of every parameter name (tied parameters under each
        of their names), the mean over the inputs.
    """
    estimator = FisherSums(model, device, seed)
    with warnings.catch_warnings():
        # torch's notes that an op falls back to a slow batching rule: the result is the same
        warnings.filterwarnings("ignore", message="There is a performance drop")
        for inputs in tqdm(iter_inputs(loader, device, dtype), desc=description, disable=not verbose,
                           leave=False):
            estimator.add(inputs)
    return estimator.fisher()


class FisherSums:
    """Sums of squared per-example gradients of ``log p(y_hat | x)`` on a private copy of a model."""

    def __init__(self, model: nn.Module, device: torch.device, seed: int):
        from .merge import _module_with_state  # the merger's private-copy builder

        self.copy = _module_with_state(model, model.state_dict(), device)
        self.params = {name: p.detach() for name, p in self.copy.named_parameters()}
        self.buffers = dict(self.copy.named_buffers())
        self.device = device
        self.generator = torch.Generator().manual_seed(int(seed))
        self.per_example = torch.func.vmap(torch.func.grad(self.log_likelihood), in_dims=(None, 0, 0))
        self.total = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in self.params.items()}
        self.chunk = max(1, _CHUNK_VALUES // max(sum(p.numel() for p in self.params.values()), 1))
        self.n_seen, self.looped = 0, False

    def log_likelihood(self, params: dict, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # target: the drawn label as a one-hot vector (indexing by a batched label is not vmap-able)
        out = torch.func.functional_call(self.copy, (params, self.buffers), (x.unsqueeze(0),))
        return (torch.log_softmax(out, dim=-1).reshape(-1) * target).sum()

    def add(self, inputs: torch.Tensor, outputs: tuple | None = None) -> None:
        """Add a batch; ``outputs``: the model's outputs on it when a forward pass already made them."""
        if outputs is not None and len(outputs) == 1:  # the logits of the merger's pass: no second forward
            logits = outputs[0]
        else:
            with torch.no_grad():
                logits = torch.func.functional_call(self.copy, (self.params, self.buffers), (inputs,))
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != len(inputs):
            raise ValueError("Fisher merging needs a classifier whose output is a (n_samples, n_classes) "
                             f"tensor of logits; this model returns {_described(logits)}.")
        probabilities = torch.softmax(logits.to(torch.float64), dim=1).cpu()
        labels = torch.multinomial(probabilities, 1, generator=self.generator).reshape(-1)
        targets = torch.nn.functional.one_hot(labels, logits.shape[1]).to(self.device, logits.dtype)
        for x, y in zip(inputs.split(self.chunk), targets.split(self.chunk)):
            for name, g in self._gradients(x, y).items():
                self.total[name] += g.to(torch.float64).square().sum(0)
        self.n_seen += len(inputs)

    def _gradients(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        if not self.looped:
            try:
                return self.per_example(self.params, x, y)
            except Exception as error:  # an op without a batching rule: one example at a time
                self.looped = True
                warnings.warn(f"Per-example gradients by vmap failed ({type(error).__name__}); "
                              "computing them one example at a time (slower).", UserWarning, stacklevel=5)
        return _looped(self.log_likelihood, self.params, x, y)

    def fisher(self) -> dict:
        if is_distributed():  # every rank's shard: sums of squares and counts add up
            for value in self.total.values():
                all_reduce_sum_(value)
            self.n_seen = int(all_reduce_sum_(torch.tensor([self.n_seen], dtype=torch.float64,
                                                           device=self.device)).item())
        if self.n_seen == 0:
            raise ValueError("The data for the Fisher information is empty.")
        fisher = {name: value / self.n_seen for name, value in self.total.items()}
        # every name of a tied parameter gets its (shared) Fisher
        first = {id(p): name for name, p in self.copy.named_parameters()}
        return {name: fisher[first[id(p)]] for name, p in self.copy.named_parameters(remove_duplicate=False)}


def _looped(log_likelihood, params: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    rows = []
    for xi, yi in zip(x, y):
        leaves = {name: p.clone().requires_grad_(True) for name, p in params.items()}
        with torch.enable_grad():
            value = log_likelihood(leaves, xi, yi)
            grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        rows.append({name: torch.zeros_like(p) if g is None else g
                     for (name, p), g in zip(leaves.items(), grads)})
    return {name: torch.stack([r[name] for r in rows]) for name in params}


def _described(output) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    return f"a {type(output).__name__}"


def fisher_transform(transform):
    """The transform of :func:`skmerge.graph.apply_transforms` that carries a diagonal Fisher along.

    A permutation moves the Fisher with the parameters. For a map ``M``
    (producers ``P' = M^T P``, consumers ``C' = C M^-T``) the gradients
    transform with the inverse transpose, ``g' = M^-1 g`` for rows and
    ``g' = g M`` for columns; the diagonal of the transformed (diagonal)
    Fisher is then ``F'_j = sum_i (M^-1)_ji^2 F_i`` for rows and
    ``F'_j = sum_i M_ij^2 F_i`` for columns: the Fisher's off-diagonal terms,
    which a diagonal estimate does not have, are left out. Scale slices
    (norm weights, ``ParamSlice.scale``), which move with ``S = M^-1 * M^T``
    (elementwise), get ``F'_j = sum_i S_ji^2 F_i``: exact for permutations,
    an approximation otherwise, like the rest.
    """
    if transform is None or isinstance(transform, torch.Tensor):
        return transform
    mapping, inverse = (torch.as_tensor(t, dtype=torch.float64) for t in transform)
    return inverse.square().T, mapping.square().T


def aligned_fisher(fisher: dict, state: dict, spaces, transforms: Sequence) -> dict:
    """The Fisher of the parameters in the aligned basis (see :func:`fisher_transform`)."""
    from .graph import apply_transforms

    full = {key: fisher[key] if key in fisher else torch.zeros(value.shape, dtype=torch.float64,
                                                                device=value.device)
            for key, value in state.items() if isinstance(value, torch.Tensor)}
    moved = apply_transforms(full, spaces, [fisher_transform(t) for t in transforms])
    return {key: moved[key] for key in fisher}


def fisher_average(states: Sequence[dict], fishers: Sequence[dict], weights: Sequence[float]) -> dict:
    """``sum_k w_k F_k theta_k / sum_k w_k F_k`` per entry of the parameters; the rest averaged.

    Entries whose Fisher is zero in every model (weighted) are averaged with
    ``weights``, as are buffers and every tensor without a Fisher. Integer
    tensors come from ``states[0]``.
    """
    merged = {}
    for key, first in states[0].items():
        if not (isinstance(first, torch.Tensor) and first.is_floating_point()):
            merged[key] = first
            continue
        values = [state[key].to(torch.float64) for state in states]
        uniform = sum(float(w) * v for w, v in zip(weights, values))
        if key in fishers[0]:
            num = sum(float(w) * f[key].to(v.device) * v for w, f, v in zip(weights, fishers, values))
            den = sum(float(w) * f[key].to(v.device) for w, f, v in zip(weights, fishers, values))
            uniform = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), uniform)
        merged[key] = uniform.to(first.dtype)
    return merged
