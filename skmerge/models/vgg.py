"""VGG for small images (the CIFAR variant used in the merging literature)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._utils import scaled

__all__ = ["VGG", "VGG_CONFIGS"]

#: Layer configurations: an int is a 3x3 conv with that many (width-1)
#: channels, ``"M"`` a 2x2 max pool.
VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG network for small images with a width multiplier.

    ``features`` is a stack of ``Conv3x3 [-> BatchNorm] -> ReLU`` blocks and
    2x2 max pools; its output is flattened and fed to ``classifier`` (a single
    ``Linear`` by default, as in the CIFAR VGGs of Git Re-Basin, ZipIt! and
    CCA Merge).

    Pooling adapts to the image size at construction: a ``"M"`` entry whose
    input would be smaller than 2x2 becomes an ``nn.Identity`` (kept in place
    so that ``state_dict`` keys do not depend on the image size). With 32x32
    inputs all five pools of VGG11/16 are used (1x1 output); 28x28 inputs use
    four (28-14-7-3-1) and 8x8 inputs three (8-4-2-1). The classifier reads
    ``channels * s * s`` features, where ``s`` is the final spatial size
    (1 for every image size up to 32).

    Parameters
    ----------
    cfg : {"vgg11", "vgg13", "vgg16", "vgg19"} or list, default="vgg11"
        Name of a configuration in :data:`VGG_CONFIGS`, or a custom list of
        channel counts and ``"M"`` pools.
    in_channels : int, default=3
        Channels of the input images.
    num_classes : int, default=10
        Number of output logits.
    width : float, default=1
        Width multiplier applied to every conv and hidden classifier layer.
    batch_norm : bool, default=True
        Insert ``BatchNorm2d`` after each conv (convs then have no bias,
        which BatchNorm would cancel anyway).
    image_size : int, default=32
        Height (= width) of the input images; decides which pools are kept
        and the classifier's input size.
    classifier_hidden : sequence of int, default=()
        Width-1 sizes of hidden ``Linear -> ReLU [-> Dropout]`` layers in the
        classifier; empty gives a single ``Linear``.
    dropout : float, default=0.0
        Dropout probability in the hidden classifier layers.

    Examples
    --------
    >>> import torch
    >>> from skmerge.models import VGG
    >>> net = VGG("vgg11", in_channels=1, image_size=8, width=0.25)
    >>> net(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        cfg: str | Sequence[int | str] = "vgg11",
        in_channels: int = 3,
        num_classes: int = 10,
        width: float = 1,
        batch_norm: bool = True,
        image_size: int = 32,
        classifier_hidden: Sequence[int] = (),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(cfg, str):
            if cfg not in VGG_CONFIGS:
                raise ValueError(
                    f"unknown VGG configuration {cfg!r}; choose one of "
                    f"{sorted(VGG_CONFIGS)} or pass a list"
                )
            cfg = VGG_CONFIGS[cfg]
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size!r}")
        layers: list[nn.Module] = []
        channels, size = in_channels, int(image_size)
        for item in cfg:
            if item == "M":
                # Pooling a 1x1 map is impossible: skip it, keep the index.
                if size >= 2:
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                    size //= 2
                else:
                    layers.append(nn.Identity())
                continue
            out = scaled(int(item), width)
            layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            channels = out
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        head: list[nn.Module] = []
        prev = channels * size * size
        for h in classifier_hidden:
            units = scaled(h, width)
            head += [nn.Linear(prev, units), nn.ReLU()]
            if dropout > 0:
                head.append(nn.Dropout(dropout))
            prev = units
        head.append(nn.Linear(prev, num_classes))
        self.classifier = head[0] if len(head) == 1 else nn.Sequential(*head)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch of images.

        Parameters
        ----------
        x : torch.Tensor
            Images of shape ``(batch, in_channels, image_size, image_size)``.

        Returns
        -------
        torch.Tensor
            Logits of shape ``(batch, num_classes)``.
        """
        return self.classifier(self.flatten(self.features(x)))
