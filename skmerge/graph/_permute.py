"""The permutation self-check: permuting every space must not change the model."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ._apply import apply_transforms
from ._export import as_args, tensor_leaves
from ._find import analyze
from ._runner import GraphRunner, model_tensors, runner_for
from ._spaces import Space

__all__ = ["permute_model", "check_spaces", "random_permutations", "verify_spaces"]


def random_permutations(spaces: Sequence[Space], seed=None) -> list[torch.Tensor]:
    """One random permutation per space, within blocks of ``block_size``.

    Spaces of one ``block_family`` (the query-key and value-output spaces of an
    attention layer) also permute their blocks (heads) as wholes, all with the
    same permutation of blocks.

    Parameters
    ----------
    spaces : sequence of Space
    seed : int or None, default=None
        Seed of a private generator (the global RNG is untouched); None draws
        a fresh seed.

    Returns
    -------
    list of torch.LongTensor
        ``perms[i]`` has length ``spaces[i].dim``; a channel stays inside its
        block of ``spaces[i].block_size``, except for whole-block moves in a
        family.
    """
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    block_orders: dict = {}
    perms = []
    for space in spaces:
        b = space.block_size
        n_blocks = space.dim // b if b else 0
        if space.block_family is not None and n_blocks > 1:
            if space.block_family not in block_orders:
                block_orders[space.block_family] = torch.randperm(n_blocks, generator=gen)
            order = block_orders[space.block_family]
            if order.numel() != n_blocks:
                raise ValueError(f"spaces of block family {space.block_family!r} have different numbers "
                                 "of blocks")
        else:
            order = torch.arange(n_blocks)
        blocks = [int(j) * b + torch.randperm(b, generator=gen) for j in order]
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
        training flags).
    perms : list of torch.LongTensor
        ``perms[i]`` for ``spaces[i]``: new channel ``j`` is old channel
        ``perms[i][j]`` (see :func:`random_permutations`).

    Raises
    ------
    ValueError
        If neither ``example_input`` nor ``spaces`` is given.
    """
    if spaces is None:
        if example_input is None:
            raise ValueError("permute_model needs example_input to find the spaces, or spaces=...")
        spaces = analyze(model, example_input)[1]
    spaces = list(spaces)
    perms = random_permutations(spaces, seed)
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(apply_transforms(model.state_dict(), spaces, perms))
    return permuted, perms


def _permuted_tensors(model: nn.Module, spaces, seed) -> dict:
    tensors = model_tensors(model)
    # permutations move entries by indexing: exact in the tensors' own precision
    state = apply_transforms(model.state_dict(), spaces, random_permutations(spaces, seed), precision="single")
    return {name: state.get(name, t) for name, t in tensors.items()}


def _device_of(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def verify_spaces(runner, model: nn.Module, spaces, example_input, atol: float = 1e-4, seed=0) -> None:
    """Raise RuntimeError unless permuting every space at random keeps ``model``'s outputs.

    ``runner`` runs ``model``'s computation (:mod:`skmerge.graph._runner`); the
    model itself is not run, modified or switched to eval mode.
    """
    device = _device_of(model)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in as_args(example_input))
    with torch.no_grad():
        ref = tensor_leaves(runner.run(model_tensors(model), args))
        got = tensor_leaves(runner.run(_permuted_tensors(model, list(spaces), seed), args))
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


def check_spaces(model: nn.Module, example_input, spaces=None, atol: float = 1e-4, seed=0) -> None:
    """Check at run time that permuting every space leaves the outputs unchanged.

    Parameters
    ----------
    model : torch.nn.Module
        Not modified and not run: its computation is evaluated on a copy of
        its graph (or of its structure) with its tensors.
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
    if spaces is None:
        traced, spaces = analyze(model, example_input)
        runner = GraphRunner(traced, (), model)
    else:
        spaces = list(spaces)
        runner = runner_for(model, example_input, spaces)
    verify_spaces(runner, model, spaces, example_input, atol, seed)
