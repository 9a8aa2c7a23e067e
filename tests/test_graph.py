"""skmerge.graph: spaces found per architecture, where they are observed, the
permutation self-check, apply_transforms with permutations and invertible maps,
warnings and errors, hand-built spaces. Modern architectures (attention,
depthwise and grouped convolutions, tied weights) are in test_architectures.py."""

import copy
import operator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import skmerge
from skmerge.graph import (
    AveragingFallbackWarning,
    GraphTap,
    ParamSlice,
    Space,
    Tap,
    UnsupportedOperationError,
    apply_transforms,
    check_spaces,
    find_spaces,
    permute_model,
)

import _archs

torch.set_num_threads(2)

ARCHS = _archs.ARCHITECTURES


def _make(name, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = ARCHS[name]().to(dtype)
    _randomize_norms(model, seed)
    return model.eval()


def _randomize_norms(model, seed):
    """Non-trivial norm parameters and statistics, as a trained model has."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))


def _x(name, n=4, dtype=torch.float64, seed=0):
    return _archs.example_input(ARCHS[name], n, seed, dtype)


def _by_name(spaces):
    return {s.name: s for s in spaces}


def _names(slices):
    return {s.name for s in slices}


def _taps(space):
    return {t.module for t in space.taps}


def _assert_close(a, b, tol=1e-10):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= tol * max(1.0, a.abs().max().item())


# --------------------------------------------------------------------------
# spaces per architecture


def test_mlp_spaces():
    spaces = find_spaces(_make("mlp"), _x("mlp"))
    assert [(s.name, s.dim, s.block_size) for s in spaces] == [("layers.0", 16, 16), ("layers.2", 16, 16)]
    first = spaces[0]
    assert first.producers == (
        ParamSlice("layers.0.weight", 0, torch.arange(16)),
        ParamSlice("layers.0.bias", 0, torch.arange(16)),
    )
    assert first.consumers == (ParamSlice("layers.2.weight", 1, torch.arange(16)),)
    # observed where its features are formed: the output of the ReLU after layers.0
    (tap,) = first.taps
    assert isinstance(tap, GraphTap) and tap.module == "layers.1" and tap.axes == (1,)
    assert torch.equal(tap.index, torch.arange(16)[:, None])
    # the input and output axes are never spaces
    assert all("layers.4" not in _names(s.producers) for s in spaces)


def test_vgg_spaces_and_flatten_block():
    spaces = find_spaces(_make("vgg"), _x("vgg"), taps="formed")
    assert [(s.name, s.dim) for s in spaces] == [
        ("features.0", 4),
        ("features.4", 8),
        ("features.8", 8),
        ("classifier.0", 16),
    ]
    last_conv = spaces[2]
    assert _names(last_conv.producers) == {
        "features.8.weight",
        "features.8.bias",
        "features.9.weight",
        "features.9.bias",
        "features.9.running_mean",
        "features.9.running_var",
    }
    var = [s for s in last_conv.producers if s.name.endswith("running_var")]
    assert len(var) == 1 and var[0].variance
    assert not any(s.variance for s in last_conv.producers if not s.name.endswith("running_var"))
    assert not any("num_batches_tracked" in s.name for sp in spaces for s in sp.producers)
    (head,) = last_conv.consumers
    # Flatten of (8, 2, 2): channel c owns columns 4c .. 4c+3
    assert head.name == "classifier.0.weight" and head.axis == 1
    assert torch.equal(head.index, torch.arange(32).reshape(8, 4))
    # taps before pooling: the output of each ReLU, not the pooled input of the next layer
    assert [t.module for s in spaces for t in s.taps] == ["features.2", "features.6", "features.10",
                                                          "classifier.2"]


def test_cifar_resnet_residual_streams_are_single_spaces():
    spaces = find_spaces(_make("resnet"), _x("resnet"), taps="formed")
    assert len(spaces) == 3 + 3 * 2
    names = _by_name(spaces)
    stream1 = names["conv1 (+2 joined)"]
    assert stream1.dim == 4
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv2.weight", "layer1.1.bn2.bias"} <= _names(
        stream1.producers
    )
    # the stream is observed at the stem and after every block that writes to it
    assert [t.module for t in stream1.taps] == ["", "layer1.0", "layer1.1"]
    assert _names(stream1.consumers) == {
        "layer1.0.conv1.weight",
        "layer1.1.conv1.weight",
        "layer2.0.conv1.weight",
        "layer2.0.shortcut.0.weight",
    }
    stream2 = names["layer2.0.conv2 (+2 joined)"]
    assert {"layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.running_mean"} <= _names(stream2.producers)
    assert [t.module for t in stream2.taps] == ["layer2.0", "layer2.1"]
    stream3 = names["layer3.0.conv2 (+2 joined)"]
    assert stream3.dim == 16 and [t.module for t in stream3.taps] == ["layer3.0", "layer3.1"]
    # taps="both" (the default) adds only the head's input, the average-pooled last stream: nothing
    # else pools between a space's producers and its consumers
    both = find_spaces(_make("resnet"), _x("resnet"))
    assert [s.taps for s in both if s is not both[-1] and s.name != stream3.name] == [
        s.taps for s in spaces if s is not spaces[-1] and s.name != stream3.name]
    (extra,) = [t for t in _by_name(both)[stream3.name].taps if t not in stream3.taps]
    assert extra.node == "flatten"
    for stage in (1, 2, 3):
        for block in (0, 1):
            inner = names[f"layer{stage}.{block}.conv1"]
            assert [t.module for t in inner.taps] == [f"layer{stage}.{block}"]  # its F.relu
            assert _names(inner.consumers) == {f"layer{stage}.{block}.conv2.weight"}
            assert len(inner.producers) == 5  # conv weight (no bias), BN weight/bias/mean/var


def test_resnet18_like_spaces():
    spaces = find_spaces(_make("resnet18"), _x("resnet18"), taps="formed")
    assert len(spaces) == 4 + 8
    names = _by_name(spaces)
    streams = [
        "conv1 (+2 joined)",
        "layer2.0.conv2 (+2 joined)",
        "layer3.0.conv2 (+2 joined)",
        "layer4.0.conv2 (+2 joined)",
    ]
    assert [names[n].dim for n in streams] == [4, 8, 16, 32]
    # the shared nn.ReLU module observes the stem (before the max pool) and each block's output
    assert [t.module for t in names[streams[0]].taps] == ["relu", "layer1.0.relu", "layer1.1.relu"]
    assert "layer2.0.downsample.1.running_var" in _names(names[streams[1]].producers)
    last = names[streams[3]]
    assert [t.module for t in last.taps] == ["layer4.0.relu", "layer4.1.relu"]  # before avgpool
    assert "fc.weight" in _names(last.consumers)
    assert sorted(s.dim for s in spaces) == sorted([4, 4, 4, 8, 8, 8, 16, 16, 16, 32, 32, 32])


def test_catnet_concatenation_gives_one_space_per_part():
    spaces = find_spaces(_make("cat"), _x("cat"), taps="formed")
    a, b, mix = spaces
    assert (a.name, a.dim, b.name, b.dim, mix.name, mix.dim) == ("branch_a", 4, "branch_b", 6, "mix", 8)
    # each branch at its ReLU and at the BatchNorm over the concatenation (its own channel range)
    assert [(t.module, t.axes) for t in a.taps] == [("", (1,)), ("bn_cat", (1,))]
    assert torch.equal(a.taps[1].index[:, 0], torch.arange(0, 4))
    assert torch.equal(b.taps[1].index[:, 0], torch.arange(4, 10))
    assert a.consumers == (ParamSlice("mix.weight", 1, torch.arange(0, 4)),)
    assert b.consumers == (ParamSlice("mix.weight", 1, torch.arange(4, 10)),)
    bn_b = {s.name: s for s in b.producers if s.name.startswith("bn_cat")}
    assert set(bn_b) == {"bn_cat.weight", "bn_cat.bias", "bn_cat.running_mean", "bn_cat.running_var"}
    assert all(torch.equal(s.index[:, 0], torch.arange(4, 10)) for s in bn_b.values())
    assert [t.node for t in mix.taps] == ["relu_2"]  # F.relu(mix(h)), before the spatial mean


def test_normnet_groupnorm_blocks_and_layernorm_positions():
    spaces = find_spaces(_make("norm"), _x("norm"))
    conv1, conv2, fc1 = spaces
    assert (conv1.dim, conv1.block_size) == (8, 4)  # GroupNorm(2, 8)
    assert {"gn.weight", "gn.bias"} <= _names(conv1.producers)
    ln = {s.name: s for s in conv2.producers if s.name.startswith("ln.")}
    assert set(ln) == {"ln.weight", "ln.bias"}
    # LayerNorm([8, 4, 4]): channel c owns the 16 positions 16c .. 16c+15
    assert torch.equal(ln["ln.weight"].index, torch.arange(128).reshape(8, 16))
    (head,) = conv2.consumers
    assert head.name == "fc1.weight" and head.index.shape == (8, 16)
    assert [t.node for t in conv2.taps] == ["relu_1"]  # before the view into fc1
    assert (fc1.dim, fc1.block_size) == (16, 16)
    assert {"ln_fc.weight", "ln_fc.bias"} <= _names(fc1.producers)


# --------------------------------------------------------------------------
# the model is not modified; the permutation self-check


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_find_spaces_does_not_modify_the_model(name):
    model = _make(name, dtype=torch.float32)
    model.train()
    next(iter(model.children())).eval()  # mixed flags must survive too
    flags = [m.training for m in model.modules()]
    before = _archs.state_copy(model)
    x = _x(name, dtype=torch.float32)
    x_before = x.clone()
    find_spaces(model, x)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:  # BN running stats and num_batches_tracked included
        assert torch.equal(before[key], after[key]), key
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_permute_model_preserves_outputs(name):
    model = _make(name)
    x = _x(name, 8)
    before = _archs.state_copy(model)
    permuted, perms = permute_model(model, x, seed=1)
    with torch.no_grad():
        _assert_close(model(x), permuted.eval()(x), 1e-10)
    # the check could fail: the parameters really moved ...
    changed = [k for k, v in permuted.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms)
    # ... the input model did not, and permutations stay inside their blocks
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    for space, perm in zip(find_spaces(model, x), perms):
        assert torch.equal(perm // space.block_size, torch.arange(space.dim) // space.block_size)
    check_spaces(model, x)


def test_permutation_of_a_wrong_spec_changes_outputs():
    """The self-check is sensitive: drop one consumer and it fails."""
    model = _make("resnet")
    x = _x("resnet")
    spaces = find_spaces(model, x)
    broken = copy.deepcopy(spaces)
    broken[0] = Space(
        broken[0].dim, broken[0].producers, broken[0].consumers[1:], broken[0].taps, name="broken"
    )
    check_spaces(model, x, spaces)
    with pytest.raises(RuntimeError, match="changed output"):
        check_spaces(model, x, broken)


# --------------------------------------------------------------------------
# apply_transforms


class LinearConvNet(_archs._Example, nn.Module):
    """Purely linear: convs, avg pooling, concatenation, a residual add, flatten, Linears."""

    input_shape = (3, 4, 4)

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 1)
        self.c = nn.Conv2d(7, 5, 3, padding=1)
        self.d = nn.Conv2d(5, 5, 1)
        self.fc1 = nn.Linear(5 * 2 * 2, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        h = self.c(torch.cat([self.a(x), self.b(x)], 1))
        h = F.avg_pool2d(h + self.d(h), 2)
        return self.fc2(self.fc1(torch.flatten(h, 1)))


def _random_pairs(spaces, seed):
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for s in spaces:
        m = torch.randn(s.dim, s.dim, generator=gen, dtype=torch.float64) + 2 * torch.eye(s.dim, dtype=torch.float64)
        pairs.append((m, torch.linalg.inv(m)))
    return pairs


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_invertible_maps_preserve_a_linear_model(arch):
    torch.manual_seed(0)
    if arch == "mlp":
        model = _archs.MLP(activation=None).double().eval()
        x = _archs.MLP.example_input(16, dtype=torch.float64)
    else:
        model = LinearConvNet().double().eval()
        x = LinearConvNet.example_input(16, dtype=torch.float64)
    spaces = find_spaces(model, x)
    assert len(spaces) == (2 if arch == "mlp" else 4)
    pairs = _random_pairs(spaces, seed=3)
    state = model.state_dict()
    before = _archs.state_copy(model)
    transformed = copy.deepcopy(model)
    transformed.load_state_dict(apply_transforms(state, spaces, pairs))
    with torch.no_grad():
        expected = model(x)
        _assert_close(expected, transformed(x), 1e-9)
        # the test can fail: a wrong inverse breaks the model
        wrong = copy.deepcopy(model)
        wrong.load_state_dict(apply_transforms(state, spaces, [(a, a.T) for a, _ in pairs]))
        assert (wrong(x) - expected).abs().max() > 1e-3
    for key in before:
        assert torch.equal(state[key], before[key])


def test_features_move_to_the_new_basis():
    """Convention: hidden features z become z @ mapping."""
    torch.manual_seed(0)
    model = _archs.MLP(activation=None).double()
    x = _archs.MLP.example_input(5, dtype=torch.float64)
    spaces = find_spaces(model, x)
    (m, inv), _ = _random_pairs(spaces, 1)
    new = copy.deepcopy(model)
    new.load_state_dict(apply_transforms(model.state_dict(), spaces, [(m, inv), None]))
    with torch.no_grad():
        _assert_close(new.layers[0](x), model.layers[0](x) @ m, 1e-10)


@pytest.mark.parametrize("name", ["resnet", "vgg", "norm", "cat"])
def test_permutation_as_indices_or_matrices_gives_identical_state_dicts(name):
    model = _make(name, dtype=torch.float32)
    x = _x(name, dtype=torch.float32)
    spaces = find_spaces(model, x)
    _, perms = permute_model(model, spaces=spaces, seed=7)
    mats = []
    for p in perms:
        m = torch.zeros(len(p), len(p), dtype=torch.float64)
        m[p, torch.arange(len(p))] = 1.0  # mapping[perm[j], j] = 1
        mats.append((m, m.T.clone()))
    by_index = apply_transforms(model.state_dict(), spaces, perms)
    by_matrix = apply_transforms(model.state_dict(), spaces, mats)
    by_numpy = apply_transforms(model.state_dict(), spaces, [p.numpy() for p in perms])
    assert by_index.keys() == by_matrix.keys() == model.state_dict().keys()
    for key in by_index:
        assert by_index[key].dtype == by_matrix[key].dtype == model.state_dict()[key].dtype
        assert torch.equal(by_index[key], by_matrix[key]), key
        assert torch.equal(by_index[key], by_numpy[key]), key


def test_apply_transforms_returns_new_tensors_and_keeps_metadata():
    model = _make("vgg", dtype=torch.float32)
    state = model.state_dict()
    spaces = find_spaces(model, _x("vgg", dtype=torch.float32))
    out = apply_transforms(state, spaces, [None] * len(spaces))
    assert out._metadata == state._metadata
    for key, value in out.items():
        assert torch.equal(value, state[key])
        assert value.data_ptr() != state[key].data_ptr()  # modifying it cannot touch the model


def test_apply_transforms_rejects_bad_transforms():
    model = _make("mlp")
    spaces = find_spaces(model, _x("mlp"))
    state = model.state_dict()
    with pytest.raises(ValueError, match="2 spaces"):
        apply_transforms(state, spaces, [None])
    with pytest.raises(ValueError, match="not a permutation"):
        apply_transforms(state, spaces, [torch.zeros(16, dtype=torch.long), None])
    with pytest.raises(ValueError, match="shape"):
        apply_transforms(state, spaces, [(torch.eye(3), torch.eye(3)), None])
    with pytest.raises(ValueError, match="NaN"):
        apply_transforms(state, spaces, [(torch.full((16, 16), float("nan")), torch.eye(16)), None])
    with pytest.raises(TypeError, match="permutation"):
        apply_transforms(state, spaces, [torch.rand(16), None])
    with pytest.raises(KeyError, match="layers.0.weight"):
        apply_transforms({}, spaces, [torch.arange(16), None])


# --------------------------------------------------------------------------
# taps


def test_tap_extract_reads_blocks_and_offsets():
    feats = torch.arange(2 * 8 * 4, dtype=torch.float64).reshape(2, 8 * 4)  # flattened (8, 2, 2)
    out = Tap("head", -1, 0, 4, 8).extract(feats)
    assert out.shape == (2 * 4, 8)
    # sample (n, j) of channel c is column c*4 + j
    assert torch.equal(out, feats.reshape(2, 8, 4).permute(0, 2, 1).reshape(8, 8))
    conv_in = torch.randn(3, 10, 5, 5)
    part = Tap("mix", 1, 4, 1, 6).extract(conv_in)
    assert torch.equal(part, conv_in.permute(0, 2, 3, 1).reshape(-1, 10)[:, 4:10])
    with pytest.raises(ValueError, match="exceed"):
        Tap("mix", 1, 8, 1, 6).extract(conv_in)
    assert torch.equal(Tap("mix", 1, 4).extract(conv_in), part)  # dim=None: to the end


def test_taps_observe_the_formed_features_and_the_consumer_inputs_on_request():
    """"formed" taps the ReLU output; "consumers" the flattened head input; "both" (the default) the two."""
    model, x = _make("vgg"), _x("vgg")
    formed = find_spaces(model, x, taps="formed")[2]
    consumers = find_spaces(model, x, taps="consumers")[2]
    both = find_spaces(model, x, taps="both")
    assert [s.taps for s in find_spaces(model, x)] == [s.taps for s in both]
    assert [t.module for t in formed.taps] == ["features.10"]
    (head,) = consumers.taps
    assert head.axes == (1,) and tuple(head.index.shape) == (8, 4)  # flatten of (8, 2, 2)
    # "both": the first ReLU and the max pool after it; the head's flatten of the last ReLU holds
    # the same samples as the ReLU, which is observed once
    assert [t.module for t in both[0].taps] == ["features.2", "features.3"]
    assert both[2].taps == formed.taps
    relu = _archs.tap_samples(model, formed, x)
    assert relu.shape == (4 * 2 * 2, 8)  # every position, before the max pool
    pooled = _archs.tap_samples(model, consumers, x)
    with torch.no_grad():
        feats = model.features(x)  # (4, 8, 2, 2) after the last pool: the head's input
    assert np.allclose(pooled, feats.permute(0, 2, 3, 1).reshape(-1, 8).numpy())
    with pytest.raises(ValueError, match="taps must be one of 'formed', 'consumers', 'both'"):
        find_spaces(model, x, taps="inputs")


def test_pre_and_post_activation_taps_add_the_input_of_each_nonlinearity_on_the_formed_chain():
    """A conv-BN-ReLU block gains its BatchNorm output, a residual stream each block's addition before
    its ReLU; spaces without a nonlinearity keep their formed taps only."""
    model, x = _make("resnet"), _x("resnet")
    formed = find_spaces(model, x, taps="formed")
    both = find_spaces(model, x, taps="pre_and_post_activation")
    assert [s.name for s in both] == [s.name for s in formed]
    for plain, doubled in zip(formed, both):
        assert doubled.taps[:len(plain.taps)] == plain.taps
    stream = both[0]
    assert [t.node for t in stream.taps] == ["relu", "relu_2", "relu_4", "batch_norm", "add_", "add__1"]
    assert [t.node for t in both[1].taps] == ["relu_1", "batch_norm_1"]
    mlp = _make("mlp")
    spaces = find_spaces(mlp, _x("mlp"), taps="pre_and_post_activation")
    assert [[t.node for t in s.taps] for s in spaces] == [["relu", "linear"], ["relu_1", "linear_1"]]


def test_graph_tap_extraction_reads_blocks_and_offsets():
    feats = torch.randn(2, 3, 10, dtype=torch.float64)
    tap = GraphTap("n", (2,), torch.arange(4, 10))
    grouped = tap.extract_grouped(feats)
    assert grouped.shape == (1, 6, 6)
    assert torch.equal(grouped[0], feats.reshape(6, 10)[:, 4:])
    # channels spread over two axes (heads x head size), k = 2 positions per channel
    heads = torch.randn(5, 2, 3, dtype=torch.float64)  # (tokens, heads, head size)
    index = torch.arange(6).reshape(2, 3).T  # channel j: head 0 and head 1 at size j
    two = GraphTap("n", (1, 2), index)
    got = two.extract(heads)
    assert got.shape == (5 * 2, 3)
    assert torch.equal(got, heads.reshape(5 * 2, 3))
    conv = torch.randn(3, 6, 4, 4)
    view = GraphTap("n", (1,), torch.arange(2, 5)).extract_grouped(conv)
    assert view.shape == (3, 16, 3) and view.data_ptr() == conv[:, 2:].data_ptr()  # no copy
    assert "axis 1[2:5]" in repr(GraphTap("n", (1,), torch.arange(2, 5)))


# --------------------------------------------------------------------------
# more ops: functional forms, sharing, fixed spaces


class FunctionalNet(nn.Module):
    """Functional and method forms of the supported ops."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_c = nn.Conv2d(8, 6, 1)
        self.seq = nn.Conv1d(6, 5, 1)
        self.tok = nn.Linear(5, 7)
        self.ln = nn.LayerNorm(7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        a = F.relu(self.conv_a(x))
        b = self.conv_b(x)
        b = torch.relu(b) - 0.5 * b.sigmoid() + F.leaky_relu(b, 0.1)
        h = torch.cat((a, b), dim=1)
        first, second = torch.split(h, [4, 4], dim=1)  # back along the spaces
        h = torch.cat([first * torch.sigmoid(second), h[:, 4:]], 1)
        h = self.conv_c(F.dropout(h, 0.0, training=False))
        h = operator.add(h, torch.tanh(h))
        h = h + h.mean(dim=(2, 3), keepdim=True)
        h = F.max_pool2d(F.avg_pool2d(h, 2), 2)  # (N, 6, 2, 2)
        s = h.reshape(h.size(0), h.size(1), -1)  # (N, 6, 4)
        s = self.seq(s).relu_()  # Conv1d over 4 positions
        s = s.transpose(1, 2)  # tokens: (N, 4, 5)
        t = F.gelu(self.ln(self.tok(s)))
        t = t.amax(dim=1) + t.sum(1) / 4 + 1.0
        return self.head(t)


def test_functional_forms_and_axis_moves():
    torch.manual_seed(0)
    model = FunctionalNet().double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    spaces = find_spaces(model, x)
    # first * sigmoid(second): an elementwise product joins the two branches
    assert [(s.name, s.dim) for s in spaces] == [("conv_a (+1 joined)", 4), ("conv_c", 6), ("seq", 5), ("tok", 7)]
    names = _by_name(spaces)
    # the Conv1d's ReLU output, after the transpose into tokens (the channels only moved)
    assert [(t.node, t.axes) for t in names["seq"].taps] == [("transpose", (2,))]
    assert {"ln.weight", "ln.bias"} <= _names(names["tok"].producers)
    check_spaces(model, x, atol=1e-10)


class SharedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.relu(self.shared(h))
        h = torch.relu(self.shared(h))  # same weights again: input and output spaces join
        return self.out(h)


def test_a_module_called_twice_shares_one_space():
    torch.manual_seed(0)
    model = SharedNet().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    spaces = find_spaces(model, x)
    assert len(spaces) == 1
    (space,) = spaces
    assert space.name == "inp (+1 joined)"
    assert [t.node for t in space.taps] == ["relu", "relu_1", "relu_2"]  # every ReLU output
    assert _names(space.consumers) == {"shared.weight", "out.weight"}
    check_spaces(model, x, atol=1e-10)


class ResidualToInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 4)
        self.fc3 = nn.Linear(4, 3)

    def forward(self, x):
        x = x + self.fc2(torch.relu(self.fc1(x)))  # a stream joined to the input
        return self.fc3(x)


def test_spaces_joined_to_inputs_or_outputs_are_dropped():
    model = ResidualToInput().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    spaces = find_spaces(model, x)
    assert [s.name for s in spaces] == ["fc1"]
    check_spaces(model, x, atol=1e-10)


class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.fc = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 2)

    def forward(self, idx):
        h = self.emb(idx)
        h = self.norm(h + F.silu(self.fc(h)))
        return self.head(h.mean(1))


