"""Why CCA loses accuracy on the converged ResNet20s: candidate causes, measured.

On the committed ResNet20 base models (``benchmarks/models/``, Fashion-MNIST,
93-94 %), merging two models with ``CCAAligner()`` keeps 89 % (width 1) and
93 % (width 2) of the base accuracy. Each candidate fix below is one merge of
the same pair of models, test accuracy on the 10,000 test images, alignment on
the 3,000 alignment images of ``benchmarks/converged.py`` (BatchNorm statistics
re-estimated on them unless said otherwise):

* the baselines: ``PermutationAligner()``, ``CCAAligner()``, ``ProcrustesAligner()``;
* **REPAIR** after CCA (``repair=True``) on top of the BatchNorm re-estimation;
* **BatchNorm folded before aligning**: every BatchNorm's normalization and
  scale multiplied into the convolution before it (``conv.weight *
  gamma / sigma``; the BatchNorm keeps only its shift: the same function in
  evaluation mode), so that a dense map meets one affine layer instead of a
  per-channel scale; merged then (a) kept as averaged, (b) with the BatchNorm
  statistics re-estimated, (c) with REPAIR instead;
* **per-space aligners** (``space_aligners=``): CCA on the residual streams
  and permutations on the blocks' hidden channels, and the reverse;
* **observed before and after the ReLUs**: every space observed at the
  output of its ReLUs (the default) and at their inputs (after the BatchNorm
  or the residual sum), the two pooled like the places of a residual stream
  (``taps="pre_and_post_activation"``);
* **more alignment data**: all 5,000 held-out images instead of 3,000 (then
  no images are left for validation);
* a **diagnostic**: the second model alone expressed in the first one's basis
  (``weights=[0, 1]``), which is the second model itself for a permutation and
  measures, for a dense map, how much of the model's function survives the
  map through the ReLUs.

Writes ``benchmarks/results/resnet_candidates.json`` and
``docs/_generated/benchmarks/resnet_candidates.inc``. Run::

    python benchmarks/resnet_candidates.py                          # 2 pairs per width, about 35 min
    python benchmarks/resnet_candidates.py --families resnet20-x1 --pairs 0+1
    python benchmarks/resnet_candidates.py --missing   # pairs already run gain the before-and-after-ReLU taps only
    python benchmarks/resnet_candidates.py --tables-only
"""

from __future__ import annotations

import _common  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)

import argparse  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from _base_models import FAMILIES, accuracy, load_base_models  # noqa: E402
from _common import (GENERATED, RESULTS, machine_info, machine_line, read_json, rst_table,  # noqa: E402
                     setup_torch, update_families, write_text)
from converged import N_ALIGN  # noqa: E402
from skmerge import CCAAligner, ModelMerger, PermutationAligner, ProcrustesAligner  # noqa: E402
from skmerge.graph import find_spaces  # noqa: E402

OUTPUT = RESULTS / "resnet_candidates.json"
FAMILY_NAMES = ("resnet20-x1", "resnet20-x2")
PAIRS = ("0+1", "2+3")
#: (key, column label) in the table's order.
COLUMNS = (
    ("permutation", "permutation"),
    ("procrustes", "Procrustes"),
    ("cca", "CCA"),
    ("cca_repair", "CCA + REPAIR"),
    ("folded_kept", "BN folded, kept"),
    ("folded_reset", "BN folded, re-estimated"),
    ("folded_repair", "BN folded, REPAIR"),
    ("cca_streams_perm_hidden", "CCA streams, permuted hidden"),
    ("perm_streams_cca_hidden", "permuted streams, CCA hidden"),
    ("cca_pre_and_post_relu", "CCA, before and after the ReLUs"),
    ("cca_5000", "CCA, 5,000 images"),
    ("alone_permutation", "model 2 alone, permutation"),
    ("alone_procrustes", "model 2 alone, Procrustes"),
    ("alone_cca", "model 2 alone, CCA"),
)
#: The candidate fixes (the columns that are neither a baseline nor the diagnostic).
CANDIDATES = tuple(k for k, _ in COLUMNS
                   if k not in ("permutation", "procrustes", "cca") and not k.startswith("alone"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(FAMILY_NAMES))
    parser.add_argument("--pairs", default=",".join(PAIRS), help="pairs of seeds, e.g. 0+1,2+3")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--missing", action="store_true",
                        help="pairs already run gain only the before-and-after-ReLU candidate")
    parser.add_argument("--tables-only", action="store_true")
    return parser.parse_args(argv)


