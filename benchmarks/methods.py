"""Every merging method of skmerge on the Fashion-MNIST benchmark models.

Reuses the base models of ``benchmarks/accuracy.py`` (same data subsets, same
cached checkpoints under ``benchmarks/cache/``; missing ones are trained the
same way) and merges 2 and 5 of them with:

* all-to-one :class:`~skmerge.ModelMerger` with the Identity, Permutation,
  CCA (default ``regularization=0.3``), Procrustes and optimal-transport
  aligners;
* the same merger with ``repair=True`` (REPAIR after the BatchNorm reset) for
  Permutation and CCA;
* :class:`~skmerge.weight_matching.WeightMatchingMerger` (data-free weight
  matching; the data only re-estimates BatchNorm statistics);
* :func:`~skmerge.hierarchical.hierarchical_merge` with CCA;
* :class:`~skmerge.reference_free.ReferenceFreeMerger` with Permutation and
  CCA;
* :class:`~skmerge.coefficients.LearnedCoefficientMerger` on top of the CCA
  merge (per-tensor coefficients);
* Fisher-weighted averaging and RegMean after the Permutation and CCA
  alignments (``ModelMerger(combine="fisher" / "regmean")``);
* :class:`~skmerge.zipit.ZipItMerger` (ZipIt!), fully zipped and zipped up to
  the middle feature space (``stop_at``: the later layers kept per model, a
  multi-head model whose output averages the heads' logits).

Alignment data, REPAIR statistics and the learned coefficients' training data
are the same held-out *training* images (``n_align`` per family, as in
accuracy.py); accuracy is measured on the 2000 test images. For 5 models the
script also merges each set once per choice of the reference (all-to-one CCA
and Permutation, and the reference-free merger started from each reference)
to measure how much the result depends on it.

Run::

    python benchmarks/methods.py              # about 15-25 min on 2 cores with cached models
    python benchmarks/methods.py --quick      # smoke run on digits, about 1 min
    python benchmarks/methods.py --tables-only

Results go to ``benchmarks/results/methods.json``, tables to
``docs/_generated/benchmarks/methods_*`` (included by docs/benchmarks.rst).
"""

from __future__ import annotations

import _common  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

import accuracy  # noqa: E402
from _common import (CACHE, GENERATED, RESULTS, log, machine_info, pm, read_json,  # noqa: E402
                     setup_torch, write_json, write_tables)
from skmerge import (CCAAligner, IdentityAligner, ModelMerger, OptimalTransportAligner,  # noqa: E402
                     PermutationAligner, ProcrustesAligner)
from skmerge.coefficients import LearnedCoefficientMerger  # noqa: E402
from skmerge.hierarchical import hierarchical_merge  # noqa: E402
from skmerge.graph import find_spaces  # noqa: E402
from skmerge.reference_free import ReferenceFreeMerger  # noqa: E402
from skmerge.training import predict_logits  # noqa: E402
from skmerge.weight_matching import WeightMatchingMerger  # noqa: E402
from skmerge.zipit import ZipItMerger  # noqa: E402

FAMILIES = ["mlp", "vgg11-x0.25", "resnet20-x1"]
QUICK_FAMILIES = ["mlp", "vgg11-x0.125"]

