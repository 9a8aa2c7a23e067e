"""Build reference architectures by name."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from .mlp import MLP
from .resnet import CifarResNet20, ResNet18
from .vgg import VGG
from .vit import ViT

__all__ = ["available_models", "get_model", "architecture_of"]

#: Attribute under which :func:`get_model` records how a model was built.
ARCH_ATTR = "skmerge_architecture"


def _mlp(in_features: int | None = None, in_channels: int | None = None,
         image_size: int | None = None, num_classes: int = 10, **kw: Any) -> nn.Module:
    if in_features is None:
        if in_channels is None or image_size is None:
            raise TypeError(
                "get_model('mlp') needs in_features, or in_channels and image_size"
            )
        in_features = in_channels * image_size * image_size
    return MLP(in_features, num_classes, **kw)


def _vgg(cfg: str) -> Callable[..., nn.Module]:
    def build(**kw: Any) -> nn.Module:
        return VGG(cfg, **kw)
    return build


def _without_image_size(cls: type[nn.Module]) -> Callable[..., nn.Module]:
    # Global average pooling makes these nets size-agnostic; accepting (and
    # ignoring) image_size lets callers pass one set of data kwargs to any name.
    def build(image_size: int | None = None, **kw: Any) -> nn.Module:
        return cls(**kw)
    return build


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "vgg11": _vgg("vgg11"),
    "vgg16": _vgg("vgg16"),
    "resnet20": _without_image_size(CifarResNet20),
    "resnet18": _without_image_size(ResNet18),
    "vit": ViT,
}


def available_models() -> list[str]:
    """List the names accepted by :func:`get_model`.

    Returns
    -------
    list of str
        ``["mlp", "resnet18", "resnet20", "vgg11", "vgg16", "vit"]``.
    """
    return sorted(_REGISTRY)


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a reference architecture by name.

    Every model accepts the data keywords ``in_channels``, ``image_size`` and
    ``num_classes`` (ResNets ignore ``image_size``; the MLP derives
    ``in_features = in_channels * image_size**2`` unless ``in_features`` is
    given), so the output of :func:`skmerge.datasets.dataset_info` can be
    passed to any name. Other keywords go to the class (``width``, ``hidden``,
    ``batch_norm``, ``stem``, ...).

    The returned module remembers its name and keywords (see
    :func:`architecture_of`); :func:`skmerge.training.save_checkpoint` stores
    them so that :func:`skmerge.training.load_model` can rebuild the model.

    Parameters
    ----------
    name : {"mlp", "vgg11", "vgg16", "resnet20", "resnet18", "vit"}
        Architecture name (case-insensitive).
    **kwargs
        Constructor keywords, see :class:`MLP`, :class:`VGG`,
        :class:`CifarResNet20`, :class:`ResNet18` and :class:`ViT`.

    Returns
    -------
    torch.nn.Module
        A freshly initialized model (uses the global torch RNG).

    Raises
    ------
    ValueError
        If ``name`` is unknown; the message lists the available names.

    Examples
    --------
    >>> from skmerge.models import get_model
    >>> net = get_model("vgg11", in_channels=1, image_size=8, num_classes=10, width=0.5)
    >>> net.skmerge_architecture["name"]
    'vgg11'
    """
    key = str(name).lower()
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(available_models())}"
        )
    model = _REGISTRY[key](**kwargs)
    setattr(model, ARCH_ATTR, {"name": key, "kwargs": copy.deepcopy(kwargs)})
    return model


def architecture_of(model: nn.Module) -> dict[str, Any] | None:
    """Return how a model was built by :func:`get_model`, if it was.

    Parameters
    ----------
    model : torch.nn.Module
        Any module.

    Returns
    -------
    dict or None
        ``{"name": str, "kwargs": dict}`` such that
        ``get_model(d["name"], **d["kwargs"])`` rebuilds the architecture, or
        ``None`` for modules not built by :func:`get_model`.
    """
    spec = getattr(model, ARCH_ATTR, None)
    return copy.deepcopy(spec) if isinstance(spec, dict) else None
