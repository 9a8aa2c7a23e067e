"""Supported architectures: the table of the docs page "Supported architectures".

For every architecture (skmerge's own models, the block-for-block copies of
torchvision / timm / nanoGPT architectures written in ``tests/``, torch.nn's
``TransformerEncoder``, and Hugging Face models from tiny configs when the
optional ``transformers`` package is installed), with random weights:

* the feature spaces :func:`skmerge.graph.find_spaces` finds (count, their
  widths, attention spaces with heads matched as wholes, tied spaces),
* the random-permutation self-check (whole heads permuted too),
* the merge of the model with a permuted copy of itself with
  ``PermutationAligner`` (largest output difference, relative): it must be
  exact,
* the time to find the spaces (export + walk, 1 thread; the first call of a
  process also pays torch.export's warm-up).

Writes ``benchmarks/results/architectures.json`` and
``docs/_generated/architectures.inc``. Run::

    python benchmarks/architectures.py            # about 2 minutes on 2 cores
    python benchmarks/architectures.py --tables-only
"""

from __future__ import annotations

import _common  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _common import REPO, RESULTS, machine_info, read_json, rst_table, write_json, write_text  # noqa: E402
from skmerge import ModelMerger, PermutationAligner  # noqa: E402
from skmerge.graph import check_spaces, find_spaces, permute_model  # noqa: E402
from skmerge.graph._export import tensor_leaves  # noqa: E402
from skmerge.models import get_model  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
import _archs  # noqa: E402
import _modern  # noqa: E402

OUTPUT = RESULTS / "architectures.json"
TABLE = REPO / "docs" / "_generated" / "architectures.inc"


def _images(shape):
    return lambda n, seed: torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def _tokens(vocab, length):
    return lambda n, seed: torch.randint(1, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _cases():
    """``(name, source, make, data)`` for every architecture of the table."""
    cases = [
        ("MLP", "skmerge.models", lambda: get_model("mlp", hidden=(32, 32), in_features=12, num_classes=5),
         _images((12,))),
        ("VGG11 (BatchNorm)", "skmerge.models", lambda: get_model("vgg11", width=0.125, image_size=32),
         _images((3, 32, 32))),
        ("VGG11 (no BatchNorm)", "skmerge.models",
         lambda: get_model("vgg11", width=0.125, image_size=32, batch_norm=False), _images((3, 32, 32))),
        ("ResNet20 (CIFAR)", "skmerge.models", lambda: get_model("resnet20", width=0.5), _images((3, 32, 32))),
        ("ResNet18 (torchvision layout)", "skmerge.models", lambda: get_model("resnet18", width=0.125),
         _images((3, 32, 32))),
        ("ViT (class token, fused qkv + SDPA)", "skmerge.models",
         lambda: get_model("vit", dim=16, depth=2, heads=4), _images((3, 32, 32))),
    ]
    docs = {"mobilenet_v2": ("MobileNetV2", "torchvision blocks"),
            "efficientnet": ("EfficientNet (MBConv, SE, SiLU)", "torchvision blocks"),
            "convnext": ("ConvNeXt (NHWC LayerNorm, layer scale)", "torchvision/timm blocks"),
            "resnext": ("ResNeXt (grouped 3x3)", "torchvision blocks"),
            "shufflenet_v2": ("ShuffleNetV2 (split, shuffle)", "torchvision blocks"),
            "vit_mha": ("ViT with nn.MultiheadAttention", "torchvision blocks"),
            "timm_vit": ("ViT, fused qkv + SDPA", "timm blocks"),
            "gpt2": ("GPT-2 style, explicit q @ k.T", "nanoGPT blocks"),
            "gpt2_tied": ("GPT-2 style, tied embedding", "nanoGPT blocks"),
            "bert": ("BERT style (post-LN)", "transformers blocks"),
            "swin": ("Swin (windows, relative position bias)", "timm/torchvision blocks"),
            "lstm": ("LSTM classifier (2 layers)", "torch.nn.LSTM")}
    for key, cls in _modern.MODERN.items():
        title, source = docs[key]
        data = (_tokens(cls.vocab, cls.seq) if issubclass(cls, _modern._Tokens)
                else _images(cls.input_shape))
        cases.append((title, f"{source} (tests/_modern.py)", cls, data))
    cases.append(("nn.TransformerEncoder", "torch.nn", lambda: nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2), _images((5, 16))))
    try:
        import transformers
    except ImportError:
        return cases
    cfg = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    cases += [
        ("BertForSequenceClassification", f"transformers {transformers.__version__}",
         lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
             vocab_size=50, max_position_embeddings=16, num_labels=3, **cfg)), _tokens(50, 8)),
        ("GPT2LMHeadModel", f"transformers {transformers.__version__}",
         lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
             vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)),
         _tokens(50, 8)),
        ("ViTForImageClassification", f"transformers {transformers.__version__}",
         lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
             image_size=8, patch_size=4, num_channels=3, num_labels=3, **cfg)), _images((3, 8, 8))),
    ]
    return cases


