"""Modern architectures written block for block like the real ones, tiny.

torchvision's and timm's wheels do not import with the CPU torch of the test
machine, so the blocks that break naive graph walkers are written here the way
those libraries write them:

- ``MobileNetV2``: inverted residuals (1x1 expand, depthwise 3x3, 1x1 project,
  ReLU6, residual when shapes match), as torchvision's ``mobilenet_v2``.
- ``EfficientNetBlockNet``: MBConv with squeeze-excitation and SiLU
  (torchvision's ``efficientnet_b0`` blocks).
- ``ConvNeXtNet``: depthwise 7x7, ``permute`` to NHWC, LayerNorm, Linear
  expansion, GELU, Linear, layer scale, ``permute`` back, residual; a
  channels-first LayerNorm2d that calls ``F.layer_norm`` itself (timm).
- ``ResNeXtNet``: bottlenecks with a grouped 3x3 convolution.
- ``ShuffleNetV2``: units with channel split, two branches, concatenation and
  the reshape-transpose-reshape channel shuffle.
- ``ViTMHA``: patch embedding, class token, learned positional embedding,
  ``nn.MultiheadAttention`` blocks (pre-LN), class-token head (torchvision).
- ``TimmViT``: fused ``qkv`` Linear, ``reshape``/``permute``/``unbind``,
  ``F.scaled_dot_product_attention``, layer scale (timm's ``Block``).
- ``GPT2Like``: token and position embeddings, separate q/k/v Linears,
  ``q @ k.transpose(-2, -1)``, scaling, a causal mask buffer, softmax,
  ``att @ v``, optionally an output layer tied to the token embedding.
- ``BertLike``: post-LN encoder with separate q/k/v, GELU MLP, pooler.
- ``SwinLike``: window partition, windowed attention with a relative position
  bias table, window reverse.
- ``LSTMClassifier``: embedding, 2-layer LSTM, last-step head.

Each class has ``example_input(batch, seed, dtype)``.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class _Images:
    input_shape = (3, 16, 16)

    @classmethod
    def example_input(cls, batch=2, seed=0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        return torch.randn((batch, *cls.input_shape), generator=g, dtype=dtype)


class _Tokens:
    vocab = 31
    seq = 8

    @classmethod
    def example_input(cls, batch=2, seed=0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, cls.vocab, (batch, cls.seq), generator=g)


# ----------------------------------------------------------------------------- CNNs
class ConvBNAct(nn.Sequential):
    def __init__(self, cin, cout, k=3, stride=1, groups=1, act=nn.ReLU6):
        super().__init__(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), act(inplace=True) if act is not None else nn.Identity())


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [ConvBNAct(cin, hidden, 1)] if expand != 1 else []
        layers += [ConvBNAct(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(_Images, nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.features = nn.Sequential(
            ConvBNAct(3, 8, stride=2), InvertedResidual(8, 8, 1, 1), InvertedResidual(8, 12, 2, 4),
            InvertedResidual(12, 12, 1, 4), ConvBNAct(12, 24, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(24, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class SqueezeExcitation(nn.Module):
    def __init__(self, channels, squeeze):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = nn.SiLU(), nn.Sigmoid()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class MBConv(nn.Module):
    def __init__(self, cin, cout, expand, stride):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            ConvBNAct(cin, hidden, 1, act=nn.SiLU), ConvBNAct(hidden, hidden, 3, stride, hidden, nn.SiLU),
            SqueezeExcitation(hidden, max(1, cin // 4)), ConvBNAct(hidden, cout, 1, act=None))

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_res else out


class EfficientNetBlockNet(_Images, nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = ConvBNAct(3, 8, stride=2, act=nn.SiLU)
        self.blocks = nn.Sequential(MBConv(8, 8, 4, 1), MBConv(8, 12, 4, 2))
        self.head = nn.Linear(12, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class LayerNorm2d(nn.LayerNorm):
    """timm's channels-first LayerNorm: permute, F.layer_norm with its own parameters, permute back."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim, layer_scale=1e-1):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x):
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = (self.gamma * x).permute(0, 3, 1, 2)
        return shortcut + x


class ConvNeXtNet(_Images, nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), LayerNorm2d(8, eps=1e-6))
        self.stage1 = nn.Sequential(ConvNeXtBlock(8), ConvNeXtBlock(8))
        self.down = nn.Sequential(LayerNorm2d(8, eps=1e-6), nn.Conv2d(8, 16, 2, stride=2))
        self.stage2 = ConvNeXtBlock(16)
        self.norm = nn.LayerNorm(16, eps=1e-6)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean((-2, -1))))