def test_embedding_and_token_streams():
    torch.manual_seed(0)
    model = TokenNet().double()
    idx = torch.randint(0, 10, (3, 5))
    (space,) = find_spaces(model, idx, taps="formed")
    assert space.name == "emb (+1 joined)"
    assert ParamSlice("emb.weight", 1, torch.arange(6)) in space.producers
    assert [t.module for t in space.taps] == ["emb", "norm"]  # the embedding and the stream
    check_spaces(model, idx, atol=1e-10)


class DenseLike(nn.Module):
    """DenseNet-style growing concatenations, BN over them, a transition with pooling."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 4, 3, padding=1)
        self.b1 = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
        self.b2 = nn.Sequential(nn.BatchNorm2d(7), nn.ReLU(), nn.Conv2d(7, 3, 3, padding=1))
        self.t = nn.Sequential(nn.BatchNorm2d(10), nn.ReLU(), nn.Conv2d(10, 5, 1), nn.AvgPool2d(2))
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = self.c0(x)
        x = torch.cat([x, self.b1(x)], 1)
        x = torch.cat([x, self.b2(x)], 1)
        return self.fc(F.adaptive_avg_pool2d(self.t(x), 1).flatten(1))


class SqueezeExcite(nn.Module):
    """Gating: the excitation's output space joins the gated feature map."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.f1, self.f2, self.out = nn.Linear(8, 2), nn.Linear(2, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.c(x))
        g = torch.sigmoid(self.f2(F.relu(self.f1(h.mean((2, 3))))))
        return self.out((h * g[:, :, None, None]).mean((2, 3)))


