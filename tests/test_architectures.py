"""Modern architectures found automatically, checked, and merged exactly with permuted copies.

The models (tests/_modern.py) are written block for block like torchvision's,
timm's and nanoGPT's: depthwise and grouped convolutions, squeeze-excitation,
NHWC LayerNorm with layer scale, channel split and shuffle, the three forms
of attention (``nn.MultiheadAttention``, a fused qkv with
``scaled_dot_product_attention``, separate q/k/v with explicit products and a
causal mask), a tied embedding, windowed attention with a relative position
bias, an LSTM.
"""

import warnings

import pytest
import torch

import _archs
import _modern
from skmerge import CCAAligner, ModelMerger, PermutationAligner
from skmerge.graph import check_spaces, find_spaces, permute_model

torch.set_num_threads(2)

#: name -> [(space name, dim, block size)] in graph order
EXPECTED = {
    "mobilenet_v2": [("features.0.0 (+1 joined)", 8, 8), ("features.2.conv.0.0", 32, 32),
                     ("features.2.conv.2 (+1 joined)", 12, 12), ("features.3.conv.0.0", 48, 48),
                     ("features.4.0", 24, 24)],
    "efficientnet": [("stem.0 (+1 joined)", 8, 8), ("blocks.0.block.0.0 (+1 joined)", 32, 32),
                     ("blocks.0.block.2.fc1", 2, 2), ("blocks.1.block.0.0 (+1 joined)", 32, 32),
                     ("blocks.1.block.2.fc1", 2, 2), ("blocks.1.block.3.0", 12, 12)],
    "convnext": [("stem.0 (+2 joined)", 8, 8), ("stage1.0.pwconv1", 32, 32), ("stage1.1.pwconv1", 32, 32),
                 ("down.1 (+1 joined)", 16, 16), ("stage2.pwconv1", 64, 64)],
    "resnext": [("conv1", 8, 8), ("layer1.0.downsample.0 (+2 joined)", 16, 16), ("layer1.0.conv1", 16, 4),
                ("layer1.0.conv2", 16, 4), ("layer1.1.conv1", 16, 4), ("layer1.1.conv2", 16, 4)],
    "shufflenet_v2": [("conv1.0", 8, 8), ("stage2.0.branch1.2 [0:2]", 2, 2), ("stage2.0.branch1.2 [2:4]", 2, 2),
                      ("stage2.0.branch1.2 [4:8]", 4, 4), ("stage2.0.branch2.0", 8, 8),
                      ("stage2.0.branch2.5 [0:2]", 2, 2), ("stage2.0.branch2.5 [2:4]", 2, 2),
                      ("stage2.0.branch2.5 [4:8]", 4, 4), ("stage2.1.branch2.0", 8, 8),
                      ("stage2.1.branch2.5 [0:4]", 4, 4), ("stage2.1.branch2.5 [4:8]", 4, 4),
                      ("stage2.2.branch2.0", 8, 8), ("stage2.2.branch2.5", 8, 8), ("conv5.0", 24, 24)],
    "vit_mha": [("embed.proj (+4 joined)", 16, 16),
                ("layers.0.self_attention (query-key)", 16, 4), ("layers.0.self_attention (value-output)", 16, 4),
                ("layers.0.mlp.0", 32, 32),
                ("layers.1.self_attention (query-key)", 16, 4), ("layers.1.self_attention (value-output)", 16, 4),
                ("layers.1.mlp.0", 32, 32)],
    "timm_vit": [("patch_embed.proj (+4 joined)", 16, 16),
                 ("blocks.0.attn.qkv (query-key)", 16, 4), ("blocks.0.attn.qkv (value-output)", 16, 4),
                 ("blocks.0.mlp.0", 32, 32),
                 ("blocks.1.attn.qkv (query-key)", 16, 4), ("blocks.1.attn.qkv (value-output)", 16, 4),
                 ("blocks.1.mlp.0", 32, 32)],
    "gpt2": [("wte (+5 joined)", 16, 16), ("h.0.attn.q (+1 joined)", 16, 4), ("h.0.attn.v", 16, 4),
             ("h.0.mlp.0", 64, 64), ("h.1.attn.q (+1 joined)", 16, 4), ("h.1.attn.v", 16, 4),
             ("h.1.mlp.0", 64, 64)],
    "gpt2_tied": [("wte (+5 joined)", 16, 16), ("h.0.attn.q (+1 joined)", 16, 4), ("h.0.attn.v", 16, 4),
                  ("h.0.mlp.0", 64, 64), ("h.1.attn.q (+1 joined)", 16, 4), ("h.1.attn.v", 16, 4),
                  ("h.1.mlp.0", 64, 64)],
    "bert": [("word (+4 joined)", 16, 16), ("layers.0.query (+1 joined)", 16, 4), ("layers.0.value", 16, 4),
             ("layers.0.intermediate", 32, 32), ("layers.1.query (+1 joined)", 16, 4),
             ("layers.1.value", 16, 4), ("layers.1.intermediate", 32, 32), ("pooler", 16, 16)],
    "swin": [("patch (+2 joined)", 16, 16), ("attn.qkv (query-key)", 16, 8), ("attn.qkv (value-output)", 16, 8),
             ("mlp.0", 32, 32)],
    "lstm": [("embed", 8, 8), ("lstm.l0", 12, 12), ("lstm.l1", 12, 12)],
}
#: post-LN streams are rank-deficient (LayerNorm removes one direction): CCA cannot be exact there
NOT_FULL_RANK = {"bert"}


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    cls = _modern.MODERN[name]
    model = cls().double()
    x = cls.example_input(256, seed=seed, dtype=torch.float64)
    return _archs.calibrate_batchnorm(model, x, seed), x


