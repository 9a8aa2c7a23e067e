"""Feed the per-space statistics from inside the models' forward passes.

Each tapped tensor goes to the statistics when the runner reports it
(:mod:`skmerge.graph._runner`), right after the op that produced it and while
it is still in the CPU's caches, instead of after the whole forward pass.
The runner evaluates the models' computation with each model's tensors: the
models themselves are never hooked or switched to eval mode.
"""

from __future__ import annotations

import weakref
from collections import defaultdict

import torch

__all__ = ["BatchObserver", "taps_by_key"]


def taps_by_key(spaces: list) -> dict:
    """Where each space is observed: runner key (graph node or module path) -> ``[(space, tap)]``.

    Taps of one space that read the same tensor the same way are kept once,
    so that no sample counts twice.
    """
    out = defaultdict(list)
    for index, space in enumerate(spaces):
        for tap in space.taps:
            key = getattr(tap, "node", None) or tap.module
            if (index, tap) not in out[key]:
                out[key].append((index, tap))
    return dict(out)


class BatchObserver:
    """One alignment batch, observed in every model one after the other.

    The first model run (the reference) fixes the observations: one per
    report of a tapped key and tap (a module called twice is reported twice),
    except that module taps reading the same tensor (a residual block's first
    convolution and its projection shortcut) are observed once. Every later
    model is observed at the same (key, call) positions. Each observation has
    its own batch of its space's statistics; :meth:`commit` adds them all.

    Parameters
    ----------
    statistics : list
        One accumulator per space (``ReferenceCovariance`` or alike).
    spaces : list of Space
        Only used to name a space in error messages.
    taps : dict
        :func:`taps_by_key` of the spaces.
    runner : GraphRunner or ModuleRunner
        Runs a model's computation with given tensors and reports the taps.
    listener : object, optional
        Also gets every reported tensor, ``listener.observe(k, key, tensor)``,
        and ``listener.after_batch(k, inputs, outputs)`` after model ``k`` ran
        (``outputs``: the runner's output tensors; the statistics of
        ``ModelMerger(combine=...)``).
    """

    def __init__(self, statistics: list, spaces: list, taps: dict, runner, listener=None) -> None:
        self.statistics = statistics
        self.spaces = spaces
        self.taps = taps
        self.runner = runner
        self.listener = listener
        self.observations: dict[tuple[str, int], list] | None = None

    def run(self, tensors: dict, k: int, inputs: torch.Tensor) -> None:
        """Run model ``k`` (its parameters and buffers ``tensors``) on ``inputs``."""
        first = self.observations is None
        if first:
            self.observations = {}
        calls: dict[str, int] = defaultdict(int)
        # Identities of the tensors observed in the first run (the deduplication below), each
        # with a weak reference to its storage: a match counts only while that storage lives,
        # so memory freed and reused by a later tensor never passes for the same tensor, and no
        # observed activation is kept alive by the observer (its statistics batch keeps what
        # it needs).
        seen: dict = {}
        added = 0
        observer = self

        class _Report:
            def observe(self, tensor, key):
                nonlocal added
                tensor = tensor.detach()
                if observer.listener is not None:
                    observer.listener.observe(k, key, tensor)
                if key not in observer.taps:
                    return
                call = calls[key]
                calls[key] += 1
                if first:
                    entries = []
                    for index, tap in observer.taps[key]:
                        ident = (index, _reading(tap), _tensor_identity(tensor))
                        if not _same_storage(seen.get(ident), tensor):
                            seen[ident] = _storage_ref(tensor)
                            entries.append((index, tap, observer.statistics[index]._batch(
                                commit_when_complete=True)))
                    observer.observations[key, call] = entries
                for index, tap, batch in observer.observations.get((key, call), ()):
                    try:
                        batch.add(k, tap.extract_grouped(tensor))
                    except ValueError as error:
                        if "NaN or infinity" not in str(error):
                            raise
                        raise ValueError(
                            f"Non-finite activations (NaN or inf) in space {index} "
                            f"({observer.spaces[index].name}) of model {k}; check the model's weights "
                            "and the input data.") from None
                    added += 1

        try:
            outputs = self.runner.run(tensors, (inputs,), _Report())
        finally:
            # _Report, a class, lives in a reference cycle until the garbage collector runs: its
            # closure must not keep anything of this run alive meanwhile.
            seen.clear()
        if self.listener is not None:
            self.listener.after_batch(k, inputs, outputs)
        if first:
            missing = set(self.taps) - calls.keys()
            if missing:
                raise RuntimeError(f"The taps {sorted(missing)[:5]} were never reached in the forward pass.")
        elif added < sum(len(entries) for entries in self.observations.values()):
            short = sorted({key for (key, call), entries in self.observations.items()
                            if entries and calls[key] <= call})
            raise RuntimeError(f"Model {k} reached {short} fewer times than the reference.")

    def commit(self) -> None:
        """Add every observation's batch to its space's statistics."""
        for entries in self.observations.values():
            for _, _, batch in entries:
                batch.commit()


def _reading(tap) -> tuple:
    """How a tap reads its tensor (two taps that read one tensor alike observe the same samples)."""
    if hasattr(tap, "node"):
        return (tap.axes, tuple(tap.index.reshape(-1).tolist()), tap.index.shape[1])
    return (tap.axis, tap.offset, tap.block, tap.dim)


def _storage_of(tensor: torch.Tensor):
    """The storage behind ``tensor``, or None for a tensor without one (a wrapper subclass)."""
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _storage_ref(tensor: torch.Tensor):
    """A weak reference to ``tensor``'s storage; the tensor itself (a strong one) where it has none."""
    storage = _storage_of(tensor)
    return (lambda: tensor) if storage is None else weakref.ref(storage)


def _same_storage(ref, tensor: torch.Tensor) -> bool:
    """Whether ``ref`` (from :func:`_storage_ref`, or None) still refers to ``tensor``'s live storage."""
    held = None if ref is None else ref()
    if held is None:
        return False
    # a tensor held strongly was recorded for an identity it still has while it lives
    return isinstance(held, torch.Tensor) or held is _storage_of(tensor)


def _tensor_identity(tensor: torch.Tensor) -> tuple:
    """Equal for two live tensors exactly when they view the same memory the same way."""
    return (tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