class Seq1d(nn.Module):
    """Conv1d, BatchNorm1d, ConvTranspose1d, max over time."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8)
        self.up, self.c2 = nn.ConvTranspose1d(8, 6, 2, stride=2), nn.Conv1d(6, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)))
        h = F.relu(self.c2(F.relu(self.up(h))))
        return self.fc(h.max(dim=2)[0])


class ChunkNet(nn.Module):
    """cat, chunk back, reorder, PReLU/BatchNorm1d over the parts, stack."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)
        self.prelu, self.bn, self.c = nn.PReLU(12), nn.BatchNorm1d(12), nn.Linear(12, 3)

    def forward(self, x):
        p, q = torch.cat([self.a(x), self.b(x)], -1).chunk(2, dim=1)
        h = self.bn(self.prelu(torch.cat([q, p], 1)))
        return self.c(torch.stack([h, 2 * h], 0).sum(0))


class MyLinear(nn.Linear):
    """A subclass outside torch.nn keeps the Linear rule (same forward)."""


class SubclassNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = MyLinear(4, 8), MyLinear(8, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


MORE = [
    (DenseLike, (2, 3, 8, 8), [("c0", 4), ("b1.2", 3), ("b2.2", 3), ("t.2", 5)]),
    (SqueezeExcite, (2, 3, 8, 8), [("c (+1 joined)", 8), ("f1", 2)]),
    (Seq1d, (2, 3, 16), [("c1", 8), ("up", 6), ("c2", 8)]),
    (ChunkNet, (3, 4), [("a", 6), ("b", 6)]),
    (SubclassNet, (3, 4), [("a", 8)]),
]


@pytest.mark.parametrize("cls, shape, expected", MORE, ids=[m[0].__name__ for m in MORE])
def test_more_architectures(cls, shape, expected):
    torch.manual_seed(0)
    model = cls().double()
    _randomize_norms(model, 0)
    x = torch.randn(*shape, dtype=torch.float64)
    spaces = find_spaces(model, x)
    assert [(s.name, s.dim) for s in spaces] == expected
    check_spaces(model, x, atol=1e-10)


# --------------------------------------------------------------------------
# ops that the previous walker refused: now followed exactly


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)

    def forward(self, x):
        return torch.matmul(self.q(x), self.k(x).transpose(-1, -2))


