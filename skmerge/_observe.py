"""Feed the per-space statistics from inside the models' forward passes.

Each tapped input goes to the statistics in the forward pre-hook that sees it,
right after the layer before produced it and while it is still in the CPU's
caches, instead of after the whole forward pass (by then the activations of
the early layers have been evicted and centering them reads main memory).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

__all__ = ["BatchObserver"]


class BatchObserver:
    """One alignment batch, observed in every model one after the other.

    The first model run (the reference) fixes the observations: one per call
    of a tapped module and tap, except that taps reading the same tensor (a
    residual block's first convolution and its projection shortcut) are
    observed once, so no sample counts twice. Every later model is observed at
    the same (module, call) positions. Each observation has its own batch of
    its space's statistics; :meth:`commit` adds them all.

    Parameters
    ----------
    statistics : list
        One accumulator per space (``ReferenceCovariance`` or alike).
    spaces : list of Space
        Only used to name a space in error messages.
    taps_by_module : dict
        Module path -> ``[(space index, tap)]``.
    """

    def __init__(self, statistics: list, spaces: list, taps_by_module: dict) -> None:
        self.statistics = statistics
        self.spaces = spaces
        self.taps_by_module = taps_by_module
        self.observations: dict[tuple[str, int], list] | None = None

    def run(self, model: nn.Module, k: int, inputs: torch.Tensor) -> None:
        """Run model ``k`` on ``inputs``, adding its view of every observation."""
        first = self.observations is None
        if first:
            self.observations = {}
        calls: dict[str, int] = defaultdict(int)
        # Every observed tensor stays alive until the pass ends, so no two
        # tensors of one pass share a memory identity (see _tensor_identity).
        alive: list[torch.Tensor] = []
        seen: set = set()
        added = 0

        def observe(path: str, tensor: torch.Tensor) -> None:
            nonlocal added
            alive.append(tensor)
            call = calls[path]
            calls[path] += 1
            if first:
                entries = []
                for index, tap in self.taps_by_module[path]:
                    key = (index, tap.axis, tap.offset, tap.block, tap.dim, _tensor_identity(tensor))
                    if key not in seen:
                        seen.add(key)
                        entries.append((index, tap, self.statistics[index]._batch()))
                self.observations[path, call] = entries
            for index, tap, batch in self.observations.get((path, call), ()):
                try:
                    batch.add(k, tap.extract_grouped(tensor))
                except ValueError as error:
                    if "NaN or infinity" not in str(error):
                        raise
                    # Name the space and the model (the statistics know neither).
                    raise ValueError(
                        f"Non-finite activations (NaN or inf) in space {index} "
                        f"({self.spaces[index].name}) of model {k}; check the model's weights and "
                        "the input data.") from None
                added += 1

        handles = []
        try:
            for path in self.taps_by_module:
                def hook(_module, args, _path=path):
                    observe(_path, args[0].detach())
                handles.append(model.get_submodule(path).register_forward_pre_hook(hook))
            model(inputs)
        finally:
            for handle in handles:
                handle.remove()
        if first:
            missing = set(self.taps_by_module) - calls.keys()
            if missing:
                raise RuntimeError(f"Modules {sorted(missing)} were never called in the forward pass.")
        elif added < sum(len(entries) for entries in self.observations.values()):
            short = sorted({path for (path, call), entries in self.observations.items()
                            if entries and calls[path] <= call})
            raise RuntimeError(f"Model {k} called {short} fewer times than the reference.")

    def commit(self) -> None:
        """Add every observation's batch to its space's statistics."""
        for entries in self.observations.values():
            for _, _, batch in entries:
                batch.commit()


def _tensor_identity(tensor: torch.Tensor) -> tuple:
    """Equal for two live tensors exactly when they view the same memory the same way."""
    return (tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