class ResNeXtBottleneck(nn.Module):
    def __init__(self, cin, width, cout, groups, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNeXtNet(_Images, nn.Module):
    def __init__(self, num_classes=5, groups=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(ResNeXtBottleneck(8, 16, 16, groups), ResNeXtBottleneck(16, 16, 16, groups))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.layer1(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def channel_shuffle(x, groups):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """torchvision's InvertedResidual of ShuffleNetV2."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.Conv2d(cin, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        first = cin if stride > 1 else branch
        self.branch2 = nn.Sequential(
            nn.Conv2d(first, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True),
            nn.Conv2d(branch, branch, 3, stride, 1, groups=branch, bias=False), nn.BatchNorm2d(branch),
            nn.Conv2d(branch, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(_Images, nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.stage2 = nn.Sequential(ShuffleUnit(8, 16, 2), ShuffleUnit(16, 16, 1), ShuffleUnit(16, 16, 1))
        self.conv5 = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True))
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        x = self.conv5(self.stage2(self.conv1(x)))
        return self.fc(x.mean([2, 3]))


# ----------------------------------------------------------------------------- attention
class _Patches(nn.Module):
    def __init__(self, dim, patch=4, channels=3, size=16):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (size // patch) ** 2 + 1, dim))

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed


class MHABlock(nn.Module):
    """torchvision's EncoderBlock: pre-LN, nn.MultiheadAttention, MLP."""

    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp, dim))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class ViTMHA(_Images, nn.Module):
    def __init__(self, dim=16, heads=4, depth=2, num_classes=5):
        super().__init__()
        self.embed = _Patches(dim)
        self.layers = nn.Sequential(*[MHABlock(dim, heads, 2 * dim) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.ln(self.layers(self.embed(x)))
        return self.head(x[:, 0])


class TimmAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class LayerScale(nn.Module):
    def __init__(self, dim, init=0.1):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class TimmBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim), TimmAttention(dim, heads), LayerScale(dim)
        self.norm2, self.ls2 = nn.LayerNorm(dim), LayerScale(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class TimmViT(_Images, nn.Module):
    def __init__(self, dim=16, heads=4, depth=2, num_classes=5):
        super().__init__()
        self.patch_embed = _Patches(dim)
        self.blocks = nn.Sequential(*[TimmBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.norm(self.blocks(self.patch_embed(x)))
        return self.head(x[:, 1:].mean(1) + x[:, 0])


class CausalSelfAttention(nn.Module):
    """nanoGPT style with separate q/k/v Linears and explicit matmuls."""

    def __init__(self, dim, heads, block):
        super().__init__()
        self.n_head = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, dim)
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block),
                             persistent=False)

    def forward(self, x):
        B, T, C = x.size()
        q = self.q(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class GPTBlock(nn.Module):
    def __init__(self, dim, heads, block):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(dim), CausalSelfAttention(dim, heads, block)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Like(_Tokens, nn.Module):
    def __init__(self, dim=16, heads=4, depth=2, tied=False):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(self.vocab, dim), nn.Embedding(self.seq, dim)
        self.h = nn.ModuleList([GPTBlock(dim, heads, self.seq) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, self.vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class GPT2Tied(GPT2Like):
    """GPT2Like whose output layer is the token embedding (tied weights)."""

    def __init__(self, dim=16, heads=4, depth=2):
        super().__init__(dim, heads, depth, tied=True)


class BertLayer(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn_out, self.attn_norm = nn.Linear(dim, dim), nn.LayerNorm(dim)
        self.intermediate, self.output = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.out_norm = nn.LayerNorm(dim)

    def split(self, x):
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)

    def forward(self, x, mask):
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + mask
        ctx = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3)
        ctx = ctx.reshape(x.shape)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.out_norm(x + self.output(F.gelu(self.intermediate(x))))


class BertLike(_Tokens, nn.Module):
    def __init__(self, dim=16, heads=4, depth=2, num_classes=3):
        super().__init__()
        self.word, self.position = nn.Embedding(self.vocab, dim), nn.Embedding(self.seq, dim)
        self.emb_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList([BertLayer(dim, heads) for _ in range(depth)])
        self.pooler, self.classifier = nn.Linear(dim, dim), nn.Linear(dim, num_classes)

    def forward(self, ids):
        mask = (ids == 0).to(torch.float32)[:, None, None, :] * -1e4
        x = self.emb_norm(self.word(ids) + self.position.weight[None, : ids.shape[1]])
        for layer in self.layers:
            x = layer(x, mask)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


class WindowAttention(nn.Module):
    def __init__(self, dim, window, heads):
        super().__init__()
        self.window, self.heads = window, heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(0.02 * torch.randn((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1])
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        attn = (attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)).softmax(-1)
        x = (attn @ v).transpose(1, 2).reshape(B_, N, C)
        return self.proj(x)


class SwinLike(_Images, nn.Module):
    """Patch embedding, one Swin block (windows of 2x2 patches), pooled head."""

    def __init__(self, dim=16, heads=2, window=2, num_classes=5):
        super().__init__()
        self.window = window
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.norm1, self.attn = nn.LayerNorm(dim), WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).permute(0, 2, 3, 1)  # B, H, W, C
        B, H, W, C = x.shape
        w = self.window
        y = self.norm1(x).view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)
        y = self.attn(y).view(B, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean((1, 2)))


class LSTMClassifier(_Tokens, nn.Module):
    def __init__(self, dim=8, hidden=12, num_classes=3):
        super().__init__()
        self.embed = nn.Embedding(self.vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, idx):
        out, _ = self.lstm(self.embed(idx))
        return self.fc(out[:, -1])


MODERN = {
    "mobilenet_v2": MobileNetV2,
    "efficientnet": EfficientNetBlockNet,
    "convnext": ConvNeXtNet,
    "resnext": ResNeXtNet,
    "shufflenet_v2": ShuffleNetV2,
    "vit_mha": ViTMHA,
    "timm_vit": TimmViT,
    "gpt2": GPT2Like,
    "gpt2_tied": GPT2Tied,
    "bert": BertLike,
    "swin": SwinLike,
    "lstm": LSTMClassifier,
}
