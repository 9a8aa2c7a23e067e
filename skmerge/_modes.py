"""Switch models to evaluation mode and give every submodule its own flag back."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["evaluation_mode"]


@contextmanager
def evaluation_mode(models: Iterable[nn.Module]) -> Iterator[None]:
    """Put ``models`` in evaluation mode for the block, then restore every module's flag.

    ``model.train(mode)`` afterwards would not do: it sets one flag on the
    whole tree, so a BatchNorm frozen (``eval()``) inside a training model
    would come back in training mode.
    """
    models = list(models)
    flags = [(module, module.training) for model in models for module in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, flag in flags:
            module.training = flag
