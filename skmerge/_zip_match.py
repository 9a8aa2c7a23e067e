"""ZipIt!'s greedy matching of features across and within models (Stoica et al., ICLR 2024).

All models' features of one space are pooled; the pair of (groups of)
features with the highest correlation is merged, again and again, until as
many groups are left as one model has features. Pairs from the same model
are candidates too (a model's redundant features are merged with each
other, which frees room for features the other models do not share).
"""

from __future__ import annotations

import torch

__all__ = ["joint_correlation", "zip_match"]


def joint_correlation(stats, views=None, index=None) -> torch.Tensor:
    """Correlation matrix of the features of several views, pooled (float64).

    Parameters
    ----------
    stats : skmerge.reference_free.JointCovariance
    views : sequence of int, optional
        The views to pool (all by default), in this order.
    index : sequence of LongTensor, optional
        Per pooled view, the features to take (all by default).

    Returns
    -------
    torch.Tensor of shape (N, N)
        Features of constant value get correlation 1 with the constant features of the same
        value and 0 with every other.
    """
    views = list(range(stats.n_views)) if views is None else list(views)
    index = [None] * len(views) if index is None else list(index)
    rows = []
    for a, ia in zip(views, index):
        row = []
        for b, ib in zip(views, index):
            block = stats.comoment(a, b)
            if ia is not None:
                block = block[ia.to(block.device)]
            if ib is not None:
                block = block[:, ib.to(block.device)]
            row.append(block)
        rows.append(torch.cat(row, dim=1))
    joint = torch.cat(rows, dim=0)
    std = joint.diagonal().clamp_min(0).sqrt()
    scale = torch.outer(std, std)
    correlation = torch.where(scale > 0, joint / scale.clamp_min(1e-300), torch.zeros_like(joint))
    # Constant features (dead units) of equal value are interchangeable: correlation 1.
    means = torch.cat([stats.means_[a] if ia is None else stats.means_[a][ia.to(joint.device)]
                       for a, ia in zip(views, index)])
    constant = std == 0
    equal = torch.isclose(means[:, None], means[None, :], rtol=1e-9, atol=1e-12)
    correlation[constant[:, None] & constant[None, :] & equal] = 1.0
    return correlation.clamp(-1, 1)


def zip_match(correlation: torch.Tensor, owners: torch.Tensor, n_merged: int, alpha: float,
              beta: float) -> tuple[torch.Tensor, int]:
    """Group the pooled features of several models into ``n_merged`` merged features, greedily.

    Parameters
    ----------
    correlation : torch.Tensor of shape (N, N)
        Correlations of all pooled features (every model's features, in
        model order).
    owners : torch.Tensor of shape (N,)
        The model (0, 1, ...) each feature belongs to.
    n_merged : int
        Number of groups to keep (``N - n_merged`` merges).
    alpha : float in [0, 1]
        After a merge, the new group's correlation with any other group is
        the smaller of its two parts' correlations times ``alpha``, so that a
        group grows beyond a pair only for a much better match than the
        remaining pairs. ``alpha = 0`` does not scale them but forbids a
        group formed by a merge to take a further feature of a model it
        already holds.
    beta : float in [0, 1]
        Budget of merges within a model: a merge that puts two features of
        one model into one group (two features of the model, or groups that
        both hold features of it) is allowed while every such model has
        budget left; each model's budget is ``floor(beta * (N - n_merged) /
        n_models)`` merges (``0``: every group holds at most one feature of
        each model).

    Returns
    -------
    labels : torch.LongTensor of shape (N,)
        The merged feature of every pooled feature, numbered in the order of
        their first member (the first model's features first).
    n_within : int
        Merges that put features of one model together.

    Notes
    -----
    When no permitted pair is left (the budgets and ``alpha = 0`` forbid all
    of them), the most correlated of the remaining pairs is merged anyway, so
    that the result always has ``n_merged`` groups.
    """
    n = correlation.shape[0]
    device = correlation.device
    owners = torch.as_tensor(owners, dtype=torch.long).to(device)
    n_models = int(owners.max()) + 1
    sim = correlation.to(torch.float64).clone()
    sim.fill_diagonal_(-torch.inf)
    alive = torch.ones(n, dtype=torch.bool, device=device)
    size = torch.ones(n, dtype=torch.long, device=device)
    contains = torch.zeros(n, n_models, dtype=torch.bool, device=device)
    contains[torch.arange(n, device=device), owners] = True
    budget = torch.full((n_models,), int(beta * (n - n_merged) / n_models + 1e-9), device=device)

    def permitted(rows: torch.Tensor) -> torch.Tensor:
        """``(len(rows), n)``: which merges of the groups ``rows`` with every group are allowed."""
        shared = contains[rows][:, None, :] & contains[None, :, :]
        ok = ~(shared & (budget <= 0)).any(-1) & alive[None, :]
        if alpha == 0:
            grown = (size[rows][:, None] > 1) | (size[None, :] > 1)
            ok &= ~(shared.any(-1) & grown)
        ok[torch.arange(len(rows), device=device), rows] = False
        return ok

    score = torch.where(permitted(torch.arange(n, device=device)), sim, -torch.inf)
    group = torch.arange(n, device=device)
    n_within = 0
    for _ in range(n - n_merged):
        i, j = divmod(int(score.argmax()), n)
        if score[i, j] == -torch.inf:  # nothing permitted is left: the best remaining pair
            rest = torch.where(alive[:, None] & alive[None, :], sim, -torch.inf)
            rest.fill_diagonal_(-torch.inf)
            i, j = divmod(int(rest.argmax()), n)
            if rest[i, j] == -torch.inf:  # uncorrelated leftovers: any two alive groups
                i, j = torch.nonzero(alive).flatten()[:2].tolist()
        i, j = min(i, j), max(i, j)
        shared = contains[i] & contains[j]
        exhausted = False
        if bool(shared.any()):
            n_within += 1
            budget[shared] -= 1
            exhausted = bool((budget[shared] <= 0).any())
        row = torch.minimum(sim[i], sim[j]) * (alpha if alpha > 0 else 1.0)
        sim[i], sim[:, i] = row, row
        sim[j], sim[:, j] = -torch.inf, -torch.inf
        sim[i, i] = -torch.inf
        alive[j] = False
        contains[i] |= contains[j]
        size[i] += size[j]
        group[group == j] = i
        if exhausted:  # a budget ran out: merges within that model are closed everywhere
            score = torch.where(permitted(torch.arange(n, device=device)), sim, -torch.inf)
        else:
            score[i] = torch.where(permitted(torch.tensor([i], device=device))[0], sim[i], -torch.inf)
            score[:, i] = score[i]
            score[j], score[:, j] = -torch.inf, -torch.inf
    _, labels = torch.unique(group, sorted=True, return_inverse=True)
    return labels.cpu(), n_within
