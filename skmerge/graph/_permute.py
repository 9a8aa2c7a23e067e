"""The permutation self-check: permuting every space must not change the model."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ._apply import apply_transforms
from ._spaces import Space
from ._trace import _as_args, _to_device, find_spaces

__all__ = ["permute_model", "check_spaces", "random_permutations"]


def random_permutations(spaces: Sequence[Space], seed=None) -> list[torch.Tensor]:
    """One random permutation per space, within blocks of ``block_size``.

    Parameters
    ----------
    spaces : sequence of Space
    seed : int or None, default=None
        Seed of a private generator (the global RNG is untouched); None draws
        a fresh seed.

    Returns
    -------
    list of torch.LongTensor
        ``perms[i]`` has length ``spaces[i].dim`` and only moves channels
        inside their block of ``spaces[i].block_size``.
    """
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    perms = []
    for space in spaces:
        b = space.block_size
        blocks = [start + torch.randperm(b, generator=gen) for start in range(0, space.dim, b)]
        perms.append(torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.long))
    return perms


def permute_model(model: nn.Module, example_input=None, spaces=None, seed=None):
    """Return a copy of ``model`` with every feature space permuted at random.

    If the spaces are right, the copy computes exactly the same function (up
    to floating point summation order); this is the self-check of
    :func:`find_spaces` and of hand-written spaces.

    Parameters
    ----------
    model : torch.nn.Module
        Not modified.
    example_input : torch.Tensor or tuple of torch.Tensor, optional
        Needed when ``spaces`` is None (passed to :func:`find_spaces`).
    spaces : sequence of Space, optional
        The spaces to permute; found automatically when None.
    seed : int or None, default=None
        Seed for the permutations.

    Returns
    -------
    permuted : torch.nn.Module
        A deep copy of ``model`` with permuted parameters and buffers (same
        training flag).
    perms : list of torch.LongTensor
        ``perms[i]`` for ``spaces[i]``: new channel ``j`` is old channel
        ``perms[i][j]``; permutations stay inside blocks of ``block_size``.

    Raises
    ------
    ValueError
        If neither ``example_input`` nor ``spaces`` is given.
    """
    if spaces is None:
        if example_input is None:
            raise ValueError("permute_model needs example_input to find the spaces, or spaces=...")
        spaces = find_spaces(model, example_input)
    spaces = list(spaces)
    perms = random_permutations(spaces, seed)
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(apply_transforms(model.state_dict(), spaces, perms))
    return permuted, perms


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def check_spaces(model: nn.Module, example_input, spaces=None, atol: float = 1e-4, seed=0) -> None:
    """Check at run time that permuting every space leaves the outputs unchanged.

    Parameters
    ----------
    model : torch.nn.Module
        Not modified (run in eval mode without gradients, flags restored).
    example_input : torch.Tensor or tuple of torch.Tensor
        A batch the model accepts.
    spaces : sequence of Space, optional
        Spaces to check (e.g. written by hand); found automatically when None.
    atol : float, default=1e-4
        Allowed largest absolute difference, relative to the largest absolute
        output (at least 1): float32 models differ in summation order.
    seed : int, default=0
        Seed for the permutations.

    Raises
    ------
    RuntimeError
        If the permuted model's outputs differ: the spaces miss a producer or
        consumer, join channels that should not be joined, or the model has an
        operation that mixes channels without a rule.
    """
    args = _as_args(example_input)
    permuted, _ = permute_model(model, args, spaces, seed)
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        permuted.eval()
        with torch.no_grad():
            args = _to_device(args, model)
            ref, got = _tensors(model(*args)), _tensors(permuted(*args))
    finally:
        for m, flag in flags:
            m.training = flag
    if len(ref) != len(got):  # pragma: no cover - same architecture
        raise RuntimeError("the permuted model returned a different number of outputs")
    for i, (a, b) in enumerate(zip(ref, got)):
        if a.shape != b.shape:
            raise RuntimeError(f"output {i} changed shape under permutation: {tuple(a.shape)} vs {tuple(b.shape)}")
        if not (a.is_floating_point() or a.is_complex()):
            if not torch.equal(a, b):
                raise RuntimeError(f"output {i} changed under a random permutation of the spaces")
            continue
        scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        if not diff <= atol * scale:
            raise RuntimeError(
                f"permuting every feature space at random changed output {i} of "
                f"{type(model).__name__} (largest difference {diff:.3g}, allowed {atol * scale:.3g}): "
                "the spaces are wrong (a missing producer/consumer, or an operation that mixes "
                "channels across spaces)"
            )