class AttentionNet(nn.Module):
    """A bilinear form q k^T: the keys are dual to the queries."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.block = Attention()

    def forward(self, x):
        return self.block(self.inp(x)).sum(-1)


class SoftmaxNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.softmax(self.fc1(x), dim=-1))


class FeatureMeanNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h - h.mean(dim=1, keepdim=True))


class GroupedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class HalfSliceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))[:, :4])


class StraddleNet(nn.Module):
    """GroupNorm(2, 8) over cat(3 channels, 5 channels): one group straddles both parts."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 5, 1)
        self.gn = nn.GroupNorm(2, 8)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(self.gn(torch.cat([self.a(x), self.b(x)], 1)))


FOLLOWED = [
    # (model, input shape, [(name, dim, block_size)])
    (AttentionNet, (3, 5, 4), [("inp", 8, 8), ("block.q (+1 joined)", 8, 8)]),
    (SoftmaxNet, (3, 4), [("fc1", 8, 8)]),
    (FeatureMeanNet, (3, 4), [("fc1", 8, 8)]),
    (GroupedConvNet, (2, 3, 5, 5), [("a", 8, 4), ("b", 8, 4)]),
    (HalfSliceNet, (3, 4), [("fc1", 4, 4)]),  # the other half is never read
    (StraddleNet, (2, 3, 4, 4), [("a", 3, 3), ("b [0:1]", 1, 1), ("b [1:5]", 4, 4)]),
]


