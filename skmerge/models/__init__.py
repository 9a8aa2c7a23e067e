"""Reference architectures with width multipliers.

All models are traceable with :func:`torch.fx.symbolic_trace` and use only the
operations that :func:`skmerge.graph.find_spaces` understands (Linear, Conv2d,
BatchNorm2d, ReLU, max/adaptive-average pooling, Dropout, Identity, flatten,
residual addition); :class:`ViT` needs the ``torch.export`` walker (attention,
LayerNorm, GELU, a class token).
"""

from .mlp import MLP
from .registry import architecture_of, available_models, get_model
from .resnet import BasicBlock, CifarResNet20, ResNet18
from .vgg import VGG, VGG_CONFIGS
from .vit import ViT

__all__ = [
    "MLP",
    "VGG",
    "VGG_CONFIGS",
    "BasicBlock",
    "CifarResNet20",
    "ResNet18",
    "ViT",
    "get_model",
    "available_models",
    "architecture_of",
]