def _measure(name, source, make, data) -> dict:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make().double().eval()
    x = data(64, 0)
    x = x.double() if x.is_floating_point() else x
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        _archs.calibrate_batchnorm(model, x, 0)  # no unit dead on every input
    record = {"name": name, "source": source}
    start = time.perf_counter()
    try:
        spaces = find_spaces(model, x[:2])
    except Exception as error:
        record.update(error=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return record
    record["find_seconds"] = time.perf_counter() - start
    record["spaces"] = len(spaces)
    record["dims"] = sorted({s.dim for s in spaces})
    record["attention"] = sum(1 for s in spaces if s.block_family is not None)
    record["blocks"] = sum(1 for s in spaces if s.block_family is None and s.block_size < s.dim)
    record["tied"] = sum(1 for s in spaces if s.orthogonal)
    try:
        check_spaces(model, x[:8], spaces, atol=1e-9)
        record["self_check"] = True
    except RuntimeError:
        record["self_check"] = False
    permuted, _ = permute_model(model, x[:2], spaces=spaces, seed=3)
    merger = ModelMerger([model, permuted], PermutationAligner(), device="cpu", reset_bn=False).fit(x)
    with torch.no_grad():
        a, b = tensor_leaves(model(x))[0], tensor_leaves(merger.merged_model_(x))[0]
    record["permuted_merge_error"] = float((a - b).abs().max() / a.abs().max())
    return record


def _yes(value) -> str:
    return "yes" if value else "no"


def table(results: dict) -> str:
    rows = []
    for r in results["architectures"]:
        if "error" in r:
            rows.append([r["name"], r["source"], "refused", "", "", "", "", r["error"]])
            continue
        features = []
        if r["attention"]:
            features.append(f"{r['attention']} attention spaces, heads matched")
        if r["blocks"]:
            features.append(f"{r['blocks']} block-diagonal")
        if r["tied"]:
            features.append("tied embedding (orthogonal maps)")
        dims = ", ".join(str(d) for d in r["dims"])
        rows.append([r["name"], r["source"], str(r["spaces"]), dims, "; ".join(features) or "-",
                     _yes(r["self_check"]), f"{r['permuted_merge_error']:.0e}", f"{r['find_seconds']:.2f} s"])
    header = ["architecture", "written as", "spaces", "widths", "structure", "self-check",
              "permuted merge (rel. error)", "find_spaces"]
    return rst_table(header, rows, widths="22 18 6 12 22 8 10 8")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables-only", action="store_true", help="rebuild the table from the JSON")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.tables_only:
        results = read_json(OUTPUT)
    else:
        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        records = [_measure(*case) for case in _cases()]
        results = {"machine": machine_info(), "threads": args.threads,
                   "wall_seconds": time.perf_counter() - start, "architectures": records}
        write_json(OUTPUT, results)
    write_text(TABLE, table(results))
    print(table(results))


if __name__ == "__main__":
    main()