@pytest.mark.parametrize("cls, shape, expected", FOLLOWED, ids=[f[0].__name__ for f in FOLLOWED])
def test_ops_followed_exactly(cls, shape, expected):
    torch.manual_seed(0)
    model = cls().double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    spaces = find_spaces(model, x)
    assert [(s.name, s.dim, s.block_size) for s in spaces] == expected
    check_spaces(model, x, atol=1e-10)


def test_queries_and_keys_are_dual():
    """q rows take the map, k rows its inverse: the key weight is a consumer of the query space."""
    model = AttentionNet().double()
    space = find_spaces(model, torch.randn(3, 5, 4, dtype=torch.float64))[1]
    assert _names(space.producers) == {"block.q.weight", "block.q.bias"}
    assert _names(space.consumers) == {"block.k.weight", "block.k.bias"}
    assert [t.dual for t in space.taps] == [False, True]
    torch.manual_seed(1)
    x = torch.randn(7, 5, 4, dtype=torch.float64)
    transformed = copy.deepcopy(model)
    pairs = _random_pairs(find_spaces(model, x), seed=2)  # any invertible maps keep q k^T
    state = apply_transforms(model.state_dict(), find_spaces(model, x), [None, pairs[1]])
    transformed.load_state_dict(state)
    with torch.no_grad():
        _assert_close(model(x), transformed(x), 1e-9)


