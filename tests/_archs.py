"""Small architectures shared by the graph and merger tests.

Every class has ``input_shape`` (without the batch axis) and a classmethod
``example_input(batch=2, seed=0)``; ``example_input(arch)`` works on a class or
an instance. The models are tiny so the tests run in seconds, but each one
exercises a family of rules of ``skmerge.graph``:

- ``MLP``: Linear + activation (``activation=None``: purely linear).
- ``VGGBN``: conv + BN + ReLU blocks, max pooling, ``nn.Flatten`` of
  ``(C, H, W)`` into a Linear head (consumer columns in blocks of ``H*W``).
- ``CifarResNet``: BasicBlocks with identity and 1x1-conv projection
  shortcuts (residual streams), ``F.relu``, ``+=``, global average pooling.
- ``ResNet18Like``: torchvision's ResNet18 layout (7x7 stride-2 stem, max
  pooling, 4 stages of 2 BasicBlocks, ``downsample`` Sequential, adaptive
  average pooling, ``torch.flatten``, ``fc``) with a width multiplier.
- ``CatNet``: two conv branches joined with ``torch.cat`` (a BatchNorm over
  the concatenation, then a conv reading both), ``x.relu()``, ``x.mean``.
- ``NormNet``: GroupNorm (block-diagonal transforms), LayerNorm over
  ``[C, H, W]`` and over features, ``x.view(x.size(0), -1)``, ``F.gelu``.
"""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "VGGBN", "CifarResNet", "ResNet18Like", "CatNet", "NormNet", "example_input", "ARCHITECTURES"]


