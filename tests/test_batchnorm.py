"""reset_bn_stats: population statistics in two passes, or exactly layer by layer, whatever the batches."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _archs  # noqa: E402

from skmerge import CCAAligner, ModelMerger  # noqa: E402
from skmerge.batchnorm import reset_bn_stats  # noqa: E402

torch.set_num_threads(1)

BN = nn.modules.batchnorm._BatchNorm


class BNMLP(nn.Module):
    """Linear-BatchNorm1d-ReLU twice: train-mode BatchNorm1d cannot take a batch of one."""

    input_shape = (6,)

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(),
                                    nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.layers(x)


def _model(name, seed=0):
    if name == "bnmlp":
        torch.manual_seed(seed)
        return _archs.randomize_batchnorm(BNMLP().double(), seed).eval()
    return _archs.make_model(name, seed)


def _inputs(name, n, seed=1):
    if name == "bnmlp":
        return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return _archs.inputs(name, n, seed)


def _direct(model, x):
    """Independent: layer after layer, the whole data as one tensor, torch.mean and torch.var."""
    model = copy.deepcopy(model).eval()
    pending = [m for m in model.modules() if isinstance(m, BN)]
    while pending:
        first = []

        def hook(module, args):
            if not first:
                first.append((module, args[0]))

        handles = [m.register_forward_pre_hook(hook) for m in pending]
        with torch.no_grad():
            model(x)
        for handle in handles:
            handle.remove()
        layer, data = first[0]
        axes = [0] + list(range(2, data.ndim))
        layer.running_mean.copy_(data.mean(axes))
        layer.running_var.copy_(data.var(axes, unbiased=True))
        pending.remove(layer)
    return model


def _assert_bn_equal(a, b, rtol):
    for (name, m), other in zip(a.named_modules(), b.modules()):
        if isinstance(m, BN):
            torch.testing.assert_close(m.running_mean, other.running_mean, rtol=rtol, atol=rtol, msg=name)
            torch.testing.assert_close(m.running_var, other.running_var, rtol=rtol, atol=rtol, msg=name)


@pytest.mark.parametrize("name", ["bnmlp", "vgg", "resnet", "cat"])
@pytest.mark.parametrize("batch_size", [1, 7, 128])
def test_equals_a_direct_computation_on_the_concatenated_data(name, batch_size):
    model, x = _model(name), _inputs(name, 129)  # 129 = 128 + a final batch of one
    expected = _direct(model, x)
    got = reset_bn_stats(copy.deepcopy(model), x, batch_size=batch_size, exact=True)
    _assert_bn_equal(got, expected, rtol=1e-10)
    assert not got.training


def _two_pass_direct(model, x):
    """Independent: train-mode batch statistics of the whole data, then one eval-mode measurement."""
    model = copy.deepcopy(model)
    layers = [m for m in model.modules() if isinstance(m, BN)]
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.setdefault(mod, args[0])) for m in layers]
    model.train()
    with torch.no_grad():
        model(x)  # normalizes every layer with the statistics of the whole data
    for h in hooks:
        h.remove()
    for m in layers:
        axes = [0] + list(range(2, inputs[m].ndim))
        m.running_mean.copy_(inputs[m].mean(axes))
        m.running_var.copy_(inputs[m].var(axes, unbiased=True))
    inputs.clear()
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.setdefault(mod, args[0])) for m in layers]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for m in layers:
        axes = [0] + list(range(2, inputs[m].ndim))
        m.running_mean.copy_(inputs[m].mean(axes))
        m.running_var.copy_(inputs[m].var(axes, unbiased=True))
    return model


@pytest.mark.parametrize("name", ["bnmlp", "vgg", "resnet", "cat"])
def test_two_passes_equal_an_independent_computation_and_come_close_to_the_exact_statistics(name):
    model, x = _model(name), _inputs(name, 129)
    got = reset_bn_stats(copy.deepcopy(model), x, batch_size=129)  # one batch: the whole data
    _assert_bn_equal(got, _two_pass_direct(model, x), rtol=1e-10)
    exact = _direct(model, x)
    for a, b in zip(got.modules(), exact.modules()):
        if isinstance(a, BN):
            scale = b.running_var.abs().max()
            assert float((a.running_var - b.running_var).abs().max() / scale) < 0.05


def test_first_layer_matches_torch_train_mode_on_one_batch():
    model, x = _model("vgg"), _inputs("vgg", 50)
    got = reset_bn_stats(copy.deepcopy(model), x, batch_size=8)  # the first layer: exact either way
    torch_bn = copy.deepcopy(model)
    first = torch_bn.features[1]
    first.reset_running_stats()
    first.momentum = None
    torch_bn.train()
    with torch.no_grad():
        torch_bn(x)
    torch.testing.assert_close(got.features[1].running_mean, first.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.features[1].running_var, first.running_var, rtol=1e-12, atol=1e-12)


def test_independent_of_how_the_batches_cut_the_data():
    model, x = _model("resnet"), _inputs("resnet", 90)
    uneven = DataLoader(TensorDataset(x), batch_sampler=[range(0, 1), range(1, 40), range(40, 90)])
    results = [reset_bn_stats(copy.deepcopy(model), data, batch_size=bs, exact=True)
               for data, bs in ((x, 90), (x, 13), (uneven, None))]
    for other in results[1:]:
        _assert_bn_equal(other, results[0], rtol=1e-12)
    # momentum and num_batches_tracked are left alone
    for before, after in zip(model.modules(), results[2].modules()):
        if isinstance(before, BN):
            assert after.momentum == before.momentum
            assert torch.equal(after.num_batches_tracked, before.num_batches_tracked)


def test_merger_with_a_final_batch_of_one_and_with_batch_size_one():
    models = [_model("bnmlp", seed) for seed in range(2)]
    x = _inputs("bnmlp", 129)
    merged = [ModelMerger(models, CCAAligner(), batch_size=bs, device="cpu").fit(x).merged_model_
              for bs in (128, 1)]
    for model in merged:
        assert all(bool(torch.isfinite(t).all()) for t in model.state_dict().values())
    no_reset = ModelMerger(models, CCAAligner(), reset_bn=False, device="cpu").fit(x).merged_model_
    # batches of one sample normalize with the running statistics in the first pass; the
    # result stays within the two-pass tolerance of the exact statistics
    exact = _direct(no_reset, x)
    for model in merged:
        for a, b in zip(model.modules(), exact.modules()):
            if isinstance(a, BN):
                assert float((a.running_var - b.running_var).abs().max() / b.running_var.abs().max()) < 0.05


def test_errors():
    model = _model("bnmlp")
    with pytest.raises(ValueError, match="empty data"):
        reset_bn_stats(model, _inputs("bnmlp", 5)[:0])
    with pytest.raises(ValueError, match="at least 2"):
        reset_bn_stats(model, _inputs("bnmlp", 1))
    with pytest.raises(ValueError, match="meta device"):
        reset_bn_stats(copy.deepcopy(model).to("meta"), _inputs("bnmlp", 4))
    # One sample is enough where there are several positions per channel.
    vgg = _model("vgg")
    reset_bn_stats(vgg, _inputs("vgg", 1))
    assert torch.isfinite(vgg.features[1].running_var).all()