# --------------------------------------------------------------------------
# warnings: channels that cannot be aligned are averaged, and said so


class ConstantScaleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.arange(1, 7, dtype=h.dtype, device=h.device))


class CumsumNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc3(torch.relu(self.fc2(h)).cumsum(-1))


class TokenMixer(nn.Module):
    """MLP-Mixer's token mixing: a Linear along the tokens while the channels sit on another axis."""

    def __init__(self):
        super().__init__()
        self.embed, self.tokens, self.head = nn.Linear(3, 6), nn.Linear(5, 5), nn.Linear(6, 2)

    def forward(self, x):  # (batch, 5 tokens, 3)
        h = torch.relu(self.embed(x))
        h = h + self.tokens(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h.mean(1))


WARNED = [
    (ConstantScaleNet, (3, 4), [], ["fc1"], "constant that varies along them"),
    (CumsumNet, (3, 4), ["fc1"], ["fc2"], "order of the channels"),
    (TokenMixer, (3, 5, 3), ["embed"], [], "axis without channels"),
]


@pytest.mark.parametrize("cls, shape, kept, dropped, reason", WARNED, ids=[w[0].__name__ for w in WARNED])
def test_channels_that_cannot_be_aligned_fall_back_to_averaging_with_a_warning(cls, shape, kept, dropped,
                                                                                 reason):
    torch.manual_seed(0)
    model = cls().double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    with pytest.warns(AveragingFallbackWarning, match=reason):
        spaces = find_spaces(model, x)
    assert [s.name for s in spaces] == kept
    check_spaces(model, x, atol=1e-10)


def test_a_merge_with_no_space_warns():
    models = [ConstantScaleNet().double() for _ in range(2)]
    from skmerge import ModelMerger
    with pytest.warns(AveragingFallbackWarning, match="no feature space"):
        ModelMerger(models, device="cpu").fit(torch.randn(20, 4, dtype=torch.float64))


# --------------------------------------------------------------------------
# errors


class ChannelIndexNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(3, 2)
        self.register_buffer("pick", torch.tensor([0, 5, 2]))

    def forward(self, x):
        return self.fc2(self.fc1(x)[:, self.pick])


class FFTNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(torch.fft.rfft(self.fc1(x), dim=-1).abs())


class ComputedWeightNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.v = nn.Parameter(torch.randn(2, 8))

    def forward(self, x):
        return F.linear(torch.relu(self.fc1(x)), self.v / self.v.norm(dim=1, keepdim=True))


ERRORS = [
    (ChannelIndexNet, (3, 4), "index", "<root>", "indexes the channels"),
    (FFTNet, (3, 4), "fft_rfft", "<root>", "no rule for this operation"),
    (ComputedWeightNet, (3, 4), "linear_1", "<root>", "computed in the graph"),
]


@pytest.mark.parametrize("cls, shape, node, path, reason", ERRORS, ids=[e[0].__name__ for e in ERRORS])
def test_unsupported_operations_raise_with_node_and_module_path(cls, shape, node, path, reason):
    model = cls()
    with pytest.raises(UnsupportedOperationError) as info:
        find_spaces(model, torch.randn(*shape))
    err = info.value
    message = str(err)
    assert f"node {node!r}" in message and err.node == node
    if path == "<root>":
        assert "top level of the model" in message and err.module_path == ""
    else:
        assert f"module {path!r}" in message and err.module_path == path
    assert reason in message
    assert "by hand" in message and "spaces=" in message
    assert isinstance(err, ValueError)


