"""Combine per-rank streaming statistics under torch.distributed.

Each rank accumulates Chan-style statistics ``(n, mean, M)`` on its own shard.
To combine them with plain sums, every rank re-centres its comoments on the
*global* mean ``c`` first: ``M_c = M + n (mean - c)(mean - c)^T``; the sum
over ranks of ``M_c`` is exactly the comoment of all the data about ``c``, and
since every rank's mean is close to ``c`` no precision is lost to large
offsets. Counts are exchanged as Python integers (exact); means and comoments
are float64 sums, so the result equals the single-process statistics up to
float rounding, bit-identically on every rank.

Communication: one small ``all_gather_object`` (counts and shapes, checked
for consistency so a mismatch raises the same error on every rank instead of
hanging), one ``all_reduce`` of all the means, then one ``all_reduce`` per
comoment matrix (no concatenation, so the transient extra memory is at most
the size of the statistics themselves). With the NCCL backend CPU tensors
travel through the current CUDA device; gloo reduces them where they are.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .stats import ReferenceCovariance

__all__ = ["is_distributed", "all_reduce_statistics", "all_reduce_sum_"]


def is_distributed() -> bool:
    """Whether a torch.distributed process group with several ranks is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """Where ``tensor`` must be to take part in a collective of the default group."""
    backend = str(dist.get_backend()).lower()
    # Plain NCCL reduces CUDA tensors only; gloo and "cpu:gloo,cuda:nccl" take CPU ones.
    if tensor.device.type == "cpu" and "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place (through CUDA for NCCL), and return it."""
    device = _comm_device(tensor)
    if device == tensor.device:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return tensor.copy_(moved)


def _signature(stats) -> tuple:
    """What must agree across ranks: the kind, the view pairs, the feature counts."""
    dims = None if stats._means is None else tuple(int(m.shape[0]) for m in stats._means)
    return (type(stats).__name__, stats._pairs, dims)


def all_reduce_statistics(statistics: list[ReferenceCovariance]) -> list[ReferenceCovariance]:
    """Return the statistics of all ranks combined; unchanged in a single process.

    Every rank must call this with statistics of the same spaces and views,
    in the same order. A rank whose statistics of a space are still empty
    (no batch) contributes nothing to it. The result equals the statistics of
    the concatenated shards up to float rounding, identically on every rank.

    Parameters
    ----------
    statistics : list of ReferenceCovariance (or CrossCovariance)
        This rank's statistics, one per space; not modified.

    Returns
    -------
    list of ReferenceCovariance
        New objects holding the global statistics, on the device of the
        inputs.

    Raises
    ------
    ValueError
        On every rank, if the ranks disagree on the number of spaces, the
        views or the feature counts, or if no rank saw any sample of a space.
    """
    if not is_distributed():
        return statistics
    local = [(s.n_samples_, _signature(s)) for s in statistics]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)

    if len({len(g) for g in gathered}) > 1:
        raise ValueError(
            f"The ranks hold statistics of different numbers of spaces: {[len(g) for g in gathered]}."
        )
    totals, shapes = [], []
    for index, entries in enumerate(zip(*gathered)):
        signatures = {sig for _, sig in entries if sig[2] is not None}
        configs = {sig[:2] for _, sig in entries}
        if len(signatures) > 1 or len(configs) > 1:
            raise ValueError(
                f"The ranks disagree on the statistics of space {index}: "
                f"{sorted(map(str, {sig for _, sig in entries}))}; every rank must merge the "
                "same models with the same settings."
            )
        total = sum(n for n, _ in entries)
        if total == 0 or not signatures:
            raise ValueError(f"No rank saw any alignment sample for space {index}.")
        totals.append(total)
        shapes.append(signatures.pop()[2])

    if not statistics:
        return statistics
    # Empty local statistics (no batch on this rank) take part as zeros.
    device = next((s.device for s in statistics if s.device is not None), torch.device("cpu"))
    means, moments = [], []
    for s, dims in zip(statistics, shapes):
        if s._means is None:
            means.append([torch.zeros(d, dtype=torch.float64, device=device) for d in dims])
            moments.append({
                (i, j): torch.zeros(dims[i], dims[j], dtype=torch.float64, device=device)
                for (i, j) in s._pairs
            })
        else:
            means.append([m.to(device) for m in s._means])
            moments.append({key: s._moments[key].to(device) for key in s._pairs})

    # Global means: one all-reduce of the count-weighted means of all spaces.
    weighted = all_reduce_sum_(torch.cat([m * s.n_samples_ for s, ms in zip(statistics, means) for m in ms]))
    centres, offset = [], 0
    for ms, total in zip(means, totals):
        centre = []
        for m in ms:
            centre.append(weighted[offset:offset + m.numel()] / total)
            offset += m.numel()
        centres.append(centre)

    combined = []
    for s, ms, mo, total, centre in zip(statistics, means, moments, totals, centres):
        shifts = [m - c for m, c in zip(ms, centre)]
        new = s._empty_like()
        new.n_samples_ = total
        new._means = centre
        new._moments = {}
        for i, j in s._pairs:
            # Out of place: the local statistics are left as they were.
            recentred = torch.addr(mo[i, j], shifts[i], shifts[j], alpha=float(s.n_samples_))
            new._moments[i, j] = all_reduce_sum_(recentred)
        combined.append(new)
    return combined
