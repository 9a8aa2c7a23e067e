"""Other aligners for some feature spaces: ``ModelMerger(space_aligners=...)``.

A merger aligns every space with clones of its ``aligner``; ``space_aligners``
names exceptions as ``(selector, aligner)`` pairs, the first matching pair
winning. A selector is a shell-style pattern on the space's name
(:func:`fnmatch.fnmatchcase`, e.g. ``"*mlp*"``) or a callable taking the
:class:`~skmerge.graph.Space` and returning a bool. The pairs are checked
before the statistics pass: their shape and types, and that every selector
matches at least one space (a selector that matches nothing is a typo, and
would silently leave the merge as it was).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["check_space_aligners", "check_selectors_match", "aligner_for"]


def check_space_aligners(space_aligners: Any) -> list[tuple[Any, Any]]:
    """The ``(selector, aligner)`` pairs of ``space_aligners``, validated (``None``: none).

    Raises
    ------
    TypeError
        If it is not a sequence of pairs, a selector is neither a string nor
        a callable, or an aligner has no ``fit_from_stats``.
    """
    if space_aligners is None:
        return []
    if isinstance(space_aligners, (str, bytes, dict)) or not isinstance(space_aligners, Sequence):
        raise TypeError("space_aligners must be a list of (selector, aligner) pairs, e.g. "
                        f"[('*mlp*', PermutationAligner())], got {type(space_aligners).__name__}.")
    pairs = []
    for i, pair in enumerate(space_aligners):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"space_aligners[{i}] must be a (selector, aligner) pair, got {pair!r}.")
        selector, aligner = pair
        if not (isinstance(selector, str) or callable(selector)):
            raise TypeError(f"space_aligners[{i}]: the selector must be a name pattern (str) or a "
                            f"callable taking a Space, got {type(selector).__name__}.")
        if not hasattr(aligner, "fit_from_stats"):
            raise TypeError(f"space_aligners[{i}]: the aligner must be a skmerge aligner with "
                            f"fit_from_stats, got {type(aligner).__name__}.")
        pairs.append((selector, aligner))
    return pairs


def _matches(selector: str | Callable, space) -> bool:
    if isinstance(selector, str):
        return fnmatch.fnmatchcase(space.name, selector)
    return bool(selector(space))


def check_selectors_match(space_aligners: Any, spaces: Sequence) -> None:
    """Raise if a selector of ``space_aligners`` matches none of ``spaces``.

    Raises
    ------
    ValueError
        Naming the selector and some of the spaces' names.
    """
    for i, (selector, _) in enumerate(check_space_aligners(space_aligners)):
        if not any(_matches(selector, space) for space in spaces):
            names = [space.name for space in spaces]
            shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"space_aligners[{i}]: the selector {selector!r} matches none of the "
                             f"{len(spaces)} feature spaces ({shown}).")


def aligner_for(space, space_aligners: Any, default: Any) -> Any:
    """The (unfitted) aligner of ``space``: the first matching pair's, else ``default``."""
    for selector, aligner in check_space_aligners(space_aligners):
        if _matches(selector, space):
            return aligner
    return default
