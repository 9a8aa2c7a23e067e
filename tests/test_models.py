"""Tests of the reference architectures (skmerge.models)."""

import operator

import pytest
import torch
import torch.fx as fx
from torch import nn

from skmerge.models import (
    MLP,
    VGG,
    CifarResNet20,
    ResNet18,
    ViT,
    architecture_of,
    available_models,
    get_model,
)

# (name, kwargs, input shape): every model on the input sizes it must support.
CASES = [
    ("mlp", dict(in_channels=1, image_size=8, width=0.25), (3, 1, 8, 8)),
    ("mlp", dict(in_features=784, num_classes=7, hidden=(16, 8)), (3, 1, 28, 28)),
    ("vgg11", dict(in_channels=1, image_size=8, width=0.125), (3, 1, 8, 8)),
    ("vgg11", dict(in_channels=1, image_size=28, width=0.125), (3, 1, 28, 28)),
    ("vgg11", dict(width=0.125), (3, 3, 32, 32)),
    ("vgg16", dict(width=0.125, num_classes=100), (3, 3, 32, 32)),
    ("vgg16", dict(in_channels=1, image_size=8, width=0.125, batch_norm=False,
                   classifier_hidden=(64,), dropout=0.5), (3, 1, 8, 8)),
    ("resnet20", dict(width=0.5), (3, 3, 32, 32)),
    ("resnet20", dict(in_channels=1, image_size=8, width=0.5), (3, 1, 8, 8)),
    ("resnet20", dict(in_channels=1, width=0.5), (3, 1, 28, 28)),
    ("resnet18", dict(width=0.125, num_classes=10), (3, 3, 64, 64)),
    ("resnet18", dict(width=0.125, num_classes=10, stem="cifar", in_channels=1),
     (3, 1, 8, 8)),
]
IDS = [f"{n}-{s[-1]}px-{i}" for i, (n, _, s) in enumerate(CASES)]

# Everything skmerge.graph.find_spaces understands (see DESIGN.md, section 2).
SUPPORTED_MODULES = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
                     nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity, nn.Flatten)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run on one intra-op thread: these tiny models gain nothing from more,
    and OpenMP spin-waiting makes them very slow when other processes load
    the cores. Restored afterwards, so other test modules are unaffected."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("name,kwargs,shape", CASES, ids=IDS)
def test_forward_shape_and_symbolic_trace(name, kwargs, shape):
    torch.manual_seed(0)
    model = get_model(name, **kwargs).eval()
    x = torch.randn(*shape)
    out = model(x)
    assert out.shape == (shape[0], kwargs.get("num_classes", 10))
    traced = fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), out)
    # Only operations the graph walker supports: modules from the list above,
    # flatten and residual addition.
    for node in traced.graph.nodes:
        if node.op == "call_module":
            assert isinstance(traced.get_submodule(node.target), SUPPORTED_MODULES)
        elif node.op == "call_function":
            assert node.target in (torch.flatten, operator.add), node.target
        assert node.op != "call_method", node


@pytest.mark.parametrize("name", ["mlp", "vgg11", "vgg16", "resnet20", "resnet18", "vit"])
def test_models_train_backward(name):
    kwargs = dict(in_channels=1, image_size=8, width=0.125)
    if name == "resnet18":
        kwargs["stem"] = "cifar"
    model = get_model(name, **kwargs)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_width_multiplier_changes_channels():
    assert [m.out_features for m in MLP(64, 10, hidden=(100, 50), width=2).features
            if isinstance(m, nn.Linear)] == [200, 100]
    for w in (0.25, 0.5):
        vgg = VGG("vgg11", width=w)
        convs = [m for m in vgg.features if isinstance(m, nn.Conv2d)]
        assert [c.out_channels for c in convs] == [int(c * w) for c in
                                                   (64, 128, 256, 256, 512, 512, 512, 512)]
        assert vgg.classifier.in_features == int(512 * w)
        r20 = CifarResNet20(width=w)
        assert r20.conv1.out_channels == int(16 * w)
        assert r20.layer2[0].conv1.out_channels == int(32 * w)
        assert r20.fc.in_features == int(64 * w)
    with torch.device("meta"):
        r18 = ResNet18(width=0.5)
    assert r18.layer4[1].conv2.out_channels == 256 and r18.fc.in_features == 256
    assert CifarResNet20(width=0.01).conv1.out_channels == 1  # never zero channels
    with pytest.raises(ValueError, match="width"):
        MLP(4, 2, width=0)


