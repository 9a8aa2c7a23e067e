"""Residual networks: CIFAR ResNet20 and torchvision-style ResNet18."""

from __future__ import annotations

import torch
from torch import nn

from ._utils import scaled

__all__ = ["BasicBlock", "CifarResNet20", "ResNet18"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (torchvision's names).

    Parameters
    ----------
    in_planes : int
        Input channels.
    planes : int
        Output channels.
    stride : int, default=1
        Stride of the first conv and of the projection shortcut.

    Attributes
    ----------
    downsample : torch.nn.Sequential or None
        ``Sequential(Conv1x1, BatchNorm2d)`` projection ("option B") when the
        stride or the channel count changes, else ``None`` (identity).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        # Not in-place: activations recorded by hooks must not be overwritten.
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Parameters
        ----------
        x : torch.Tensor
            Input of shape ``(batch, in_planes, H, W)``.

        Returns
        -------
        torch.Tensor
            Output of shape ``(batch, planes, H / stride, W / stride)``.
        """
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    # torchvision's initialization, so both families train the same way.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_planes, planes, stride)]
    layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarResNet20(nn.Module):
    """ResNet20 for 32x32 images (He et al. 2016) with a width multiplier.

    A 3x3 stem conv with ``16 * width`` channels, three stages of three
    :class:`BasicBlock` (``16w``, ``32w``, ``64w`` channels; stride 2 at the
    start of stages 2 and 3, with 1x1 conv + BatchNorm projection shortcuts,
    "option B"), global average pooling and a linear ``fc`` layer. Works on
    any image size of at least 4x4 (e.g. 8x8 digits, 28x28 Fashion-MNIST).

    Parameters
    ----------
    width : float, default=1
        Width multiplier on every channel count.
    num_classes : int, default=10
        Number of output logits.
    in_channels : int, default=3
        Channels of the input images.
    zero_init_residual : bool, default=False
        Initialize the last BatchNorm of each block to zero.

    Examples
    --------
    >>> import torch
    >>> from skmerge.models import CifarResNet20
    >>> CifarResNet20(width=0.5)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        width: float = 1,
        num_classes: int = 10,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        c1, c2, c3 = (scaled(c, width) for c in (16, 32, 64))
        self.conv1 = _conv3x3(in_channels, c1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu = nn.ReLU()
        self.layer1 = _make_stage(c1, c1, 3, 1)
        self.layer2 = _make_stage(c1, c2, 3, 2)
        self.layer3 = _make_stage(c2, c3, 3, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)
        _init_weights(self, zero_init_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch of images.

        Parameters
        ----------
        x : torch.Tensor
            Images of shape ``(batch, in_channels, H, W)``.

        Returns
        -------
        torch.Tensor
            Logits of shape ``(batch, num_classes)``.
        """
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet18(nn.Module):
    """ResNet18 with torchvision's layout and parameter names.

    ``conv1 -> bn1 -> relu -> maxpool -> layer1..layer4 (2 BasicBlocks each,
    64w/128w/256w/512w channels) -> avgpool -> flatten -> fc``. With
    ``width=1`` and ``stem="imagenet"`` the ``state_dict`` keys and shapes are
    those of ``torchvision.models.resnet18`` (e.g. ``layer2.0.downsample.0.weight``),
    so its checkpoints load directly.

    Parameters
    ----------
    width : float, default=1
        Width multiplier on every channel count.
    num_classes : int, default=1000
        Number of output logits.
    in_channels : int, default=3
        Channels of the input images.
    stem : {"imagenet", "cifar"}, default="imagenet"
        ``"imagenet"``: 7x7 stride-2 conv and 3x3 stride-2 max pool (for
        images of 64 px or more). ``"cifar"``: 3x3 stride-1 conv and no
        pooling (``maxpool`` is an ``nn.Identity``), for 32x32 and smaller.
    zero_init_residual : bool, default=False
        Initialize the last BatchNorm of each block to zero (as torchvision's
        option of the same name).

    Examples
    --------
    >>> import torch
    >>> from skmerge.models import ResNet18
    >>> ResNet18(width=0.25, num_classes=10, stem="cifar")(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        width: float = 1,
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        c = [scaled(p, width) for p in (64, 128, 256, 512)]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, c[0], 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        elif stem == "cifar":
            self.conv1 = _conv3x3(in_channels, c[0])
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.bn1 = nn.BatchNorm2d(c[0])
        self.relu = nn.ReLU()
        self.layer1 = _make_stage(c[0], c[0], 2, 1)
        self.layer2 = _make_stage(c[0], c[1], 2, 2)
        self.layer3 = _make_stage(c[1], c[2], 2, 2)
        self.layer4 = _make_stage(c[2], c[3], 2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c[3], num_classes)
        _init_weights(self, zero_init_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch of images.

        Parameters
        ----------
        x : torch.Tensor
            Images of shape ``(batch, in_channels, H, W)``.

        Returns
        -------
        torch.Tensor
            Logits of shape ``(batch, num_classes)``.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