def batchnorm_folded(model: nn.Module) -> nn.Module:
    """A copy whose every ``Conv2d -> BatchNorm2d`` carries the normalization in the convolution.

    ``conv.weight *= gamma / sqrt(running_var + eps)``; the BatchNorm becomes
    ``x + beta'`` (weight 1, running mean 0, running variance ``1 - eps``), the
    same function in evaluation mode.
    """
    model = copy.deepcopy(model)
    previous = None
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                if not (isinstance(previous, nn.Conv2d) and previous.out_channels == module.num_features):
                    raise ValueError(f"{name} does not follow a convolution of its width")
                scale = module.weight / torch.sqrt(module.running_var + module.eps)
                previous.weight.mul_(scale.view(-1, 1, 1, 1))
                shift = module.bias - module.running_mean * scale
                if previous.bias is not None:
                    shift = shift + previous.bias * scale
                    previous.bias.zero_()
                module.weight.fill_(1.0)
                module.bias.copy_(shift)
                module.running_mean.zero_()
                module.running_var.fill_(1.0 - module.eps)
            elif isinstance(module, nn.Conv2d):
                previous = module
    return model


def is_stream(space) -> bool:
    """A residual stream: the spaces whose producers were joined (``"(+3 joined)"``)."""
    return "joined" in space.name


def _alignment_set(data) -> TensorDataset:
    x, y = data["heldout"].tensors
    return TensorDataset(x[:N_ALIGN], y[:N_ALIGN])