@pytest.mark.parametrize("size,n_pools", [(32, 5), (28, 4), (8, 3), (2, 1), (1, 0)])
def test_vgg_pooling_adapts_to_image_size(size, n_pools):
    vgg = VGG("vgg11", in_channels=1, image_size=size, width=0.125)
    pools = [m for m in vgg.features if isinstance(m, nn.MaxPool2d)]
    skipped = [m for m in vgg.features if isinstance(m, nn.Identity)]
    assert len(pools) == n_pools and len(skipped) == 5 - n_pools
    assert vgg.classifier.in_features == 64  # spatial size 1 after features
    assert vgg(torch.randn(2, 1, size, size)).shape == (2, 10)
    # State-dict keys do not depend on the image size.
    assert list(vgg.state_dict()) == list(
        VGG("vgg11", in_channels=1, image_size=32, width=0.125).state_dict())


def test_vgg_large_images_and_custom_cfg():
    vgg = VGG([8, "M", 16, "M"], image_size=16, num_classes=3)
    assert vgg.classifier.in_features == 16 * 4 * 4
    assert vgg(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    assert all(c.bias is None for c in vgg.features if isinstance(c, nn.Conv2d))
    assert all(c.bias is not None for c in VGG([8, "M"], batch_norm=False).features
               if isinstance(c, nn.Conv2d))
    with pytest.raises(ValueError, match="vgg11"):
        VGG("vgg12")


def _torchvision_resnet18_keys():
    """state_dict keys of torchvision.models.resnet18() (written out by hand)."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"] + [f"bn1.{k}" for k in bn]
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}."
            keys += [p + "conv1.weight"] + [p + f"bn1.{k}" for k in bn]
            keys += [p + "conv2.weight"] + [p + f"bn2.{k}" for k in bn]
            if layer > 1 and block == 0:
                keys += [p + "downsample.0.weight"] + [p + f"downsample.1.{k}" for k in bn]
    return keys + ["fc.weight", "fc.bias"]


def test_resnet18_matches_torchvision_layout():
    with torch.device("meta"):
        model = ResNet18()
    state = model.state_dict()
    assert list(state) == _torchvision_resnet18_keys()
    # torchvision.models.resnet18() has 11,689,512 parameters.
    assert sum(p.numel() for p in model.parameters()) == 11_689_512
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert state["fc.weight"].shape == (1000, 512)
    with torch.device("meta"):
        small = ResNet18(num_classes=10, stem="cifar")
    assert list(small.state_dict()) == _torchvision_resnet18_keys()
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    with pytest.raises(ValueError, match="stem"):
        ResNet18(stem="tiny")


def test_resnet20_projection_shortcuts():
    model = CifarResNet20()
    assert model.layer1[0].downsample is None
    for layer in (model.layer2, model.layer3):
        ds = layer[0].downsample
        assert isinstance(ds[0], nn.Conv2d) and ds[0].kernel_size == (1, 1)
        assert ds[0].stride == (2, 2) and isinstance(ds[1], nn.BatchNorm2d)
        assert all(b.downsample is None for b in layer[1:])
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == 3
    # 19 convs + fc = 20 weight layers (shortcut projections not counted).
    n_conv = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())
    assert n_conv == 19


def test_registry():
    assert available_models() == ["mlp", "resnet18", "resnet20", "vgg11", "vgg16", "vit"]
    with pytest.raises(ValueError, match="mlp, resnet18, resnet20, vgg11, vgg16, vit"):
        get_model("alexnet")
    with pytest.raises(TypeError, match="in_features"):
        get_model("mlp")
    model = get_model("VGG11", in_channels=1, image_size=8, width=0.125)
    assert architecture_of(model) == {
        "name": "vgg11", "kwargs": dict(in_channels=1, image_size=8, width=0.125)}
    assert architecture_of(nn.Linear(2, 2)) is None
    assert isinstance(get_model("resnet20", width=0.25), CifarResNet20)
    assert get_model("mlp", in_channels=1, image_size=8, hidden=(4,)).features[0].in_features == 64


@pytest.mark.parametrize("name,kwargs,shape", CASES, ids=IDS)
def test_graph_walker_finds_consistent_spaces(name, kwargs, shape):
    # Integration with skmerge.graph: every reference model must be mergeable
    # without hand-written spaces, and permuting them must not change outputs.
    graph = pytest.importorskip("skmerge.graph")
    torch.manual_seed(0)
    model = get_model(name, **kwargs)
    x = torch.randn(*shape)
    assert len(graph.find_spaces(model, x)) > 0
    graph.check_spaces(model, x)


VIT = dict(in_channels=1, image_size=28, patch_size=7, dim=16, depth=2, heads=4)


def test_vit_layout_width_and_errors():
    model = get_model("vit", **VIT, width=2)
    assert isinstance(model, ViT) and model.patch_embed.out_channels == 32
    assert model.pos_embed.shape == (1, 17, 32) and model.blocks[0].mlp[0].out_features == 64
    assert model.blocks[0].attn.qkv.out_features == 96 and len(model.blocks) == 2
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViT(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="multiple of heads=3"):
        ViT(dim=16, heads=3)


@pytest.mark.parametrize("taps", ["formed", "consumers", "both", "pre_and_post_activation"])
def test_vit_keeps_its_query_key_spaces_at_every_tap_placement(taps):
    """No layer reads a query-key space as its input: with ``taps="consumers"`` it is observed where
    it is formed, not dropped (dropped, the head order of its value-output space alone changed the
    function)."""
    from skmerge.graph import check_spaces, find_spaces

    torch.manual_seed(0)
    model = get_model("vit", **dict(VIT, dim=32)).eval()
    x = torch.randn(4, 1, 28, 28)
    spaces = find_spaces(model, x[:2], taps=taps)
    roles = [s.name.rsplit("(", 1)[-1] for s in spaces if "attn" in s.name]
    assert roles == ["query-key)", "value-output)"] * 2
    query_key = [s for s in spaces if "query-key" in s.name]
    assert all(t.dual for s in query_key for t in s.taps if t.dual) and all(s.taps for s in query_key)
    check_spaces(model, x, spaces=spaces)


def test_vit_spaces_are_exact_under_permutations_with_heads_matched():
    """Spaces found on the exported graph: the residual stream, per block a query-key and a
    value-output space (block-diagonal over the heads) and the MLP; a merge with a permuted copy
    (heads shuffled too) reproduces the model."""
    from skmerge import ModelMerger, PermutationAligner
    from skmerge.graph import check_spaces, find_spaces, permute_model

    torch.manual_seed(0)
    model = get_model("vit", **VIT).double().eval()
    x = torch.randn(16, 1, 28, 28, dtype=torch.float64)
    spaces = find_spaces(model, x[:2])
    assert len(spaces) == 1 + 3 * 2
    assert sum(s.block_size == s.dim // 4 for s in spaces) == 2 * 2  # 4 heads
    check_spaces(model, x[:2])
    permuted = permute_model(model, x[:2], seed=3)[0]
    merged = ModelMerger([model, permuted], PermutationAligner(), device="cpu").fit(x).merged_model_
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), rtol=0, atol=1e-10)


def test_resnet20_observed_before_and_after_its_relus_merges_a_permuted_copy_exactly():
    """taps="pre_and_post_activation": every space of ResNet20 (each tapped at ReLUs) gains as many
    taps, at the ReLUs' inputs; the merge with a permuted copy reproduces the model."""
    from skmerge import ModelMerger, PermutationAligner
    from skmerge.graph import find_spaces, permute_model

    import _archs

    torch.manual_seed(0)
    model = _archs.randomize_batchnorm(get_model("resnet20", width=0.5, in_channels=1, num_classes=10), 0).eval()
    x = torch.randn(64, 1, 28, 28)
    formed = find_spaces(model, x[:4], taps="formed")
    pooled = find_spaces(model, x[:4], taps="pre_and_post_activation")
    assert [len(s.taps) for s in pooled] == [2 * len(s.taps) for s in formed]
    for space in pooled:
        half = len(space.taps) // 2
        assert {t.node for t in space.taps[half:]}.isdisjoint({t.node for t in space.taps[:half]})
    permuted, _ = permute_model(model, x[:4], seed=1)
    merger = ModelMerger([model, permuted], PermutationAligner(), taps="pre_and_post_activation",
                         reset_bn=False, device="cpu", verbose=False).fit(x)
    torch.testing.assert_close(merger.merged_model_.eval()(x), model(x), rtol=1e-4, atol=1e-4)
