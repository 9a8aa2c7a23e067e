"""Hugging Face models from tiny configs (random weights, nothing downloaded).

Skipped unless the optional ``transformers`` package is installed
(``pip install -e ".[hf]"``). torch.fx cannot trace these models; the
export-based walker finds their spaces with no per-model code.
"""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from skmerge import CCAAligner, ModelMerger, PermutationAligner  # noqa: E402
from skmerge.graph import check_spaces, find_spaces, permute_model  # noqa: E402
from skmerge.graph._export import tensor_leaves  # noqa: E402

torch.set_num_threads(2)


def _bert():
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(config), lambda n, s: torch.randint(
        1, 50, (n, 8), generator=torch.Generator().manual_seed(s))


def _gpt2():
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config), lambda n, s: torch.randint(
        0, 50, (n, 8), generator=torch.Generator().manual_seed(s))


def _vit():
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3)
    return transformers.ViTForImageClassification(config), lambda n, s: torch.randn(
        n, 3, 8, 8, generator=torch.Generator().manual_seed(s))


MODELS = {"bert": _bert, "gpt2": _gpt2, "vit": _vit}
#: per model: (number of spaces, dims, how many are attention spaces with heads of 8, tied)
EXPECTED = {
    "bert": (8, [16, 16, 16, 32, 16, 16, 32, 16], 4, False),
    "gpt2": (7, [16, 16, 16, 64, 16, 16, 64], 4, True),
    "vit": (7, [16, 16, 16, 32, 16, 16, 32], 4, False),
}


def _make(name, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, data = MODELS[name]()
    return model.double().eval(), data


def _output(model, x):
    with torch.no_grad():
        return tensor_leaves(model(x))[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_spaces_found_and_checked(name):
    model, data = _make(name)
    x = data(2, 0)
    x = x.double() if x.is_floating_point() else x
    spaces = find_spaces(model, x)
    n, dims, attention, tied = EXPECTED[name]
    assert len(spaces) == n and [s.dim for s in spaces] == dims
    heads = [s for s in spaces if s.block_family is not None]
    assert len(heads) == attention and all(s.block_size == 8 for s in heads)
    assert spaces[0].orthogonal is tied  # GPT-2 ties its output layer to the token embedding
    check_spaces(model, x, spaces, atol=1e-9)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_merge_with_a_permuted_copy_is_exact_and_two_seeds_merge(name):
    model, data = _make(name)
    x = data(128, 1)
    x = x.double() if x.is_floating_point() else x
    permuted, _ = permute_model(model, x[:2], seed=4)
    merger = ModelMerger([model, permuted], PermutationAligner(), device="cpu").fit(x)
    expected = _output(model, x)
    got = _output(merger.merged_model_, x)
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-9
    other, _ = _make(name, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few samples per dimension; GPT-2's tied space
        cca = ModelMerger([model, other], CCAAligner(), device="cpu").fit(x)
    out = _output(cca.merged_model_, x)
    assert out.shape == expected.shape and bool(torch.isfinite(out).all())