class _Example:
    input_shape: tuple = ()

    @classmethod
    def example_input(cls, batch: int = 2, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn((batch, *cls.input_shape), generator=generator, dtype=dtype)


def example_input(arch, batch: int = 2, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """A random batch for an architecture class or instance."""
    return arch.example_input(batch, seed, dtype)


class MLP(_Example, nn.Module):
    """Linear -> act -> Linear -> act -> Linear: 2 spaces of ``hidden`` sizes."""

    input_shape = (12,)

    def __init__(self, in_features=12, hidden=(16, 16), num_classes=5, activation=nn.ReLU):
        super().__init__()
        layers, width = [], in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if activation is not None:
                layers.append(activation())
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class VGGBN(_Example, nn.Module):
    """conv-BN-ReLU, pool, conv-BN-ReLU, pool, conv-BN-ReLU, flatten, Linear-ReLU-Linear.

    Spaces: features.0 (w), features.4 (2w), features.8 (2w, read by the
    head with k = 2*2 = 4 columns per channel), classifier.0 (hidden).
    """

    input_shape = (3, 8, 8)

    def __init__(self, width=4, hidden=16, num_classes=5):
        super().__init__()
        w = width

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, w), nn.MaxPool2d(2), *block(w, 2 * w), nn.MaxPool2d(2), *block(2 * w, 2 * w)
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(2 * w * 2 * 2, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


class CifarBasicBlock(nn.Module):
    """CIFAR-style BasicBlock; a 1x1-conv projection shortcut when the shape changes."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class CifarResNet(_Example, nn.Module):
    """ResNet20-like (``blocks`` per stage, widths ``w, 2w, 4w``).

    Spaces: one residual stream per stage (stem or projection conv joined with
    every block's conv2) and one per block (its conv1): 3 + 3 * blocks.
    """

    input_shape = (3, 8, 8)

    def __init__(self, width=4, blocks=2, num_classes=5):
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for i, w in enumerate(widths):
            layers = []
            for b in range(blocks):
                layers.append(CifarBasicBlock(cin, w, stride=2 if (i > 0 and b == 0) else 1))
                cin = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (``downsample`` is None or Sequential(conv1x1, BN))."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18Like(_Example, nn.Module):
    """torchvision ResNet18 layout with widths ``w, 2w, 4w, 8w``: 4 streams + 8 block spaces."""

    input_shape = (3, 32, 32)

    def __init__(self, width=4, num_classes=5):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(width, 1)
        self.layer2 = self._make_layer(2 * width, 2)
        self.layer3 = self._make_layer(4 * width, 2)
        self.layer4 = self._make_layer(8 * width, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample), BasicBlock(planes, planes)]
        self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class CatNet(_Example, nn.Module):
    """Two conv branches concatenated on channels, a BN over both, a conv reading both.

    Spaces: branch_a (c1), branch_b (c2) -- each read by ``mix`` at offsets 0
    and c1 -- and mix (c3), read by ``fc`` after a spatial mean.
    """

    input_shape = (3, 8, 8)

    def __init__(self, c1=4, c2=6, c3=8, num_classes=5):
        super().__init__()
        self.branch_a = nn.Conv2d(3, c1, 3, padding=1)
        self.branch_b = nn.Conv2d(3, c2, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(c2)
        self.bn_cat = nn.BatchNorm2d(c1 + c2)
        self.mix = nn.Conv2d(c1 + c2, c3, 3, padding=1)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x):
        a = self.branch_a(x).relu()
        b = torch.relu(self.bn_b(self.branch_b(x)))
        h = self.bn_cat(torch.cat([a, b], dim=1))
        h = F.relu(self.mix(h))
        return self.fc(h.mean(dim=(2, 3)))


class NormNet(_Example, nn.Module):
    """conv-GroupNorm-ReLU, conv-LayerNorm([C,H,W])-ReLU, view, Linear-LayerNorm-GELU-Linear.

    Spaces: conv1 (8, block_size 8 // 2 = 4), conv2 (8; LayerNorm weights and
    fc1 columns with k = 4*4 = 16), fc1 (16).
    """

    input_shape = (3, 4, 4)

    def __init__(self, channels=8, groups=2, hidden=16, num_classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.gn = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.ln = nn.LayerNorm([channels, 4, 4])
        self.fc1 = nn.Linear(channels * 16, hidden)
        self.ln_fc = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = F.relu(self.gn(self.conv1(x)))
        x = F.relu(self.ln(self.conv2(x)))
        x = x.view(x.size(0), -1)
        return self.fc2(F.gelu(self.ln_fc(self.fc1(x))))


ARCHITECTURES = {
    "mlp": MLP,
    "vgg": VGGBN,
    "resnet": CifarResNet,
    "resnet18": ResNet18Like,
    "cat": CatNet,
    "norm": NormNet,
}


# ----------------------------------------------------------- shared test models
def randomize_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics and affine parameters, as a trained model has."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            shape = module.running_mean.shape
            module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
            module.weight.data.copy_(1 + 0.2 * torch.randn(shape, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(shape, generator=generator))
    return model


def calibrate_batchnorm(model: nn.Module, x: torch.Tensor, seed: int) -> nn.Module:
    """BatchNorm statistics of the data and perturbed affine parameters, as a trained model has.

    Random statistics leave units dead (zero on every input) in deep nets with
    ReLU6 or many BatchNorms, and matching dead units is ambiguous; statistics
    of the data do not.
    """
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = None
        m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype))
    return model


def make_model(name: str, seed: int, dtype=torch.float64, randomize_bn: bool = True) -> nn.Module:
    """``ARCHITECTURES[name]`` seeded, in evaluation mode; BatchNorm randomized unless told not to."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[name]().to(dtype)
    if randomize_bn:
        randomize_batchnorm(model, seed)
    return model.eval()


def inputs(name: str, n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """``n`` seeded example inputs of ``ARCHITECTURES[name]`` (float64 by default)."""
    return example_input(ARCHITECTURES[name], n, seed, dtype)


@torch.no_grad()
def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs on ``x`` in evaluation mode."""
    return model.eval()(x)


def state_copy(model: nn.Module) -> dict:
    """A copy of the model's state_dict (cloned tensors)."""
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_same_state(before: dict, model: nn.Module) -> None:
    """The model's state_dict has the same keys and bit-identical tensors as ``before``."""
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def digits_mlps(n_models: int, epochs: int = 40):
    """``n_models`` MLPs 64-64 trained on digits with seeds 0, 1, ...; also the train and test sets."""
    from skmerge.datasets import load_digits
    from skmerge.models import get_model
    from skmerge.training import train_model

    train = load_digits("train")
    models = []
    for seed in range(n_models):
        torch.manual_seed(seed)
        model = get_model("mlp", in_features=64, num_classes=10, hidden=(64, 64))
        models.append(train_model(model, train, epochs=epochs, seed=seed))
    return models, train, load_digits("test")


def tap_samples(model, space, inputs):
    """A space's samples at its taps, captured independently of skmerge's observer.

    Graph taps: the model is exported again (real tensors, eval mode) and a
    ``torch.fx.Interpreter`` records the tapped nodes; module taps: forward
    pre-hooks. Returns the samples of every tap stacked, as float64 numpy.
    """
    import numpy as np
    from skmerge.graph import GraphTap
    from skmerge.graph._export import _TensorOutputs

    captured = []
    graph_taps = [t for t in space.taps if isinstance(t, GraphTap)]
    if graph_taps:
        program = torch.export.export(_TensorOutputs(model).eval(), (inputs,), strict=False)
        wanted = {t.node: [] for t in graph_taps}

        class Recorder(torch.fx.Interpreter):
            def run_node(self, n):
                value = super().run_node(n)
                if n.name in wanted:
                    wanted[n.name].append(value)
                return value

        with torch.no_grad():
            Recorder(program.module()).run(inputs)
        for tap in graph_taps:
            captured.extend(tap.extract(v).detach().double() for v in wanted[tap.node])
    else:
        handles = [model.get_submodule(tap.module).register_forward_pre_hook(
            lambda _m, args, tap=tap: captured.append(tap.extract(args[0]).detach().double()))
            for tap in space.taps]
        try:
            with torch.no_grad():
                model(inputs)
        finally:
            for handle in handles:
                handle.remove()
    return np.concatenate([c.numpy() for c in captured])


class AnyWidthNet(nn.Module):
    """Accepts any number of input features (and integer inputs), for scikit-learn's estimator checks."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool1d(4)
        self.fc1 = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        x = self.pool(x.to(torch.float32).reshape(x.shape[0], 1, -1)).flatten(1)
        return self.fc2(self.act(self.fc1(x)))


def any_width_models(n: int = 2) -> list:
    """``n`` seeded :class:`AnyWidthNet` models."""
    torch.manual_seed(0)
    return [AnyWidthNet() for _ in range(n)]


def quiet(fn):
    """``fn()`` with every warning silenced (small random data warns about small samples)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()
