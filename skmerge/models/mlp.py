"""Multi-layer perceptron with a width multiplier."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._utils import scaled

__all__ = ["MLP"]


class MLP(nn.Module):
    """Fully connected ReLU network that flattens its input first.

    Parameters
    ----------
    in_features : int
        Number of input features after flattening (e.g. ``1 * 8 * 8`` for
        digits, ``1 * 28 * 28`` for Fashion-MNIST).
    num_classes : int
        Number of output logits.
    hidden : sequence of int, default=(512, 512, 512)
        Hidden layer sizes of the width-1 network.
    width : float, default=1
        Width multiplier applied to every hidden size (rounded, at least 1).
    dropout : float, default=0.0
        Dropout probability after each hidden activation (0 disables it and
        adds no module).

    Attributes
    ----------
    flatten : torch.nn.Flatten
        Flattens everything but the batch axis, so images can be fed directly.
    features : torch.nn.Sequential
        ``Linear -> ReLU [-> Dropout]`` per hidden layer.
    classifier : torch.nn.Linear
        Output layer.

    Examples
    --------
    >>> import torch
    >>> from skmerge.models import MLP
    >>> MLP(64, 10, hidden=(32,), width=2)(torch.zeros(5, 1, 8, 8)).shape
    torch.Size([5, 10])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (512, 512, 512),
        width: float = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        prev = int(in_features)
        for h in hidden:
            units = scaled(h, width)
            layers += [nn.Linear(prev, units), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = units
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch.

        Parameters
        ----------
        x : torch.Tensor
            Batch whose trailing dimensions flatten to ``in_features``.

        Returns
        -------
        torch.Tensor
            Logits of shape ``(batch, num_classes)``.
        """
        return self.classifier(self.features(self.flatten(x)))
