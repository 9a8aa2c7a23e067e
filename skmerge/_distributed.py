"""Combine per-rank streaming statistics under torch.distributed.

Each rank accumulates Chan-style statistics ``(n, mean, M)`` on its own shard.
To combine them with plain sums (one all-reduce), every rank re-centres its
comoments on the *global* mean ``c`` first:
``M_c = M + n (mean_i - c_i)(mean_j - c_j)^T``; the sum over ranks of ``M_c``
is exactly the comoment of all the data about its mean, and since each rank's
mean is close to ``c`` no precision is lost to large offsets.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .stats import ReferenceCovariance


def is_distributed() -> bool:
    """Whether a torch.distributed process group with several ranks is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_statistics(statistics: list[ReferenceCovariance]) -> list[ReferenceCovariance]:
    """Return the statistics of all ranks combined; unchanged in a single process.

    Every rank must call this with statistics of the same spaces and views.
    The result equals the statistics of the concatenated shards up to float
    rounding, identically on every rank.

    Parameters
    ----------
    statistics : list of ReferenceCovariance
        This rank's statistics, one per space (each updated at least once).

    Returns
    -------
    list of ReferenceCovariance
        New objects holding the global statistics.
    """
    if not is_distributed():
        return statistics
    for stats in statistics:
        if stats._means is None:
            raise ValueError("Every rank needs at least one batch of alignment data.")
    device = statistics[0].device
    counts = torch.tensor([float(s.n_samples_) for s in statistics], dtype=torch.float64, device=device)
    local_counts = counts.clone()
    _all_reduce_sum(counts)

    # Global means: one all-reduce of the count-weighted means.
    weighted = torch.cat([m * n for s, n in zip(statistics, local_counts) for m in s._means])
    global_means = _all_reduce_sum(weighted)
    offset = 0
    centres = []
    for s, total in zip(statistics, counts):
        means = []
        for m in s._means:
            means.append(global_means[offset:offset + m.numel()] / total)
            offset += m.numel()
        centres.append(means)

    # Comoments re-centred on the global means, summed in one all-reduce.
    pieces = []
    for s, n, centre in zip(statistics, local_counts, centres):
        shifts = [m - c for m, c in zip(s._means, centre)]
        for (i, j), moment in s._moments.items():
            pieces.append((moment + n * torch.outer(shifts[i], shifts[j])).reshape(-1))
    summed = _all_reduce_sum(torch.cat(pieces))

    combined = []
    offset = 0
    for s, total, centre in zip(statistics, counts, centres):
        new = s._empty_like()
        new.n_samples_ = int(round(total.item()))
        new._means = centre
        new._moments = {}
        for key, moment in s._moments.items():
            new._moments[key] = summed[offset:offset + moment.numel()].reshape(moment.shape)
            offset += moment.numel()
        combined.append(new)
    return combined
