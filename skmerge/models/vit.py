"""A small Vision Transformer (pre-norm, fused qkv, scaled dot-product attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._utils import scaled

__all__ = ["ViT"]


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` Linear (timm's layout); causal on request."""

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"the embedding width {dim} is not a multiple of heads={heads}")
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, hidden: int, causal: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer for small images, with a width multiplier.

    Patches are embedded by a strided convolution, a class token is
    prepended and learned positional embeddings added; ``depth`` pre-norm
    blocks follow, then a final LayerNorm and a Linear head on the class
    token. The width multiplies the embedding width and the MLP width; the
    number of heads is fixed, so the head width scales.

    Parameters
    ----------
    in_channels : int, default=3
    num_classes : int, default=10
    image_size : int, default=32
        Side of the (square) input images; a multiple of ``patch_size``.
    patch_size : int, default=4
    dim : int, default=64
        Embedding width of the width-1 network.
    depth : int, default=4
        Number of transformer blocks.
    heads : int, default=4
        Attention heads per block; ``round(dim * width)`` must be a multiple.
    mlp_ratio : float, default=2
        MLP hidden width over the embedding width.
    width : float, default=1
        Width multiplier.

    Attributes
    ----------
    patch_embed : torch.nn.Conv2d
        ``patch_size`` x ``patch_size`` convolution of stride ``patch_size``.
    cls_token, pos_embed : torch.nn.Parameter
        The class token ``(1, 1, dim)`` and positional embeddings ``(1, tokens + 1, dim)``.
    blocks : torch.nn.Sequential
        The transformer blocks.
    norm : torch.nn.LayerNorm
    head : torch.nn.Linear

    Examples
    --------
    >>> import torch
    >>> from skmerge.models import ViT
    >>> ViT(in_channels=1, image_size=28, patch_size=7, dim=16, depth=1)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 patch_size: int = 4, dim: int = 64, depth: int = 4, heads: int = 4,
                 mlp_ratio: float = 2, width: float = 1) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
        dim = scaled(dim, width)
        tokens = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, scaled(dim, mlp_ratio)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, num_classes)`` for images ``(batch, C, H, W)``."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])
