"""Helpers of the benchmark scripts that change models: they must keep the models' functions."""

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from resnet_candidates import batchnorm_folded, before_and_after_relus  # noqa: E402

from skmerge import ModelMerger, PermutationAligner  # noqa: E402
from skmerge.graph import find_spaces, permute_model  # noqa: E402
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


def test_spaces_observed_before_and_after_the_relus_recover_a_permuted_copy():
    torch.manual_seed(0)
    model = _trained_like(CifarResNet20(width=0.5, in_channels=1, num_classes=10))
    x = torch.randn(64, 1, 28, 28)
    spaces = find_spaces(model, x[:4])
    pooled = before_and_after_relus(spaces, model, x[:4])
    assert [len(s.taps) for s in pooled] == [2 * len(s.taps) for s in spaces]
    assert all({t.node for t in s.taps[len(s.taps) // 2:]}.isdisjoint({t.node for t in s.taps[:len(s.taps) // 2]})
               for s in pooled)
    permuted, _ = permute_model(model, x[:4], seed=1)
    merger = ModelMerger([model, permuted], PermutationAligner(), spaces=pooled, reset_bn=False,
                         device="cpu", verbose=False).fit(x)
    torch.testing.assert_close(merger.merged_model_.eval()(x), model(x), rtol=1e-4, atol=1e-4)