def _relative_error(a, b):
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_spaces_found_and_checked(name):
    model, x = _model(name)
    spaces = find_spaces(model, x[:2])
    assert [(s.name, s.dim, s.block_size) for s in spaces] == EXPECTED[name]
    # the random-permutation self-check (whole heads move together in attention layers)
    check_spaces(model, x[:8], spaces, atol=1e-9)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_merge_with_a_permuted_copy_is_exact(name):
    model, x = _model(name)
    permuted, _ = permute_model(model, x[:2], seed=3)
    with torch.no_grad():
        expected = model(x)
    aligners = [PermutationAligner()]
    if name not in NOT_FULL_RANK:
        aligners.append(CCAAligner(regularization=0))
    for aligner in aligners:
        merger = ModelMerger([model, permuted], aligner, reset_bn=False, device="cpu").fit(x)
        with torch.no_grad():
            got = merger.merged_model_(x)
        assert _relative_error(expected, got) < 1e-9, type(aligner).__name__


@pytest.mark.parametrize("name", ["mobilenet_v2", "convnext", "timm_vit", "gpt2_tied", "lstm"])
def test_cca_merge_of_two_seeds_runs_end_to_end(name):
    (a, x), (b, _) = _model(name, 0), _model(name, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small alignment sets, the tied space's orthogonal map
        merger = ModelMerger([a, b], CCAAligner(), device="cpu").fit(x)
    with torch.no_grad():
        out = merger.merged_model_(x)
    assert out.shape == a(x).shape and bool(torch.isfinite(out).all())
    assert len(merger.aligners_) == len(EXPECTED[name])


def test_heads_are_matched_as_wholes():
    """A copy whose heads are shuffled (and permuted within) merges exactly: heads were matched."""
    model, x = _model("timm_vit")
    spaces = find_spaces(model, x[:2])
    families = {s.block_family for s in spaces if s.block_family}
    assert families == {"heads of blocks.0.attn", "heads of blocks.1.attn"}
    qk, vo = spaces[1], spaces[2]
    assert qk.block_family == vo.block_family
    for seed in range(10):  # a seed that moves the heads of the first layer
        permuted, perms = permute_model(model, x[:2], spaces=spaces, seed=seed)
        heads = [p.reshape(-1, 4)[:, 0] // 4 for p in perms[1:3]]
        if not torch.equal(heads[0], torch.arange(4)):
            break
    # the query-key and value-output spaces of a layer moved their heads with one permutation
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], torch.arange(4))
    merger = ModelMerger([model, permuted], PermutationAligner(), device="cpu").fit(x)
    assert any(getattr(row[1], "order_", None) is not None and list(row[1].order_) != list(range(4))
               for row in merger.aligners_)
    with torch.no_grad():
        assert _relative_error(model(x), merger.merged_model_(x)) < 1e-9


def test_tied_weights_are_transformed_once():
    """The embedding tied to the output layer: one tensor, one transform, an orthogonal-only space."""
    model, x = _model("gpt2_tied")
    assert model.lm_head.weight is model.wte.weight
    stream = find_spaces(model, x[:2])[0]
    assert stream.orthogonal
    wte = [s for s in stream.producers + stream.consumers if s.name in ("wte.weight", "lm_head.weight")]
    assert {s.name for s in wte} == {"wte.weight", "lm_head.weight"}  # both names, same slice
    assert all(s in stream.producers for s in wte)  # listed once, as producers
    permuted, _ = permute_model(model, x[:2], seed=2)
    assert permuted.lm_head.weight is permuted.wte.weight
    merger = ModelMerger([model, permuted], PermutationAligner(), device="cpu").fit(x)
    merged = merger.merged_model_
    assert merged.lm_head.weight is merged.wte.weight  # still tied
    with torch.no_grad():
        assert _relative_error(model(x), merged(x)) < 1e-9


def test_a_non_orthogonal_aligner_on_a_tied_space_falls_back_to_a_rotation():
    (a, x), (b, _) = _model("gpt2_tied", 0), _model("gpt2_tied", 1)
    with pytest.warns(UserWarning, match="ProcrustesAligner"):
        merger = ModelMerger([a, b], CCAAligner(), device="cpu").fit(x)
    mapping = torch.as_tensor(merger.aligners_[0][1].mapping_)
    eye = torch.eye(mapping.shape[0], dtype=mapping.dtype)
    assert torch.allclose(mapping.T @ mapping, eye, atol=1e-8)  # orthogonal, as the tie requires
