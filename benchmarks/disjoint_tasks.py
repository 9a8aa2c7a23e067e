"""Merging models trained on different tasks: disjoint class subsets of Fashion-MNIST.

The training images are cut by class into 2 and into 4 tasks
(:func:`skmerge.datasets.split_disjoint_classes`, classes shuffled with seed
0: 5 + 5, and 3 + 3 + 2 + 2 classes); one model per task is trained on its
task's images only (a 10-way output layer, trained on its own classes). The
models are then merged with

* all-to-one :class:`~skmerge.ModelMerger`: Identity (plain averaging),
  Permutation and CCA, and Permutation and CCA followed by Fisher-weighted
  averaging or RegMean (``combine=``);
* :class:`~skmerge.zipit.ZipItMerger` (ZipIt!), fully zipped (with the
  default ``beta=1`` and with ``beta=0.125``, the reference implementation's
  default), and zipped up to the middle feature space (a multi-head model:
  the later layers are each model's own, and its output is the mean of the
  heads' logits);

next to each base model alone and the ensemble of all of them (mean of their
softmax outputs, every model run: the upper bound). The alignment data are
held-out training images of *all* classes. Scores on the test images
(:func:`skmerge.tasks.task_accuracies`): the **joint** accuracy (argmax over
all 10 classes) and the **per-task** accuracy (on each task's images, argmax
over that task's classes; mean over the tasks). Every merge starts without
the statistics kept from the previous one, so that each merge time includes
all of its passes.

Run::

    python benchmarks/disjoint_tasks.py --threads 1   # about 15 min on 1 thread of a shared CPU
    python benchmarks/disjoint_tasks.py --quick       # smoke run on digits, about 1 min
    python benchmarks/disjoint_tasks.py --tables-only

Results go to ``benchmarks/results/disjoint_tasks.json``, tables to
``docs/_generated/benchmarks/disjoint_tasks_*`` (included by
docs/benchmarks.rst and the user guide).
"""

from __future__ import annotations

import _common  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import accuracy  # noqa: E402
import methods  # noqa: E402
from _common import (CACHE, GENERATED, RESULTS, load_benchmark_data, log, machine_info,  # noqa: E402
                     read_json, setup_torch, write_json, write_tables)
from skmerge._statistics_cache import clear_statistics_cache  # noqa: E402
from skmerge.datasets import split_disjoint_classes  # noqa: E402
from skmerge.tasks import task_accuracies  # noqa: E402
from skmerge.training import predict_logits  # noqa: E402

FAMILIES = {
    "mlp": accuracy.Family("MLP 2x512", "mlp", {"hidden": (512, 512)}, epochs=10, n_align=2000),
    "vgg11-x0.25": accuracy.Family("VGG11 x1/4", "vgg11", {"width": 0.25}, epochs=6, n_align=2000),
}
QUICK_FAMILIES = {
    "mlp": accuracy.Family("MLP 2x64", "mlp", {"hidden": (64, 64)}, epochs=20, n_align=300),
}

