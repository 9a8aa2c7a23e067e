"""The character-level GPT of the language-model benchmark (benchmarks/_char_lm.py).

The model must be one skmerge merges exactly: its spaces found, a permuted
copy computing the same function, and a merge with that copy reproducing the
model, untied and with the output layer tied to the token embedding. The
corpus split and the scores are checked against independent formulas, on a
corpus written here (the real one is a Debian package the tests do not need),
and the committed checkpoints of benchmarks/models/char-gpt/ must load.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from skmerge import ModelMerger
from skmerge.aligners import CCAAligner, IdentityAligner, PermutationAligner
from skmerge.graph import find_spaces, permute_model
from skmerge.training import load_checkpoint

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from _char_lm import (SEGMENT, CharGPT, bits_per_character, ensemble_bits_per_character,  # noqa: E402
                      load_corpus, train_char_gpt, windows)

VOCAB, CONTEXT = 20, 12


def _model(seed=0, tied=False):
    torch.manual_seed(seed)
    return CharGPT(VOCAB, context=CONTEXT, dim=16, depth=2, heads=4, mlp_ratio=2, tied=tied).double().eval()


def _tokens(n, seed=1):
    return torch.randint(0, VOCAB, (n, CONTEXT), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tied", [False, True])
def test_spaces_are_the_stream_and_three_per_block(tied):
    spaces = find_spaces(_model(tied=tied), _tokens(2))
    assert len(spaces) == 1 + 3 * 2
    assert sorted(s.dim for s in spaces) == sorted([16] + [16, 16, 32] * 2)  # stream; qk, vo, mlp per block
    stream = max(spaces, key=lambda s: len(s.producers) + len(s.consumers))
    assert stream.dim == 16 and stream.orthogonal is tied  # a tied output layer needs orthogonal maps


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("aligner", [PermutationAligner(), CCAAligner()], ids=["permutation", "cca"])
def test_merge_with_a_permuted_copy_reproduces_the_model(tied, aligner):
    model = _model(tied=tied)
    x = _tokens(96)
    permuted, _ = permute_model(model, x[:2], seed=3)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(permuted(x), expected, atol=1e-10)
        assert not torch.allclose(permuted.blocks[0].mlp[0].weight, model.blocks[0].mlp[0].weight)
    merged = ModelMerger([model, permuted], aligner, device="cpu", verbose=False).fit(x).merged_model_
    with torch.no_grad():
        got = merged(x)
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-8
    assert (merged.lm_head.weight is merged.wte.weight) is tied


def test_two_trained_seeds_merge_better_than_averaging():
    text = torch.tensor([i % 7 for i in range(4000)]) + torch.randint(0, 2, (4000,),
                                                                       generator=torch.Generator().manual_seed(0))
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = CharGPT(VOCAB, context=CONTEXT, dim=16, depth=1, heads=2, mlp_ratio=2)
        train_char_gpt(model, text, steps=150, seed=seed, batch_size=16, lr=1e-2)
        models.append(model)
    x, y = windows(text, CONTEXT)
    base = [bits_per_character(m, x, y) for m in models]
    assert max(base) < 2.0  # learned: log2(20) = 4.3 bits for a uniform guess
    scores = {}
    for name, aligner in (("average", IdentityAligner()), ("cca", CCAAligner())):
        merger = ModelMerger(models, aligner, device="cpu", verbose=False)
        scores[name] = bits_per_character(merger.fit(x[:200]).merged_model_, x, y)
    assert scores["cca"] < scores["average"]


def test_windows_pair_each_position_with_the_next_character():
    ids = torch.arange(50)
    x, y = windows(ids, 8)
    assert x.shape == y.shape == (6, 8)
    assert torch.equal(y, x + 1) and torch.equal(x.reshape(-1), ids[:48])


def test_bits_per_character_agree_with_the_formulas():
    model = _model().float()
    x = _tokens(10)
    y = torch.roll(x, -1, dims=1)
    with torch.no_grad():
        logits = model(x)
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)).item() / math.log(2)
    assert bits_per_character(model, x, y, batch=3) == pytest.approx(expected, rel=1e-6)
    assert ensemble_bits_per_character([model], x, y, batch=4) == pytest.approx(expected, rel=1e-5)
    other = _model(seed=5).float()
    with torch.no_grad():
        probs = (F.softmax(logits, -1) + F.softmax(other(x), -1)) / 2
    mixed = -probs.gather(-1, y[..., None]).log().mean().item() / math.log(2)
    assert ensemble_bits_per_character([model, other], x, y) == pytest.approx(mixed, rel=1e-5)


def test_corpus_split_is_disjoint_complete_and_fixed(tmp_path):
    rng = torch.Generator().manual_seed(0)
    letters = "abcdefgh \n%"
    for name in ("zeta", "alpha", "mid"):
        idx = torch.randint(0, len(letters), (14 * SEGMENT + 17,), generator=rng)
        (tmp_path / name).write_text("".join(letters[i] for i in idx.tolist()))
        (tmp_path / f"{name}.dat").write_bytes(b"\x00\x01index")
        (tmp_path / f"{name}.u8").symlink_to(tmp_path / name)
    corpus = load_corpus(tmp_path)
    assert corpus["info"]["files"] == ["alpha", "mid", "zeta"]
    text = "".join((tmp_path / n).read_text() for n in ("alpha", "mid", "zeta"))
    assert corpus["vocab"] == "".join(sorted(set(text)))
    n_segments = len(text) // SEGMENT
    segments = {text[i * SEGMENT:(i + 1) * SEGMENT] for i in range(n_segments)}
    decoded = {}
    for part in ("train", "heldout", "test"):
        ids = corpus[part]
        assert len(ids) % SEGMENT == 0
        chars = "".join(corpus["vocab"][i] for i in ids.tolist())
        decoded[part] = {chars[i:i + SEGMENT] for i in range(0, len(chars), SEGMENT)}
        assert decoded[part] <= segments
    assert sum(len(v) for v in decoded.values()) == n_segments
    assert not (decoded["train"] & decoded["heldout"]) and not (decoded["train"] & decoded["test"])
    assert len(decoded["heldout"]) >= 1 and len(decoded["test"]) >= 1
    again = load_corpus(tmp_path)
    assert all(torch.equal(again[p], corpus[p]) for p in ("train", "heldout", "test"))


def test_missing_corpus_says_how_to_install_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        load_corpus(tmp_path / "nowhere")


MANIFEST = BENCHMARKS / "models" / "char-gpt" / "MANIFEST.json"
RECORDS = sorted(json.loads(MANIFEST.read_text())["seeds"].items()) if MANIFEST.exists() else []


@pytest.mark.parametrize("seed,record", RECORDS, ids=[f"seed{s}" for s, _ in RECORDS])
def test_committed_checkpoints_load_with_their_float16_values(seed, record):
    manifest = json.loads(MANIFEST.read_text())
    path = MANIFEST.parent / record["file"]
    assert path.stat().st_size == record["bytes"]
    state, meta = load_checkpoint(path)
    assert meta["seed"] == int(seed) and meta["model_kwargs"] == manifest["model_kwargs"]
    assert len(meta["vocab"]) == manifest["corpus"]["vocab_size"]
    assert all(v.dtype == torch.float16 for v in state.values())
    model = CharGPT(len(meta["vocab"]), **meta["model_kwargs"])
    model.load_state_dict({k: v.float() for k, v in state.items()})
    assert sum(p.numel() for p in model.parameters()) == manifest["parameters"]
    assert record["test_bits_per_character"] == meta["test_bits_per_character"]
    with torch.no_grad():
        logits = model(torch.zeros(2, meta["model_kwargs"]["context"], dtype=torch.long))
    assert logits.shape == (2, meta["model_kwargs"]["context"], len(meta["vocab"]))
    assert torch.isfinite(logits).all()