#: (key, label) in table order.
METHODS = [
    ("identity", "Identity"),
    ("permutation", "Permutation"),
    ("permutation_repair", "Permutation + REPAIR"),
    ("weight_matching", "Weight matching (no data)"),
    ("ot", "Optimal transport"),
    ("reference_free_permutation", "Reference-free Permutation"),
    ("cca", "CCA"),
    ("cca_repair", "CCA + REPAIR"),
    ("procrustes", "Procrustes"),
    ("hierarchical_cca", "Hierarchical CCA"),
    ("reference_free_cca", "Reference-free CCA"),
    ("cca_learned", "CCA + learned coefficients"),
    ("permutation_fisher", "Permutation + Fisher"),
    ("permutation_regmean", "Permutation + RegMean"),
    ("cca_fisher", "CCA + Fisher"),
    ("cca_regmean", "CCA + RegMean"),
    ("zipit", "ZipIt!"),
    ("zipit_half", "ZipIt!, zipped up to the middle (multi-head)"),
]
#: Methods merged once per reference for the 5-model sets.
BY_REFERENCE = [("permutation", "Permutation"), ("cca", "CCA"),
                ("reference_free_permutation", "Reference-free Permutation"),
                ("reference_free_cca", "Reference-free CCA")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run on digits (about 1 min)")
    parser.add_argument("--families", default=None, help=f"default {','.join(FAMILIES)}")
    parser.add_argument("--n-models", default="2,5", help="numbers of merged models (default 2,5)")
    parser.add_argument("--sets", type=int, default=None, help="model sets per number of models (default 3)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of the learned coefficients (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--tables-only", action="store_true", help="rebuild the tables from the results JSON")
    args = parser.parse_args(argv)
    q = args.quick
    args.family_names = args.families.split(",") if args.families else (QUICK_FAMILIES if q else FAMILIES)
    args.sets = args.sets or (1 if q else 3)
    args.epochs = args.epochs or (2 if q else 5)
    args.n_models = [int(n) for n in args.n_models.split(",")]
    # accuracy.py's own settings, so that the cached base models are reused.
    pool = max(args.n_models + [8 if not q else 2])
    args.accuracy = accuracy.parse_args((["--quick"] if q else []) + [
        "--families", ",".join(args.family_names), "--n-models", str(pool), "--threads", str(args.threads)])
    out_root = CACHE / "quick" if q else None
    args.output = (out_root or RESULTS) / "methods.json"
    args.docs_dir = out_root or GENERATED
    return args


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def merge(key: str, models: list, X, y, args, reference: int = 0):
    """The merged model of one method; ``X, y`` are the held-out training images."""
    kwargs = dict(reference=reference, device="cpu")
    aligners = {"identity": IdentityAligner(), "permutation": PermutationAligner(), "cca": CCAAligner(),
                "procrustes": ProcrustesAligner(), "ot": OptimalTransportAligner()}
    if key in aligners:
        return ModelMerger(models, aligners[key], **kwargs).fit(X).merged_model_
    if key.endswith("_repair"):
        return ModelMerger(models, aligners[key[:-len("_repair")]], repair=True, **kwargs).fit(X).merged_model_
    if key == "weight_matching":
        return WeightMatchingMerger(models, example_input=X[:2], random_state=0, **kwargs).fit(X).merged_model_
    if key == "hierarchical_cca":
        return hierarchical_merge(models, X, CCAAligner(), device="cpu")[0]
    if key.startswith("reference_free_"):
        aligner = aligners[key[len("reference_free_"):]]
        return ReferenceFreeMerger(models, aligner, **kwargs).fit(X).merged_model_
    if key == "cca_learned":
        merger = ModelMerger(models, CCAAligner(), **kwargs)
        learner = LearnedCoefficientMerger(merger, n_epochs=args.epochs, random_state=0)
        return learner.fit(X, y).merged_model_
    for suffix in ("_fisher", "_regmean"):
        if key.endswith(suffix):
            aligner = aligners[key[:-len(suffix)]]
            return ModelMerger(models, aligner, combine=suffix[1:], **kwargs).fit(X).merged_model_
    if key == "zipit":
        return ZipItMerger(models, **kwargs).fit(X).merged_model_
    if key.startswith("zipit_beta"):
        return ZipItMerger(models, beta=float(key[len("zipit_beta"):]), **kwargs).fit(X).merged_model_
    if key == "zipit_half":
        stop = len(find_spaces(models[0], X[:2])) // 2 - 1
        return ZipItMerger(models, stop_at=max(stop, 0), **kwargs).fit(X).merged_model_
    raise ValueError(key)


def run_family(name: str, data: dict, args) -> dict:
    acc_args = args.accuracy
    family = acc_args.family_specs[name]
    info, test = data["info"], data["test"]
    labels = test.tensors[1]
    heldout = [t[:family.n_align] for t in data["heldout"].tensors]
    X, y = heldout
    pool = max(acc_args.n_models)
    models, _ = accuracy.trained_models(name, family, [data["train"]] * pool, list(range(pool)), "pool",
                                        acc_args, info)
    out = {"label": family.label, "n_align": family.n_align, "records": []}
    for n in args.n_models:
        for s, members in enumerate(accuracy.model_sets(pool, n, args.sets, acc_args.seed)):
            chosen = [models[i] for i in members]
            line = []
            for key, _ in METHODS:
                start = time.perf_counter()
                merged = _quiet(lambda: merge(key, chosen, X, y, args))
                seconds = time.perf_counter() - start
                acc = accuracy.accuracy_of_logits(predict_logits(merged, test), labels)
                out["records"].append({"n_models": n, "set": s, "members": members, "method": key,
                                       "reference": 0, "accuracy": acc, "seconds": seconds})
                line.append(f"{key} {100 * acc:.1f}")
            log(f"  [{name}] n={n} set {s}: " + ", ".join(line))
            if n < 3 or s > 0:
                continue
            for key, _ in BY_REFERENCE:
                accs = []
                for reference in range(1, n):
                    merged = _quiet(lambda: merge(key, chosen, X, y, args, reference=reference))
                    acc = accuracy.accuracy_of_logits(predict_logits(merged, test), labels)
                    accs.append(acc)
                    out["records"].append({"n_models": n, "set": s, "members": members, "method": key,
                                           "reference": reference, "accuracy": acc})
                log(f"  [{name}] n={n} {key} other references: " + ", ".join(f"{100 * a:.1f}" for a in accs))
    return out


def _cell(values) -> str:
    return pm(values) if values else "-"


def make_tables(results: dict) -> dict:
    tables = {}
    for name, fam in results["families"].items():
        ns = sorted({r["n_models"] for r in fam["records"]})
        rows = []
        for key, label in METHODS:
            row = [label]
            for n in ns:
                row.append(_cell([r["accuracy"] for r in fam["records"]
                                  if r["method"] == key and r["n_models"] == n and r["reference"] == 0]))
            seconds = [r["seconds"] for r in fam["records"] if r["method"] == key and "seconds" in r]
            row.append(f"{np.mean(seconds):.1f}" if seconds else "-")
            rows.append(row)
        header = ["method"] + [f"{n} models (%)" for n in ns] + ["merge time (s)"]
        tables[f"methods_{name}"] = (f"{fam['label']}: test accuracy, mean ± std over model sets",
                                     header, rows)
        big = [n for n in ns if n >= 3]
        if big:
            n = big[0]
            ref_rows = []
            for key, label in BY_REFERENCE:
                accs = [100 * r["accuracy"] for r in fam["records"]
                        if r["method"] == key and r["n_models"] == n and r["set"] == 0]
                if accs:
                    ref_rows.append([label, f"{np.mean(accs):.1f}", f"{min(accs):.1f}", f"{max(accs):.1f}",
                                     f"{max(accs) - min(accs):.1f}"])
            tables[f"methods_{name}_references"] = (
                f"{fam['label']}, {n} models (first set): test accuracy (%) over the {n} choices of "
                "the reference (the starting point of the reference-free merger)",
                ["method", "mean", "min", "max", "max - min"], ref_rows)
    return tables


def write_outputs(results: dict, args) -> None:
    write_tables(results, make_tables(results), args.docs_dir, "methods")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tables_only:
        results = read_json(args.output)
        write_outputs(results, args)
        return results
    setup_torch(args.threads)
    start = time.perf_counter()
    acc_args = args.accuracy
    data = accuracy.benchmark_data(acc_args)
    results = {"machine": machine_info("cpu"), "command": " ".join(["python"] + sys.argv),
               "config": {"n_models": args.n_models, "sets": args.sets, "epochs": args.epochs,
                          "accuracy_config": accuracy.config_of(acc_args)}, "families": {}}
    for name in args.family_names:
        log(f"[{name}]")
        results["families"][name] = run_family(name, data, args)
        results["wall_seconds"] = time.perf_counter() - start
        write_json(args.output, results)
    write_outputs(results, args)
    log(f"wrote {args.output} in {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