def test_an_input_the_model_cannot_take_gets_a_short_error():
    model = _make("mlp")
    with pytest.raises(ValueError, match=r"cannot run on the example input \(shape \(3, 7\).*expects 12 "
                                         r"input features"):
        find_spaces(model, torch.randn(3, 7, dtype=torch.float64))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if h.sum() > 0:  # data-dependent control flow
            h = h * 2
        return self.fc2(h)


def _hand_spaces_for_mlp(layers=("layers.0", "layers.2", "layers.4")):
    """What a user writes for a model torch.fx cannot trace (here: the test MLP)."""
    spaces = []
    for layer, nxt in zip(layers[:-1], layers[1:]):
        idx = torch.arange(16)
        spaces.append(
            Space(
                dim=16,
                producers=[ParamSlice(f"{layer}.weight", 0, idx), ParamSlice(f"{layer}.bias", 0, idx)],
                consumers=[ParamSlice(f"{nxt}.weight", 1, idx)],
                taps=[Tap(nxt, axis=-1, offset=0)],
                name=layer,
            )
        )
    return spaces


def test_untraceable_models_raise_and_spaces_can_be_given_by_hand():
    with pytest.raises(UnsupportedOperationError, match="could not trace.*by hand"):
        find_spaces(Untraceable(), torch.randn(3, 4))
    hand = _hand_spaces_for_mlp()
    model = _make("mlp")
    x = _x("mlp", 8)
    found = find_spaces(model, x)  # the hand-written spec is the traced one, up to where it is observed
    assert [(h.dim, h.producers, h.consumers) for h in hand] == [(f.dim, f.producers, f.consumers) for f in found]
    assert hand[0].taps[0].dim == 16 and hand[0].block_size == 16  # filled in
    permuted, _ = permute_model(model, spaces=hand, seed=3)
    with torch.no_grad():
        _assert_close(model(x), permuted(x), 1e-10)
    check_spaces(model, x, spaces=hand)
    linear = _archs.MLP(activation=None).double()
    new = copy.deepcopy(linear)
    hand = _hand_spaces_for_mlp(("layers.0", "layers.1", "layers.2"))  # no activation modules
    new.load_state_dict(apply_transforms(linear.state_dict(), hand, _random_pairs(hand, 0)))
    with torch.no_grad():
        _assert_close(linear(x), new(x), 1e-9)


def test_space_validation():
    idx = torch.arange(4)
    with pytest.raises(ValueError, match="dim 5"):
        Space(5, [ParamSlice("w", 0, idx)], [], [])
    with pytest.raises(ValueError, match="block_size 3"):
        Space(4, [ParamSlice("w", 0, idx)], [], [], block_size=3)
    with pytest.raises(TypeError, match="ParamSlice"):
        Space(4, ["w"], [], [])
    with pytest.raises(ValueError, match="example_input"):
        permute_model(nn.Linear(2, 2))


def test_repr_is_readable():
    spaces = find_spaces(_make("vgg"), _x("vgg"))
    text = repr(spaces[2])
    assert "dim=8" in text and "features.8.weight" in text and "classifier.0" in text
    assert "running_var[0:8], variance" in text
    assert len(text.splitlines()) == 4
    assert "block_size=4" in repr(find_spaces(_make("norm"), _x("norm"))[0])
    assert "more" in repr(find_spaces(_make("resnet"), _x("resnet"))[0])  # long lists are cut


def test_top_level_lazy_exports():
    assert skmerge.find_spaces is find_spaces
    assert skmerge.permute_model is permute_model


def test_float32_models_and_numpy_pairs():
    model = _make("cat", dtype=torch.float32)
    x = _x("cat", dtype=torch.float32)
    check_spaces(model, x)
    spaces = find_spaces(model, x)
    eye = [(np.eye(s.dim), np.eye(s.dim)) for s in spaces]
    out = apply_transforms(model.state_dict(), spaces, eye)
    for key, value in model.state_dict().items():
        assert out[key].dtype == value.dtype
        torch.testing.assert_close(out[key], value)


@pytest.mark.parametrize(
    "tap, shape, grouped_shape",
    [
        (Tap("conv", 1, 0, 1, 6), (3, 6, 5, 4), (3, 20, 6)),       # conv input: a view per image
        (Tap("conv", 1, 2, 1, 3), (3, 6, 5, 4), (3, 20, 3)),       # a channel range (torch.cat)
        (Tap("conv1d", 1, 0, 1, 4), (2, 4, 7), (2, 7, 4)),
        (Tap("fc", -1, 0, 1, 8), (5, 8), (1, 5, 8)),               # Linear input: one group
        (Tap("fc", -1, 0, 4, 3), (5, 12), (1, 20, 3)),             # after a flatten of (3, 4)
        (Tap("fc", -1, 0, 1, 6), (2, 3, 6), (1, 6, 6)),            # tokens
    ],
)
def test_grouped_extraction_holds_the_same_samples_without_copying_conv_inputs(tap, shape, grouped_shape):
    tensor = torch.randn(shape)
    grouped = tap.extract_grouped(tensor)
    assert tuple(grouped.shape) == grouped_shape
    torch.testing.assert_close(grouped.reshape(-1, grouped.shape[-1]), tap.extract(tensor), rtol=0, atol=0)
    # The same samples in the same order as the reference sample matrix.
    reference = tensor.movedim(tap.axis, -1)
    width = reference.shape[-1] // tap.block
    reference = reference.reshape(*reference.shape[:-1], width, tap.block).movedim(-1, -2).reshape(-1, width)
    torch.testing.assert_close(tap.extract(tensor), reference[:, tap.offset:tap.offset + tap.dim], rtol=0, atol=0)
    if tap.axis == 1:
        assert grouped.data_ptr() == tensor[:, tap.offset:].data_ptr()  # a view, no copy


