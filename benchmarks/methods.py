"""Every merging method of skmerge on the converged base models.

The base models are the committed checkpoints of ``benchmarks/models/``
(Fashion-MNIST at 28x28, trained by ``benchmarks/base_models.py``; loaded by
``_base_models.load_base_models``). For every family with at least two
checkpoints, every pair of models and all of them together are merged with:

* all-to-one :class:`~skmerge.ModelMerger` with the Identity, Permutation,
  CCA (default ``regularization=0.3``), Procrustes and optimal-transport
  aligners;
* on the transformer families, CCA and Procrustes with the MLPs' hidden
  units permuted (``space_aligners=[("*mlp*", PermutationAligner())]``);
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
are the same 3,000 held-out training images (never trained on); accuracy is
measured on the 10,000 test images. The set of all models is also merged once
per choice of the reference (all-to-one CCA and Permutation, and the
reference-free merger started from each reference) to measure how much the
result depends on it. A method that cannot merge a family records its error
(shown as "n/a" with a footnote).

Run::

    python benchmarks/methods.py                                  # every family (see the run line on the benchmarks page)
    python benchmarks/methods.py --families vgg11-bn-x0.25         # one family; the others' results are kept
    python benchmarks/methods.py --quick                          # smoke run: 200 alignment and test images
    python benchmarks/methods.py --tables-only

Results go to ``benchmarks/results/methods.json``, tables to
``docs/_generated/benchmarks/methods_*`` (included by docs/benchmarks.rst).
"""

from __future__ import annotations

import _common  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)

import argparse  # noqa: E402
import itertools  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from _base_models import FAMILIES, accuracy, available_seeds, load_base_models  # noqa: E402
from _common import (CACHE, GENERATED, RESULTS, log, machine_info, pm, read_json,  # noqa: E402
                     setup_torch, update_families, write_tables)
from skmerge import (CCAAligner, IdentityAligner, ModelMerger, OptimalTransportAligner,  # noqa: E402
                     PermutationAligner, ProcrustesAligner)
from skmerge._statistics_cache import clear_statistics_cache  # noqa: E402
from skmerge.coefficients import LearnedCoefficientMerger  # noqa: E402
from skmerge.hierarchical import hierarchical_merge  # noqa: E402
from skmerge.graph import find_spaces  # noqa: E402
from skmerge.reference_free import ReferenceFreeMerger  # noqa: E402
from skmerge.weight_matching import WeightMatchingMerger  # noqa: E402
from skmerge.zipit import ZipItMerger  # noqa: E402

N_ALIGN = 3000
#: ``space_aligners`` of the "MLP hidden units permuted" methods (families with MLP blocks only).
MLP_PERMUTED = [("*mlp*", PermutationAligner())]

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
    ("cca_mlp_permuted", "CCA, MLP hidden units permuted"),
    ("procrustes_mlp_permuted", "Procrustes, MLP hidden units permuted"),
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
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 200 alignment and test images, the first family, pairs only")
    parser.add_argument("--families", default=None,
                        help="comma-separated (default: every family with two or more checkpoints)")
    parser.add_argument("--methods", default=None, help="comma-separated keys (default: all)")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds of the models to merge (default: every trained one; "
                             "a run of some methods must use the seeds of the records it joins)")
    parser.add_argument("--pairs", type=int, default=None,
                        help="merge only the first PAIRS pairs of models (default: every pair)")
    parser.add_argument("--no-all", action="store_true",
                        help="do not merge all of a family's models together (pairs only)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of the learned coefficients (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--tables-only", action="store_true", help="rebuild the tables from the results JSON")
    args = parser.parse_args(argv)
    available = [f for f in FAMILIES if len(available_seeds(f)) >= 2]
    args.family_names = args.families.split(",") if args.families else available[:1] if args.quick else available
    if unknown := [f for f in args.family_names if f not in available]:
        parser.error(f"families {unknown} have fewer than two checkpoints; trained: {', '.join(available)}")
    keys = [key for key, _ in METHODS]
    args.method_keys = args.methods.split(",") if args.methods else keys
    if unknown := [k for k in args.method_keys if k not in keys]:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(keys)}")
    args.epochs = args.epochs or (1 if args.quick else 5)
    args.n_align = 200 if args.quick else N_ALIGN
    out_root = CACHE / "quick" if args.quick else None
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
    if key.endswith("_mlp_permuted"):  # transformers: the MLPs' hidden units one-to-one
        return ModelMerger(models, aligners[key[:-len("_mlp_permuted")]], **kwargs,
                           space_aligners=MLP_PERMUTED).fit(X).merged_model_
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


def _record(key, chosen, X, y, test, args, reference: int = 0) -> dict:
    """One merge: its test accuracy and wall time, or the error that stopped it."""
    clear_statistics_cache()  # each merge makes its own pass: the times compare
    start = time.perf_counter()
    try:
        merged = _quiet(lambda: merge(key, chosen, X, y, args, reference=reference))
    except Exception as error:  # recorded and shown as n/a: one method must not stop the others
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    seconds = time.perf_counter() - start
    return {"accuracy": accuracy(merged, test), "seconds": seconds}


