"""Helpers of the benchmark scripts that change models: they must keep the models' functions."""

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from converged import dead_channels  # noqa: E402
from resnet_candidates import batchnorm_folded  # noqa: E402

from skmerge.models import CifarResNet20  # noqa: E402


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm affine parameters and running statistics (as after training)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator))
                module.running_mean.copy_(torch.randn(n, generator=generator))
                module.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.1)
    return model.eval()


def test_batchnorm_folded_computes_the_same_function_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = _trained_like(CifarResNet20(width=0.5, in_channels=1, num_classes=10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = batchnorm_folded(model).eval()
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    batchnorms = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batchnorms and all(bool((m.weight == 1).all() and (m.running_mean == 0).all()) for m in batchnorms)


def test_dead_channels_counts_the_relu_channels_never_active_over_every_call():
    """Linear(4, 5) -> ReLU, called twice (one module): the first call's channel 0 and the second
    call's channels 0 and 1 are never positive, so 3 of the 10 channels are dead."""
    layer, relu = nn.Linear(4, 5), nn.ReLU()
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor([-1.0, 0.5, 1.0, 1.0, 1.0]))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.relu = layer, relu

        def forward(self, x):
            return self.relu(self.layer(x)) + self.relu(self.layer(x) - 0.6)

    model = Twice()
    x = torch.randn(7, 4)
    assert dead_channels(model, x, batch_size=3) == 0.3
    assert all(not m._forward_hooks for m in model.modules())