#: (key, label) in table order; keys of benchmarks/methods.py's merge().
METHODS = [
    ("identity", "Identity (plain averaging)"),
    ("permutation", "Permutation"),
    ("permutation_fisher", "Permutation + Fisher"),
    ("permutation_regmean", "Permutation + RegMean"),
    ("cca", "CCA"),
    ("cca_fisher", "CCA + Fisher"),
    ("cca_regmean", "CCA + RegMean"),
    ("zipit", "ZipIt!"),
    ("zipit_beta0.125", "ZipIt!, beta=0.125 (the reference implementation's default)"),
    ("zipit_half", "ZipIt!, zipped up to the middle (multi-head)"),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run on digits (about 1 min)")
    parser.add_argument("--n-models", default="2,4", help="numbers of tasks / models (default 2,4)")
    parser.add_argument("--families", default=None, help=f"default {','.join(FAMILIES)}")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--tables-only", action="store_true", help="rebuild the tables from the results JSON")
    args = parser.parse_args(argv)
    q = args.quick
    registry = QUICK_FAMILIES if q else FAMILIES
    args.family_specs = {n: registry[n] for n in (args.families.split(",") if args.families else registry)}
    args.n_models = [int(n) for n in args.n_models.split(",")]
    # the data and cache settings of accuracy.py's helpers (checkpoints are cached per task)
    args.dataset = "digits" if q else "fashion-mnist"
    args.n_train, args.n_heldout, args.n_test = (1000, 300, 599) if q else (10000, 2000, 2000)
    args.image_size = 8 if q else 14
    args.seed, args.augment, args.epochs_scale, args.cache_dir = 0, None, 1.0, CACHE
    out_root = CACHE / "quick" if q else None
    args.output = (out_root or RESULTS) / "disjoint_tasks.json"
    args.docs_dir = out_root or GENERATED
    return args


def _scores(logits: torch.Tensor, labels: torch.Tensor, tasks) -> dict:
    result = task_accuracies(logits, labels, tasks)
    return {"joint": result["joint"], "task_mean": result["task_mean"], "per_task": result["per_task"]}


def run_family(name: str, family, data: dict, args) -> dict:
    info, train, test = data["info"], data["train"], data["test"]
    labels = test.tensors[1]
    X, y = (t[:family.n_align] for t in data["heldout"].tensors)
    out = {"label": family.label, "n_align": family.n_align, "records": [], "models": {}}
    for n in args.n_models:
        subsets = split_disjoint_classes(train, n, seed=0)
        tasks = [list(map(int, s.classes)) for s in subsets]
        models, meta = accuracy.trained_models(name, family, subsets, [100 * n + k for k in range(n)],
                                               f"disjoint{n}", args, info)
        logits = [predict_logits(m, test) for m in models]
        own = [task_accuracies(l, labels, tasks)["per_task"][k] for k, l in enumerate(logits)]
        out["models"][str(n)] = {"tasks": tasks, "models": meta,
                                 "joint": [_scores(l, labels, tasks)["joint"] for l in logits],
                                 "own_task": own}
        record = {"n_models": n, "tasks": tasks}
        joint = out["models"][str(n)]["joint"]
        out["records"].append({**record, "method": "base", "joint": float(np.mean(joint)),
                               "task_mean": float(np.mean(own))})
        probabilities = sum(l.softmax(1) for l in logits) / n
        out["records"].append({**record, "method": "ensemble", **_scores(probabilities, labels, tasks)})
        line = []
        for key, _ in METHODS:
            clear_statistics_cache()  # every merge makes its own passes: honest merge times
            start = time.perf_counter()
            merged = methods._quiet(lambda: methods.merge(key, models, X, y, args))
            seconds = time.perf_counter() - start
            scores = _scores(predict_logits(merged, test), labels, tasks)
            out["records"].append({**record, "method": key, "seconds": seconds, **scores})
            line.append(f"{key} {100 * scores['joint']:.1f}/{100 * scores['task_mean']:.1f}")
        log(f"  [{name}] {n} tasks {tasks}: " + ", ".join(line))
    return out


LABELS = dict([("base", "Base model alone (own task)"), ("ensemble", "Ensemble (every model run)")] + METHODS)


def make_tables(results: dict) -> dict:
    tables = {}
    for name, fam in results["families"].items():
        ns = sorted({r["n_models"] for r in fam["records"]})
        rows = []
        for key in ["base", "ensemble"] + [k for k, _ in METHODS]:
            row = [LABELS[key]]
            for n in ns:
                found = [r for r in fam["records"] if r["method"] == key and r["n_models"] == n]
                row += ([f"{100 * found[0]['joint']:.1f}", f"{100 * found[0]['task_mean']:.1f}"] if found
                        else ["-", "-"])
            seconds = [r["seconds"] for r in fam["records"] if r["method"] == key and "seconds" in r]
            row.append(f"{np.mean(seconds):.1f}" if seconds else "-")
            rows.append(row)
        header = ["method"] + [f"{n} tasks: {what} (%)" for n in ns for what in ("joint", "per-task")] + [
            "merge time (s)"]
        tables[f"disjoint_tasks_{name}"] = (
            f"{fam['label']}: test accuracy of models trained on disjoint classes, joint (all 10 classes) "
            "and per task (within each task's classes, mean over the tasks)", header, rows)
    return tables


MERGES = [k for k, _ in METHODS]
ZIPIT = ("zipit", "zipit_half")


def _settings(results: dict):
    """``(label, n, {method: record})`` per family and number of tasks."""
    for fam in results["families"].values():
        for n in sorted({r["n_models"] for r in fam["records"]}):
            yield fam["label"], n, {r["method"]: r for r in fam["records"] if r["n_models"] == n}


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def _changes(settings, base: str, option: str, what: str) -> tuple[int, list]:
    """How often ``option`` beats ``base`` on ``what``, and every change in words."""
    better, changes = 0, []
    for label, n, rec in settings:
        if base in rec and option in rec:
            a, b = rec[base][what], rec[option][what]
            better += b > a
            changes.append(f"{label} {n} tasks {100 * a:.1f} to {100 * b:.1f}")
    return better, changes


def findings(results: dict) -> str:
    """What the tables show, in words computed from the results (written to ``*_findings.inc``)."""
    settings = list(_settings(results))
    lines = ["What these runs show (generated from the results; one class split and one trained model "
             "per task, so differences of a few points are within what another split or seed could "
             "change):", ""]
    best_zipit = 0
    for label, n, rec in settings:
        merges = {k: rec[k] for k in MERGES if k in rec}
        joint = max(merges, key=lambda k: merges[k]["joint"])
        task = max(merges, key=lambda k: merges[k]["task_mean"])
        best_zipit += joint in ZIPIT
        ensemble = rec["ensemble"]["joint"]
        reach = "above" if merges[joint]["joint"] > ensemble else "below"
        lines.append(f"* {label}, {n} tasks: best joint accuracy {LABELS[joint]} "
                     f"{_pct(merges[joint]['joint'])} ({reach} the ensemble's {_pct(ensemble)}); best "
                     f"per-task accuracy {LABELS[task]} {_pct(merges[task]['task_mean'])} (the models "
                     f"alone: {_pct(rec['base']['task_mean'])}).")
    lines.append(f"* ZipIt! (full or zipped up to the middle) has the best joint accuracy of the merges "
                 f"in {best_zipit} of the {len(settings)} settings.")
    better, changes = _changes(settings, "zipit_beta0.125", "zipit", "joint")
    lines.append(f"* ``beta=1`` (skmerge's default) against ``beta=0.125`` (the reference "
                 f"implementation's), joint accuracy: better in {better} of {len(changes)} settings "
                 f"({'; '.join(changes)}).")
    for option, name in (("fisher", "Fisher weighting"), ("regmean", "RegMean")):
        for base in ("permutation", "cca"):
            for what, word in (("joint", "joint"), ("task_mean", "per-task")):
                better, changes = _changes(settings, base, f"{base}_{option}", what)
                lines.append(f"* {name} after {base.upper() if base == 'cca' else 'Permutation'}, "
                             f"{word} accuracy: higher in {better} of {len(changes)} settings "
                             f"({'; '.join(changes)}).")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, args) -> None:
    from _common import write_text

    write_tables(results, make_tables(results), args.docs_dir, "disjoint_tasks")
    write_text(args.docs_dir / "disjoint_tasks_findings.inc", findings(results))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tables_only:
        results = read_json(args.output)
        write_outputs(results, args)
        return results
    setup_torch(args.threads)
    start = time.perf_counter()
    data = load_benchmark_data(args.dataset, n_train=args.n_train, n_heldout=args.n_heldout,
                               n_test=args.n_test, image_size=args.image_size, seed=args.seed)
    results = {"machine": machine_info("cpu"), "command": " ".join(["python"] + sys.argv),
               "config": {"dataset": args.dataset, "image_size": args.image_size, "n_train": args.n_train,
                          "n_heldout": args.n_heldout, "n_test": args.n_test, "n_models": args.n_models,
                          "class_split_seed": 0, "quick": args.quick},
               "families": {}}
    for name, family in args.family_specs.items():
        log(f"[{name}] {family.label}")
        results["families"][name] = run_family(name, family, data, args)
        results["wall_seconds"] = time.perf_counter() - start
        write_json(args.output, results)
    write_outputs(results, args)
    log(f"wrote {args.output} in {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