def run_family(name: str, args, previous: dict | None, save=lambda out: None) -> dict:
    """Every method on every set of one family's models; ``save(out)`` after each set (a long run
    that is stopped keeps the sets it finished)."""
    seeds = available_seeds(name)
    if getattr(args, "seeds", None):
        wanted = [int(x) for x in str(args.seeds).split(",")]
        if missing := sorted(set(wanted) - set(seeds)):
            raise SystemExit(f"{name}: no checkpoint for seeds {missing}; trained: {seeds}")
        seeds = wanted
    kept = [r for r in (previous or {}).get("records", []) if r["method"] not in args.method_keys]
    if kept and previous.get("seeds") != seeds:
        raise SystemExit(f"{name}: the committed records of the other methods merge seeds {previous.get('seeds')}, "
                         f"this run would merge {seeds}: pass --seeds {','.join(map(str, previous.get('seeds')))} "
                         "(or rerun every method)")
    models, data = load_base_models(name, seeds)
    X, y = (t[:args.n_align] for t in data["heldout"].tensors)
    test = data["test"]
    if args.quick:
        test = TensorDataset(*(t[:200] for t in test.tensors))
    out = {"label": FAMILIES[name].label, "seeds": seeds, "n_align": len(X),
           "base": [accuracy(m, test) for m in models], "records": kept}
    sets = [list(p) for p in itertools.combinations(range(len(models)), 2)][:args.pairs]
    if len(models) > 2 and not (args.quick or args.no_all):
        sets.append(list(range(len(models))))
    for members in sets:
        chosen = [models[i] for i in members]
        n, s = len(members), sum(len(m) == len(members) for m in sets[:sets.index(members)])
        line = []
        for key in args.method_keys:
            record = _record(key, chosen, X, y, test, args)
            out["records"].append({"n_models": n, "set": s, "members": [seeds[i] for i in members],
                                   "method": key, "reference": 0, **record})
            line.append(f"{key} {100 * record['accuracy']:.1f}" if "accuracy" in record else f"{key} n/a")
        log(f"  [{name}] n={n} set {s}: " + ", ".join(line))
        save(out)
        if n < 3:
            continue
        for key, _ in BY_REFERENCE:
            if key not in args.method_keys:
                continue
            accs = []
            for reference in range(1, n):
                record = _record(key, chosen, X, y, test, args, reference=reference)
                record.pop("seconds", None)
                out["records"].append({"n_models": n, "set": s, "members": [seeds[i] for i in members],
                                       "method": key, "reference": reference, **record})
                accs.append(f"{100 * record['accuracy']:.1f}" if "accuracy" in record else "n/a")
            log(f"  [{name}] n={n} {key} other references: " + ", ".join(accs))
        save(out)
    return out


def _cell(records, errors: list) -> str:
    """``mean ± std`` of the records' accuracies; ``n/a [k]`` when a merge failed (footnote k)."""
    failed = [r["error"] for r in records if "error" in r]
    if failed:
        if failed[0] not in errors:
            errors.append(failed[0])
        return f"n/a [{errors.index(failed[0]) + 1}]"
    return pm([r["accuracy"] for r in records]) if records else "-"


def make_tables(results: dict) -> dict:
    tables = {}
    for name, fam in results["families"].items():
        records = fam["records"]
        ns = sorted({r["n_models"] for r in records})
        errors: list = []
        rows = [["base models (mean)"] + [f"{100 * np.mean(fam['base']):.1f}"] * len(ns) + ["-"]]
        for key, label in METHODS:
            mine = [r for r in records if r["method"] == key and r["reference"] == 0]
            if not mine:
                continue
            row = [label] + [_cell([r for r in mine if r["n_models"] == n], errors) for n in ns]
            seconds = [r["seconds"] for r in mine if "seconds" in r]
            row.append(f"{np.mean(seconds):.1f}" if seconds else "-")
            rows.append(row)
        sets = {n: len({r["set"] for r in records if r["n_models"] == n}) for n in ns}
        header = ["method"] + [f"{n} models, {sets[n]} set{'s' * (sets[n] > 1)} (%)" for n in ns] + \
            ["merge time (s)"]
        notes = "".join(f"; [{i + 1}] {e}" for i, e in enumerate(errors))
        tables[f"methods_{name}"] = (f"{fam['label']} (seeds {', '.join(map(str, fam['seeds']))}): test "
                                     f"accuracy, mean ± std over model sets{notes}", header, rows)
        big = [n for n in ns if n >= 3]
        if big:
            n = big[0]
            ref_rows = []
            for key, label in BY_REFERENCE:
                accs = [100 * r["accuracy"] for r in records
                        if r["method"] == key and r["n_models"] == n and r["set"] == 0 and "accuracy" in r]
                if accs:
                    ref_rows.append([label, f"{np.mean(accs):.1f}", f"{min(accs):.1f}", f"{max(accs):.1f}",
                                     f"{max(accs) - min(accs):.1f}"])
            tables[f"methods_{name}_references"] = (
                f"{fam['label']}, {n} models: test accuracy (%) over the {n} choices of "
                "the reference (the starting point of the reference-free merger)",
                ["method", "mean", "min", "max", "max - min"], ref_rows)
    return tables