def run_pre_and_post_relu(models, data) -> dict:
    """CCA observed before and after the ReLUs (``taps="pre_and_post_activation"``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merger = ModelMerger(models, CCAAligner(), taps="pre_and_post_activation", device="cpu", verbose=False)
        return {"cca_pre_and_post_relu": accuracy(merger.fit(_alignment_set(data)).merged_model_, data["test"])}


def run_pair(models, data) -> dict:
    """Every candidate on one pair; test accuracies."""
    align = _alignment_set(data)
    test = data["test"]
    spaces = find_spaces(models[0], align.tensors[0][:8])
    common = dict(spaces=spaces, device="cpu", verbose=False)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merger = ModelMerger(models, CCAAligner(), **common).fit(align)
        out["cca"] = accuracy(merger.merged_model_, test)
        for key, params in (
                ("permutation", dict(aligner=PermutationAligner())),
                ("procrustes", dict(aligner=ProcrustesAligner())),
                ("cca_streams_perm_hidden", dict(
                    aligner=CCAAligner(), space_aligners=[(lambda s: not is_stream(s), PermutationAligner())])),
                ("perm_streams_cca_hidden", dict(aligner=CCAAligner(),
                                                 space_aligners=[(is_stream, PermutationAligner())])),
                ("alone_permutation", dict(aligner=PermutationAligner(), space_aligners=None, weights=[0, 1])),
                ("alone_procrustes", dict(aligner=ProcrustesAligner())),
                ("alone_cca", dict(aligner=CCAAligner()))):
            merger.refit(align, **params)
            out[key] = accuracy(merger.merged_model_, test)
        out["cca_repair"] = accuracy(ModelMerger(models, CCAAligner(), repair=True, **common)
                                     .fit(align).merged_model_, test)
        folded = [batchnorm_folded(m) for m in models]
        out["folded_models"] = [accuracy(m, test) for m in folded]  # the same functions
        for key, params in (("folded_kept", dict(reset_bn=False)), ("folded_reset", {}),
                            ("folded_repair", dict(reset_bn=False, repair=True))):
            out[key] = accuracy(ModelMerger(folded, CCAAligner(), **params, **common)
                                .fit(align).merged_model_, test)
        out["cca_5000"] = accuracy(ModelMerger(models, CCAAligner(), **common)
                                   .fit(data["heldout"]).merged_model_, test)
    return {**out, **run_pre_and_post_relu(models, data)}


def table(results: dict) -> str:
    header = ["models", "pair", "base (mean)"] + [label for _, label in COLUMNS]
    rows = []
    for fam in results["families"].values():
        for pair, entry in fam["pairs"].items():
            rows.append([fam["label"], pair.replace("+", " + "), f"{100 * entry['base_mean']:.1f}"] +
                        [f"{100 * entry[k]:.1f}" for k, _ in COLUMNS])
    return rst_table(header, rows, stub_columns=1)


def findings(results: dict) -> str:
    lines = []
    for fam in results["families"].values():
        entries = list(fam["pairs"].values())

        def mean(key, entries=entries):
            return 100 * float(np.mean([e[key] for e in entries]))

        # more alignment data is the same merge, not another method
        best_other = max(("permutation", "procrustes", *(k for k in CANDIDATES if k != "cca_5000")), key=mean)
        label = dict(COLUMNS)[best_other]
        lines.append(
            f"- {fam['label']} ({len(entries)} pairs): CCA {mean('cca'):.1f}, permutation "
            f"{mean('permutation'):.1f}; the best other candidate is {label} ({mean(best_other):.1f}). "
            f"REPAIR {mean('cca_repair') - mean('cca'):+.1f} points, BatchNorm folded "
            f"{mean('folded_reset') - mean('cca'):+.1f} (re-estimated) / {mean('folded_repair') - mean('cca'):+.1f} "
            f"(REPAIR), observed before and after the ReLUs "
            f"{mean('cca_pre_and_post_relu') - mean('cca'):+.1f}, per-space aligners "
            f"{mean('cca_streams_perm_hidden') - mean('cca'):+.1f} / "
            f"{mean('perm_streams_cca_hidden') - mean('cca'):+.1f}, 5,000 alignment images "
            f"{mean('cca_5000') - mean('cca'):+.1f}. The second model alone in the first one's basis: "
            f"{mean('alone_permutation'):.1f} (permutation), {mean('alone_procrustes'):.1f} (Procrustes), "
            f"{mean('alone_cca'):.1f} (CCA).")
    return "\n".join(lines) + "\n"


def write_tables(results: dict) -> None:
    meta = (f"Machine: {machine_line(results['machine'])} "
            + "; ".join(f"``{r['command']}`` {r['wall_minutes']:.1f} min" for r in results.get("runs", [])) + ".")
    write_text(GENERATED / "resnet_candidates.inc", meta + "\n\n" + table(results) + "\n" + findings(results))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.tables_only:
        write_tables(read_json(OUTPUT))
        return
    setup_torch(args.threads)
    command = " ".join(["python benchmarks/resnet_candidates.py", *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    results = read_json(OUTPUT) if OUTPUT.exists() else {"families": {}}
    for family in args.families.split(","):
        fam = results["families"].get(family, {"label": FAMILIES[family].label, "pairs": {}})
        for pair in args.pairs.split(","):
            seeds = [int(s) for s in pair.split("+")]
            models, data = load_base_models(family, seeds)
            tick = time.perf_counter()
            if args.missing and pair in fam["pairs"]:
                entry = fam["pairs"][pair]
                if "cca_pre_and_post_relu" in entry:
                    continue
                entry.update(run_pre_and_post_relu(models, data))
                entry["seconds"] = round(entry["seconds"] + time.perf_counter() - tick, 1)
            else:
                entry = run_pair(models, data)
                entry["seconds"] = round(time.perf_counter() - tick, 1)
            entry["base_mean"] = float(np.mean([accuracy(m, data["test"]) for m in models]))
            fam["pairs"][pair] = entry
            print(f"{family} {pair}: " + ", ".join(f"{k} {100 * entry[k]:.2f}" for k, _ in COLUMNS)
                  + f" ({entry['seconds']} s)", flush=True)
            results = update_families(OUTPUT, {family: fam}, machine=machine_info())
    # a full run of every pair of every family rewrote every result: the earlier runs describe none
    ran = {(f, p) for f in args.families.split(",") for p in args.pairs.split(",")}
    stored = {(f, p) for f, fam in results["families"].items() for p in fam["pairs"]}
    rewrote_all = not args.missing and stored <= ran
    runs = [] if rewrote_all else [r for r in results.get("runs", []) if r["command"] != command]
    results = update_families(OUTPUT, {}, machine=machine_info(),
                              runs=runs + [{"command": command, "wall_minutes": (time.perf_counter() - start) / 60}])
    write_tables(results)


if __name__ == "__main__":
    main()