@pytest.mark.parametrize("k", [3, 16])  # a flatten of (8, k): a channel-first copy, or row by row
@pytest.mark.parametrize("chunk", [1 << 30, 64])
def test_transforms_of_large_tensors_are_done_in_pieces_with_the_same_result(monkeypatch, chunk, k):
    """Every layout of a whole-axis slice, whole or a few rows or columns at a time: the same result."""
    from skmerge.graph import _apply

    monkeypatch.setattr(_apply, "_CHUNK", chunk)
    torch.manual_seed(0)
    tensors = {"conv": torch.randn(8, 5, 3, 3, dtype=torch.float64),   # creates the space (rows)
               "head": torch.randn(10, 8 * k, dtype=torch.float64),    # reads a flatten of (8, k)
               "reader": torch.randn(6, 8, 3, 3, dtype=torch.float64),  # a convolution reading it
               "fc": torch.randn(7, 8, dtype=torch.float64)}            # a Linear reading it
    space = Space(8, [ParamSlice("conv", 0, torch.arange(8))],
                  [ParamSlice("head", 1, torch.arange(8 * k).reshape(8, k)), ParamSlice("reader", 1, torch.arange(8)),
                   ParamSlice("fc", 1, torch.arange(8))],
                  [Tap("x", 1)])
    m = torch.randn(8, 8, dtype=torch.float64) + 3 * torch.eye(8, dtype=torch.float64)
    inv = torch.linalg.inv(m)
    perm = torch.randperm(8)
    for transform, mapping in [((m, inv), m), (perm, torch.eye(8, dtype=torch.float64)[:, perm])]:
        inverse = torch.linalg.inv(mapping)
        out = apply_transforms(tensors, [space], [transform])
        expected_head = (tensors["head"].reshape(10, 8, k).permute(0, 2, 1) @ inverse.T).permute(0, 2, 1)
        _assert_close(out["head"], expected_head.reshape(10, 8 * k), 1e-12)
        _assert_close(out["conv"], torch.einsum("ij,i...->j...", mapping, tensors["conv"]), 1e-12)
        _assert_close(out["reader"], torch.einsum("ji,oi...->oj...", inverse, tensors["reader"]), 1e-12)
        _assert_close(out["fc"], tensors["fc"] @ inverse.T, 1e-12)


# --------------------------------------------------------------------------
# multiplicative per-channel parameters (norm weights, layer scale) under dense maps


class _ConvBNConv(nn.Module):
    """Linear in its input: conv -> BatchNorm (eval) -> conv; the BN scale is constant over channels."""

    def __init__(self, channels=6):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, 4, 1)
        with torch.no_grad():
            self.bn.weight.fill_(1.7)
            self.bn.running_var.fill_(2.0)
            self.bn.bias.normal_()
            self.bn.running_mean.normal_()

    def forward(self, x):
        return self.conv2(self.bn(self.conv1(x)))


class _LayerScale(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.fc1 = nn.Linear(5, d)
        self.gamma = nn.Parameter(torch.full((d,), 0.3))
        self.fc2 = nn.Linear(d, 3)

    def forward(self, x):
        return self.fc2(self.fc1(x) * self.gamma)


def _orthogonal(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_norm_weights_and_layer_scales_are_marked_as_scales():
    spaces = find_spaces(_ConvBNConv().eval(), torch.randn(2, 3, 5, 5))
    kinds = {sl.name: (sl.scale, sl.variance) for s in spaces for sl in s.producers}
    assert kinds["bn.weight"] == (True, False)
    assert kinds["bn.running_var"] == (False, True)
    assert kinds["bn.bias"] == kinds["bn.running_mean"] == kinds["conv1.weight"] == (False, False)
    spaces = find_spaces(_LayerScale().eval(), torch.randn(2, 5))
    kinds = {sl.name: sl.scale for s in spaces for sl in s.producers}
    assert kinds == {"fc1.weight": False, "fc1.bias": False, "gamma": True}


@pytest.mark.parametrize("make,shape", [(_ConvBNConv, (4, 3, 5, 5)), (_LayerScale, (4, 5))])
def test_an_orthogonal_map_through_a_constant_scale_keeps_the_function(make, shape):
    # A constant per-channel scale commutes with every map, so an orthogonal
    # map (which also keeps a constant variance) must leave the function as it
    # is. Treating the scale as a vector (M^T s) would not: its entries would
    # become the column sums of M times s.
    torch.manual_seed(0)
    model = make().eval().double()
    x = torch.randn(*shape, dtype=torch.float64)
    spaces = find_spaces(model, x)
    (space,) = spaces
    q = _orthogonal(space.dim, 1)
    state = apply_transforms(model.state_dict(), spaces, [(q, q.T)])
    moved = copy.deepcopy(model)
    moved.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(moved(x), model(x), rtol=1e-10, atol=1e-10)
    scale = "bn.weight" if make is _ConvBNConv else "gamma"
    torch.testing.assert_close(state[scale], model.state_dict()[scale])


def test_a_scale_under_a_dense_map_is_the_diagonal_of_the_conjugated_scale():
    model = _LayerScale().eval().double()
    with torch.no_grad():
        model.gamma.copy_(torch.linspace(0.5, 2.0, 6, dtype=torch.float64))
    spaces = find_spaces(model, torch.randn(2, 5, dtype=torch.float64))
    m = torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 3 * torch.eye(6)
    inverse = torch.linalg.inv(m)
    state = apply_transforms(model.state_dict(), spaces, [(m, inverse)])
    expected = torch.diagonal(inverse @ torch.diag(model.gamma.detach()) @ m)
    torch.testing.assert_close(state["gamma"], expected)
    perm = torch.tensor([2, 0, 1, 5, 4, 3])
    state = apply_transforms(model.state_dict(), spaces, [perm])
    torch.testing.assert_close(state["gamma"], model.gamma.detach()[perm])