#: (option, the method it is added to) pairs the findings compare.
ADDED = [("permutation_repair", "permutation"), ("cca_repair", "cca"), ("cca_learned", "cca"),
         ("permutation_fisher", "permutation"), ("permutation_regmean", "permutation"),
         ("cca_fisher", "cca"), ("cca_regmean", "cca"), ("reference_free_cca", "cca"),
         ("reference_free_permutation", "permutation"), ("zipit", "permutation")]


def _means(records: list, n: int) -> dict:
    """Mean test accuracy per method over the sets of ``n`` models (methods that never failed)."""
    out = {}
    for key, _ in METHODS:
        mine = [r for r in records if r["method"] == key and r["n_models"] == n and r["reference"] == 0]
        if mine and all("accuracy" in r for r in mine):
            out[key] = float(np.mean([r["accuracy"] for r in mine]))
    return out


def findings(results: dict) -> str:
    """Where each method wins and where it does not, in words computed from the results."""
    labels = dict(METHODS)
    lines = ["What the tables show (generated from the results; means over the sets of models, "
             "so differences of a point are within the spread between sets):", ""]
    for fam in results["families"].values():
        for n in sorted({r["n_models"] for r in fam["records"]}):
            means = _means(fam["records"], n)
            if not means:
                continue
            order = sorted(means, key=means.get, reverse=True)
            base = float(np.mean(fam["base"]))
            top = ", ".join(f"{labels[k]} {100 * means[k]:.1f}" for k in order[:3])
            single = [k for k in order if k not in ("zipit_half",)]  # one model, not a multi-head one
            lines.append(f"* {fam['label']}, {n} models (base models {100 * base:.1f}): best {top}; "
                         f"the best single merged model ({labels[single[0]]}) keeps "
                         f"{100 * means[single[0]] / base:.0f} % of the base accuracy. "
                         f"CCA {100 * means.get('cca', float('nan')):.1f} against permutation "
                         f"{100 * means.get('permutation', float('nan')):.1f}.")
    for option, start in ADDED:
        gains = []
        for fam in results["families"].values():
            for n in sorted({r["n_models"] for r in fam["records"]}):
                means = _means(fam["records"], n)
                if option in means and start in means:
                    gains.append((fam["label"], n, 100 * (means[option] - means[start])))
        if gains:
            better = sum(round(g, 1) > 0 for _, _, g in gains)  # as printed: +0.0 is not better
            lines.append(f"* {labels[option]} against {labels[start]}: better in {better} of {len(gains)} "
                         "settings (" + "; ".join(f"{label} {n} models {g:+.1f}" for label, n, g in gains)
                         + " points).")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, args) -> None:
    from _common import machine_line, write_text

    write_tables(results, make_tables(results), args.docs_dir, "methods")
    lines = []  # one line per family: the runs may differ
    for fam in results["families"].values():
        for run in fam["runs"]:
            lines.append(f"{fam['label']}: ``{run['command']}``, {run['wall_seconds'] / 60:.1f} min; "
                         f"{machine_line(run['machine'])}")
    write_text(args.docs_dir / "methods_meta.inc", "Runs (machine shared with other jobs):\n\n" +
               "\n".join(f"- {line}" for line in lines) + "\n")
    write_text(args.docs_dir / "methods_findings.inc", findings(results))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tables_only:
        results = read_json(args.output)
        write_outputs(results, args)
        return results
    setup_torch(args.threads)
    start = time.perf_counter()
    previous = read_json(args.output) if args.output.exists() else {}
    command = " ".join(["python"] + sys.argv)
    fields = {"machine": machine_info("cpu"), "command": command,
              "config": {"n_align": args.n_align, "epochs": args.epochs, "n_test": 200 if args.quick else 10000}}
    results = previous
    for name in args.family_names:
        log(f"[{name}]")
        machine, tick = machine_info("cpu"), time.perf_counter()
        earlier = previous.get("families", {}).get(name, {}).get("runs", [])

        def save(out, name=name, machine=machine, tick=tick, earlier=earlier):
            nonlocal results
            kept = {r["method"] for r in out["records"]} - set(args.method_keys)
            out["runs"] = [r for r in earlier if set(r["methods"]) & kept] + [
                {"command": command, "machine": machine, "methods": args.method_keys,
                 "wall_seconds": round(time.perf_counter() - tick, 1)}]
            results = update_families(args.output, {name: out}, order=FAMILIES, **fields,
                                      wall_seconds=time.perf_counter() - start)

        save(run_family(name, args, previous.get("families", {}).get(name), save))
    write_outputs(results, args)
    log(f"wrote {args.output} in {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
