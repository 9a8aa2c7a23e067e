"""Accuracy of merged models: the CCA Merge protocol, scaled to a 2-core CPU.

For every model family (an architecture at one width), the script trains a
pool of base models with different seeds (``skmerge.training.train_models``)
on a stratified subset of the training images, then reports, on held-out test
images:

* the base models' accuracy and their ensemble's (mean of softmax outputs),
* merges with ``IdentityAligner`` (plain averaging), ``PermutationAligner``,
  ``CCAAligner(regularization="auto")`` and ``CCAAligner`` with the
  regularization chosen by ``GridSearchCV`` over ``aligner__regularization``,
  fitted and cross-validated on *held-out training images only* (the
  alignment data), never on test images,
* for 2, 3, 5 and 8 merged models, mean and spread (standard deviation,
  ``ddof=1``) over several random model sets drawn from the pool (with 8
  models the sets differ in the order of the models, so in the reference),
* for 2 models trained on a skewed split of the training data
  (``skmerge.datasets.split_skewed``, 80 % of its own 5 classes and 20 % of
  the other 5 per model).

Trained checkpoints are cached under ``benchmarks/cache/`` (git-ignored), so a
rerun only merges. Results go to ``benchmarks/results/accuracy.json``; the
tables and the figure to ``docs/_generated/benchmarks/`` (included by
``docs/benchmarks.rst``).

Run::

    python benchmarks/accuracy.py                 # Fashion-MNIST, all families
    python benchmarks/accuracy.py --quick         # smoke run on digits, < 1 min
    python benchmarks/accuracy.py --dataset cifar10 --data-root ~/data
    python benchmarks/accuracy.py --families resnet20-x4   # the paper's width

See benchmarks/README.md for run times and what was reduced.
"""

from __future__ import annotations

import _common  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.model_selection import GridSearchCV, StratifiedKFold  # noqa: E402

from _common import (CACHE, GENERATED, RESULTS, load_benchmark_data, log, machine_info,  # noqa: E402
                     machine_line, pm, read_json, rst_table, setup_torch, text_table,
                     write_json, write_text)
from skmerge import CCAAligner, IdentityAligner, ModelMerger, PermutationAligner  # noqa: E402
from skmerge.datasets import split_skewed  # noqa: E402
from skmerge.models import get_model  # noqa: E402
from skmerge.training import load_model, predict_logits, save_checkpoint, train_models  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture at one width, and how its base models are trained."""

    label: str
    model: str
    kwargs: dict
    epochs: int
    n_align: int  # alignment images (a prefix of the held-out training images)
    note: str = ""


#: Every family the script knows; ``DEFAULT_FAMILIES`` are run by default.
FAMILIES = {
    "mlp": Family("MLP 3x512", "mlp", {"hidden": (512, 512, 512)}, epochs=10, n_align=2000),
    "vgg11-x0.25": Family("VGG11 x1/4", "vgg11", {"width": 0.25}, epochs=6, n_align=2000),
    "vgg11-x1": Family("VGG11 x1", "vgg11", {"width": 1}, epochs=3, n_align=2000),
    "vgg11-x2": Family("VGG11 x2", "vgg11", {"width": 2}, epochs=3, n_align=2000),
    "resnet20-x1": Family("ResNet20 x1", "resnet20", {"width": 1}, epochs=5, n_align=1000),
    "resnet20-x2": Family("ResNet20 x2", "resnet20", {"width": 2}, epochs=3, n_align=500),
    "resnet20-x4": Family("ResNet20 x4", "resnet20", {"width": 4}, epochs=3, n_align=500),
}
DEFAULT_FAMILIES = ["mlp", "vgg11-x0.25", "vgg11-x1", "resnet20-x1", "resnet20-x2"]

#: Smoke-test families (digits, tiny widths, 1-2 epochs).
QUICK_FAMILIES = {
    "mlp": Family("MLP 2x64", "mlp", {"hidden": (64, 64)}, epochs=20, n_align=300),
    "vgg11-x0.125": Family("VGG11 x1/8", "vgg11", {"width": 0.125}, epochs=5, n_align=300),
    "resnet20-x0.5": Family("ResNet20 x1/2", "resnet20", {"width": 0.5}, epochs=3, n_align=300),
}

ALIGNERS = ["identity", "permutation", "cca_auto", "cca_default", "cca_cv"]
LABELS = {"base": "base models (mean)", "ensemble": "ensemble", "identity": "Identity",
          "permutation": "Permutation", "cca_auto": "CCA auto (OAS)", "cca_default": "CCA default",
          "cca_cv": "CCA (GridSearchCV)"}
COLUMNS = ["base", "ensemble"] + ALIGNERS


def _default_regularization():
    return CCAAligner().get_params()["regularization"]


def labels_for(results: dict) -> dict:
    """Column labels; the CCA default names the regularization it had in that run."""
    labels = dict(LABELS)
    default = results["config"].get("cca_default")
    if default is not None:
        labels["cca_default"] = f"CCA default (r={default})"
    return labels


def columns_for(results: dict) -> list[str]:
    """Columns present in a results file (older files have no cca_default)."""
    present = {r["aligner"] for fam in results["families"].values() for r in fam["records"]}
    return [c for c in COLUMNS if c in present or c in ("base", "ensemble")]


# --------------------------------------------------------------------------
# configuration


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (digits, tiny models, < 1 min); writes under benchmarks/cache/quick")
    parser.add_argument("--dataset", default=None, help="fashion-mnist (default), cifar10, cifar100, digits")
    parser.add_argument("--data-root", default=None, help="folder of the data set files")
    parser.add_argument("--families", default=None,
                        help=f"comma-separated, from {', '.join(FAMILIES)} (default: {','.join(DEFAULT_FAMILIES)})")
    parser.add_argument("--n-models", default=None, help="numbers of merged models (default 2,3,5,8)")
    parser.add_argument("--sets", type=int, default=None, help="model sets per number of models (default 3)")
    parser.add_argument("--n-train", type=int, default=None, help="training images per model (default 5000)")
    parser.add_argument("--n-heldout", type=int, default=None,
                        help="held-out training images: alignment and cross-validation data (default 2000)")
    parser.add_argument("--n-test", type=int, default=None, help="test images (default 2000)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize images to this size (default: half the native size)")
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every family's epochs")
    parser.add_argument("--augment", default=None, help="training augmentation (crop, flip, crop_flip)")
    parser.add_argument("--grid", default=None, help="CCA regularization grid (default 0.01,0.1,0.3,1)")
    parser.add_argument("--cv", type=int, default=None, help="GridSearchCV folds (default 2)")
    parser.add_argument("--cv-sets", type=int, default=None,
                        help="model sets per number of models on which GridSearchCV runs; the other sets "
                             "reuse the value chosen on the first (default 1)")
    parser.add_argument("--no-skewed", action="store_true", help="skip the skewed-split experiment")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="data subset seed")
    parser.add_argument("--output", default=None, help="results JSON (default benchmarks/results/accuracy[_DATASET].json)")
    parser.add_argument("--docs-dir", default=None, help="where tables and figure go (default docs/_generated/benchmarks)")
    parser.add_argument("--cache-dir", default=None, help="checkpoint cache (default benchmarks/cache)")
    parser.add_argument("--train-only", action="store_true", help="train (and cache) the base models, then stop")
    parser.add_argument("--tables-only", action="store_true",
                        help="regenerate tables and figure from the results JSON, without running anything")
    args = parser.parse_args(argv)

    quick = args.quick
    defaults = dict(dataset="digits" if quick else "fashion-mnist", n_models="2,3" if quick else "2,3,5,8",
                    sets=1 if quick else 3, n_train=600 if quick else 5000,
                    n_heldout=300 if quick else 2000, n_test=599 if quick else 2000,
                    grid="0.1,1" if quick else "0.01,0.1,0.3,1", cv=2, cv_sets=1)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    registry = QUICK_FAMILIES if quick else FAMILIES
    names = args.families.split(",") if args.families else list(registry if quick else DEFAULT_FAMILIES)
    unknown = [n for n in names if n not in registry]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(registry)}")
    args.family_specs = {n: registry[n] for n in names}
    args.n_models = [int(n) for n in str(args.n_models).split(",")]
    args.grid = [float(r) for r in str(args.grid).split(",")]
    suffix = "" if args.dataset == "fashion-mnist" else "_" + args.dataset.replace("-", "")
    out_root = CACHE / "quick" if quick else None
    args.output = Path(args.output) if args.output else (
        (out_root or RESULTS) / f"accuracy{suffix}.json")
    args.docs_dir = Path(args.docs_dir) if args.docs_dir else (out_root or GENERATED)
    args.doc_prefix = "accuracy" + suffix
    args.cache_dir = Path(args.cache_dir) if args.cache_dir else CACHE
    return args


def benchmark_data(args) -> dict:
    """The train / held-out / test subsets of the run (sets ``args.image_size`` when None)."""
    from skmerge.datasets import dataset_info

    native = dataset_info(args.dataset)["image_size"]
    if args.image_size is None:
        args.image_size = native if args.quick else native // 2
    return load_benchmark_data(args.dataset, n_train=args.n_train, n_heldout=args.n_heldout,
                               n_test=args.n_test, image_size=args.image_size, seed=args.seed,
                               root=args.data_root)


def config_of(args) -> dict:
    return {"dataset": args.dataset, "image_size": args.image_size, "n_train": args.n_train,
            "n_heldout": args.n_heldout, "n_test": args.n_test, "n_models": args.n_models,
            "sets": args.sets, "grid": args.grid, "cv": args.cv, "cv_sets": args.cv_sets,
            "epochs_scale": args.epochs_scale, "augment": args.augment, "seed": args.seed,
            "skewed": not args.no_skewed, "quick": args.quick, "threads": args.threads,
            "cca_default": _default_regularization()}


# --------------------------------------------------------------------------
# base models (cached)


def _epochs(family: Family, args) -> int:
    return max(1, int(round(family.epochs * args.epochs_scale)))


def _model_kwargs(family: Family, info: dict) -> dict:
    kwargs = dict(in_channels=info["in_channels"], num_classes=info["num_classes"],
                  image_size=info["image_size"])
    kwargs.update(family.kwargs)
    if isinstance(kwargs.get("hidden"), tuple):
        kwargs["hidden"] = list(kwargs["hidden"])
    return kwargs


def _cache_folder(name: str, family: Family, args, info: dict) -> Path:
    key = {"model": family.model, "kwargs": _model_kwargs(family, info), "epochs": _epochs(family, args),
           "dataset": info["dataset"], "image_size": info["image_size"], "n_train": args.n_train,
           "n_heldout": args.n_heldout, "seed": args.seed, "augment": args.augment, "batch_size": 128}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return args.cache_dir / "models" / f"{info['dataset']}-{name}-{digest}"


def trained_models(name: str, family: Family, datasets: list, seeds: list[int], tag: str,
                   args, info: dict) -> tuple[list, list[dict]]:
    """Load the cached checkpoint of every seed, training those that are missing."""
    folder = _cache_folder(name, family, args, info)
    models, meta = [], []
    for seed, dataset in zip(seeds, datasets):
        path = folder / f"{tag}-seed{seed}.pt"
        if path.exists():
            model, metadata = load_model(path)
        else:
            start = time.perf_counter()
            kwargs = _model_kwargs(family, info)
            (model,) = train_models(lambda: get_model(family.model, **kwargs), [dataset], 1, seeds=[seed],
                                    epochs=_epochs(family, args), batch_size=128, augment=args.augment)
            seconds = time.perf_counter() - start
            metadata = {"seed": seed, "train_seconds": seconds, "n_train": len(dataset),
                        "epochs": _epochs(family, args), "tag": tag}
            save_checkpoint(model, path, **metadata)
            metadata["trained_now"] = True
            log(f"  trained {name} {tag} seed {seed} on {len(dataset)} images in {seconds:.1f} s")
        models.append(model.eval())
        meta.append({k: metadata.get(k) for k in ("seed", "train_seconds", "n_train", "epochs", "tag")})
        meta[-1]["trained_now"] = bool(metadata.get("trained_now", False))
    return models, meta


# --------------------------------------------------------------------------
# merging


def accuracy_of_logits(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def ensemble_of_logits(logits: list[torch.Tensor], labels: torch.Tensor) -> float:
    """Same rule as skmerge.training.ensemble_accuracy: argmax of the mean softmax."""
    probs = sum(l.softmax(1) for l in logits)
    return float((probs.argmax(1) == labels).float().mean())


def model_sets(pool: int, n: int, count: int, seed: int) -> list[list[int]]:
    """``count`` distinct ordered model sets of size ``n``; the first model is the reference."""
    rng = np.random.default_rng(1000 * n + seed)
    seen, sets = set(), []
    for _ in range(1000):
        order = [int(i) for i in rng.permutation(pool)[:n]]
        key = (order[0], frozenset(order))
        if key not in seen:
            seen.add(key)
            sets.append(order)
        if len(sets) == count:
            break
    return sets


def _fit(models, aligner, X_align) -> tuple[ModelMerger, float, list[str]]:
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merger = ModelMerger(models, aligner, device="cpu").fit(X_align)
    messages = sorted({f"{w.category.__name__}" for w in caught})
    return merger, time.perf_counter() - start, messages


def _auto_intensity(merger: ModelMerger) -> list[float]:
    values = []
    for row in merger.aligners_:
        for aligner in row:
            r = getattr(aligner, "regularization_", None)
            if r is not None:
                values.extend(float(v) for v in r)
    return values


def grid_search(models, heldout, args) -> tuple[float, dict]:
    """GridSearchCV over CCAAligner's regularization on the held-out training images."""
    X, y = heldout.tensors
    start = time.perf_counter()
    search = GridSearchCV(ModelMerger(models, CCAAligner(), device="cpu"),
                          {"aligner__regularization": args.grid},
                          cv=StratifiedKFold(args.cv, shuffle=True, random_state=args.seed),
                          error_score="raise", refit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        search.fit(X.numpy(), y.numpy())
    best = float(search.best_params_["aligner__regularization"])
    info = {"best": best, "seconds": time.perf_counter() - start,
            "cv_scores": {str(r): float(s) for r, s in zip(args.grid, search.cv_results_["mean_test_score"])}}
    return best, info, search.best_estimator_


def merge_set(models, members, heldout, test_labels, test, logits, args, record, chosen=None):
    """All merges of one model set; returns the regularization chosen by GridSearchCV."""
    chosen_models = [models[i] for i in members]
    X_align = heldout.tensors[0]
    record("base", float(np.mean([accuracy_of_logits(logits[i], test_labels) for i in members])))
    record("ensemble", ensemble_of_logits([logits[i] for i in members], test_labels))
    for key, aligner in [("identity", IdentityAligner()), ("permutation", PermutationAligner()),
                         ("cca_auto", CCAAligner(regularization="auto")), ("cca_default", CCAAligner())]:
        merger, seconds, caught = _fit(chosen_models, aligner, X_align)
        extra = {"fit_seconds": seconds, "warnings": caught}
        if key == "cca_auto":
            values = _auto_intensity(merger)
            extra["auto_regularization"] = {"mean": float(np.mean(values)), "min": float(np.min(values)),
                                            "max": float(np.max(values))}
        record(key, accuracy_of_logits(predict_logits(merger.merged_model_, test), test_labels), **extra)
    search_info = None
    if chosen is None:
        chosen, search_info, best = grid_search(chosen_models, heldout, args)
        merged = best.merged_model_
        extra = {"grid_search": search_info}
    else:
        merger, seconds, caught = _fit(chosen_models, CCAAligner(regularization=chosen), X_align)
        merged = merger.merged_model_
        extra = {"fit_seconds": seconds, "warnings": caught, "reused_from_first_set": True}
    record("cca_cv", accuracy_of_logits(predict_logits(merged, test), test_labels),
           regularization=chosen, **extra)
    return chosen, search_info


def run_family(name: str, family: Family, data: dict, args) -> dict:
    info, train, heldout, test = data["info"], data["train"], data["heldout"], data["test"]
    test_labels = test.tensors[1]
    pool = max(args.n_models)
    heldout_family = torch.utils.data.TensorDataset(*(t[:family.n_align] for t in heldout.tensors))
    log(f"[{name}] {family.label}: training/loading {pool} models")
    start = time.perf_counter()
    models, meta = trained_models(name, family, [train] * pool, list(range(pool)), "pool", args, info)
    logits = [predict_logits(m, test) for m in models]
    for m, l in zip(meta, logits):
        m["accuracy"] = accuracy_of_logits(l, test_labels)
    out = {"label": family.label, "model": family.model, "kwargs": _model_kwargs(family, info),
           "epochs": _epochs(family, args), "n_align": family.n_align,
           "n_parameters": sum(p.numel() for p in models[0].parameters()),
           "models": meta, "records": [], "grid_search": []}
    skewed = None
    if not args.no_skewed:
        parts = split_skewed(train, 2, majority=0.8, seed=args.seed)
        skewed_models, skewed_meta = trained_models(name, family, parts, [100, 101], "skewed", args, info)
        skewed = (skewed_models, skewed_meta, [predict_logits(m, test) for m in skewed_models])
        for m, l, part in zip(skewed_meta, skewed[2], parts):
            m["accuracy"] = accuracy_of_logits(l, test_labels)
            m["majority_classes"] = list(part.classes)
        out["skewed_models"] = skewed_meta
    everything = meta + (skewed[1] if skewed else [])
    out["train_seconds"] = sum(m["train_seconds"] or 0 for m in everything)
    out["train_seconds_this_run"] = sum(m["train_seconds"] or 0 for m in everything if m["trained_now"])
    if args.train_only:
        return out
    log(f"[{name}] base models ready ({time.perf_counter() - start:.0f} s); merging")
    merge_start = time.perf_counter()
    for n in args.n_models:
        chosen = None
        for s, members in enumerate(model_sets(pool, n, args.sets, args.seed)):
            def record(aligner, accuracy, **extra):
                out["records"].append({"experiment": "n_models", "n_models": n, "set": s,
                                       "members": members, "aligner": aligner, "accuracy": accuracy,
                                       **extra})
            reuse = chosen if s >= args.cv_sets else None
            chosen_here, search = merge_set(models, members, heldout_family, test_labels, test, logits,
                                            args, record, chosen=reuse)
            if search is not None:
                out["grid_search"].append({"experiment": "n_models", "n_models": n, "set": s, **search})
            if s == 0:
                chosen = chosen_here
            accs = {r["aligner"]: r["accuracy"] for r in out["records"]
                    if r["n_models"] == n and r["set"] == s and r["experiment"] == "n_models"}
            log(f"  n={n} set {s} {members}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in accs.items()))
    if skewed is not None:
        skewed_models, _, skewed_logits = skewed

        def record(aligner, accuracy, **extra):
            out["records"].append({"experiment": "skewed", "n_models": 2, "set": 0, "members": [0, 1],
                                   "aligner": aligner, "accuracy": accuracy, **extra})
        _, search = merge_set(skewed_models, [0, 1], heldout_family, test_labels, test, skewed_logits,
                              args, record)
        out["grid_search"].append({"experiment": "skewed", "n_models": 2, "set": 0, **search})
        accs = {r["aligner"]: r["accuracy"] for r in out["records"] if r["experiment"] == "skewed"}
        log("  skewed: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in accs.items()))
    out["merge_seconds"] = time.perf_counter() - merge_start
    log(f"[{name}] done in {time.perf_counter() - start:.0f} s")
    return out


# --------------------------------------------------------------------------
# tables and figure


def _values(fam: dict, experiment: str, n: int, aligner: str) -> list[float]:
    return [r["accuracy"] for r in fam["records"]
            if r["experiment"] == experiment and r["n_models"] == n and r["aligner"] == aligner]


def _chosen(fam: dict, experiment: str, n: int) -> str:
    values = sorted({r["regularization"] for r in fam["records"] if r["experiment"] == experiment
                     and r["n_models"] == n and r["aligner"] == "cca_cv"})
    return ", ".join(f"{v:g}" for v in values)


def make_tables(results: dict) -> dict[str, tuple[list, list]]:
    fams = results["families"]
    labels, columns = labels_for(results), columns_for(results)
    head = [labels[c] for c in columns]
    tables = {}
    rows = []
    for fam in fams.values():
        if 2 in results["config"]["n_models"] and fam["records"]:
            cells = [pm(_values(fam, "n_models", 2, c)) for c in columns]
            cells[-1] += f" (r={_chosen(fam, 'n_models', 2)})"
            rows.append([fam["label"]] + cells)
    tables["two_models"] = (["family"] + head, rows)
    rows = []
    for fam in fams.values():
        for n in results["config"]["n_models"]:
            if not _values(fam, "n_models", n, "base"):
                continue
            cells = [pm(_values(fam, "n_models", n, c)) for c in columns]
            rows.append([fam["label"], n] + cells + [_chosen(fam, "n_models", n)])
    tables["n_models"] = (["family", "models"] + head + ["chosen r"], rows)
    rows = []
    for fam in fams.values():
        if "skewed_models" not in fam or not _values(fam, "skewed", 2, "base"):
            continue
        a, b = fam["skewed_models"]
        cells = [pm(_values(fam, "skewed", 2, c)) for c in columns[1:]]
        cells[-1] += f" (r={_chosen(fam, 'skewed', 2)})"
        rows.append([fam["label"], f"{100 * a['accuracy']:.1f}", f"{100 * b['accuracy']:.1f}"] + cells)
    tables["skewed"] = (["family", "model A", "model B"] + head[1:], rows)
    rows = []
    for fam in fams.values():
        for search in fam["grid_search"]:
            scores = ", ".join(f"{float(r):g}: {100 * s:.1f}" for r, s in search["cv_scores"].items())
            autos = [r["auto_regularization"]["mean"] for r in fam["records"]
                     if r["aligner"] == "cca_auto" and r["experiment"] == search["experiment"]
                     and r["n_models"] == search["n_models"] and r["set"] == search["set"]]
            what = "skewed split" if search["experiment"] == "skewed" else f"{search['n_models']} models"
            rows.append([fam["label"], what, f"{search['best']:g}", scores,
                         f"{autos[0]:.3f}" if autos else "–", f"{search['seconds']:.0f}"])
    tables["regularization"] = (["family", "merge", "chosen r", "CV accuracy per r (%)",
                                 "auto: mean OAS r", "search (s)"], rows)
    rows = []
    for fam in fams.values():
        accs = [m["accuracy"] for m in fam["models"]]
        n_train = fam["models"][0]["n_train"]
        rows.append([fam["label"], f"{fam['n_parameters'] / 1e6:.2f} M", len(fam["models"]),
                     n_train, fam["epochs"], fam["n_align"], pm(accs),
                     f"{fam['train_seconds'] / 60:.1f}" if fam.get("train_seconds") else "cached",
                     f"{fam.get('merge_seconds', 0) / 60:.1f}"])
    tables["settings"] = (["family", "parameters", "pool", "training images", "epochs",
                           "alignment images", "base accuracy (%)", "training (min)", "merging (min)"], rows)
    return tables


def write_outputs(results: dict, args) -> None:
    tables = make_tables(results)
    prefix = args.doc_prefix
    cfg = results["config"]
    titles = {"two_models": "Merging 2 models (test accuracy %, mean ± std over model sets)",
              "n_models": "Merging 2 to 8 models (test accuracy %, mean ± std over model sets)",
              "skewed": "2 models trained on a skewed split (test accuracy %)",
              "regularization": "CCA regularization chosen by GridSearchCV on held-out training data",
              "settings": "Base models and run settings"}
    text = []
    for key, (header, rows) in tables.items():
        if not rows:
            continue
        write_text(args.docs_dir / f"{prefix}_{key}.inc", rst_table(header, rows))
        text.append(titles[key] + "\n\n" + text_table(header, rows))
    meta = (f"Data: {cfg['dataset']} at {cfg['image_size']}x{cfg['image_size']} pixels, "
            f"{cfg['n_train']} stratified training images per model, {cfg['n_heldout']} other training "
            f"images held out for alignment and cross-validation, {cfg['n_test']} stratified test images. "
            f"{cfg['sets']} model sets per number of models (pool of {max(cfg['n_models'])} seeds), "
            f"GridSearchCV over r in {{{', '.join(f'{r:g}' for r in cfg['grid'])}}} with "
            f"{cfg['cv']}-fold stratified CV on the held-out images, run on the first {cfg['cv_sets']} "
            f"set(s) per number of models (the other sets reuse its choice). "
            f"Machine: {machine_line(results['machine'])} "
            f"Wall time of this run {results['wall_seconds'] / 60:.1f} min"
            + (f" (CPU time {results['cpu_seconds'] / 60:.1f} min)" if "cpu_seconds" in results else "")
            + ", of which training "
            f"{results.get('train_seconds_this_run', 0.0) / 60:.1f} min; training all base models took "
            f"{results['train_seconds'] / 60:.1f} min (their checkpoints are cached and reused).\n")
    title = (f"Test accuracy (%) of {min(cfg['n_models'])} and {max(cfg['n_models'])} merged "
             f"models, mean over {cfg['sets']} model sets")
    header, rows = headline_table(results)
    write_text(args.docs_dir / f"{prefix}_headline.inc",
               rst_table(header, rows, title=title))
    header, rows = headline_table(results, bold="")
    text.insert(0, title + "\n\n" + text_table(header, rows))
    write_text(args.docs_dir / f"{prefix}_meta.inc", meta)
    write_text(args.docs_dir / f"{prefix}_tables.txt", meta + "\n" + "\n".join(text))
    plot(results, args.docs_dir / f"{prefix}_vs_models.png")
    print(meta + "\n" + "\n".join(text))


def _mean(values) -> float | None:
    return float(np.mean(values)) if values else None


def headline_table(results: dict, *, bold: str = "**") -> tuple[list[str], list[list[str]]]:
    """The headline table: per family, 2 models and the most models, every column.

    Cells are mean test accuracies (%) over the model sets. The best merge of
    each row (every merge that ties with it at the printed digit) is wrapped in
    ``bold`` (reST strong emphasis; ``""`` for plain text), and the family is
    named on its first row only.
    """
    ns = results["config"]["n_models"]
    labels, columns = labels_for(results), columns_for(results)
    rows = []
    for fam in results["families"].values():
        first = True
        for n in sorted({min(ns), max(ns)}):
            means = {c: _mean(_values(fam, "n_models", n, c)) for c in columns}
            if means["base"] is None:
                continue
            cells = {c: "–" if v is None else f"{100 * v:.1f}" for c, v in means.items()}
            best = max(float(cells[c]) for c in columns if c in ALIGNERS and means[c] is not None)
            row = [fam["label"] if first else "", f"{n}"]
            for c in columns:
                is_best = c in ALIGNERS and means[c] is not None and float(cells[c]) == best
                row.append(f"{bold}{cells[c]}{bold}" if is_best and bold else cells[c])
            rows.append(row)
            first = False
    return ["family", "merged models"] + [labels[c] for c in columns], rows


def plot(results: dict, path: Path) -> None:
    """Accuracy against the number of merged models, one panel per family, one shared legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from skmerge.plotting import plot_accuracy_vs_models

    fams = [f for f in results["families"].values() if f["records"]]
    if not fams:
        return
    labels = labels_for(results)
    cols = min(3, len(fams))
    rows = (len(fams) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False,
                             sharey=True, constrained_layout=True)
    for ax, fam in zip(axes.flat, fams):
        records = [{"aligner": labels[r["aligner"]], "n_models": r["n_models"], "accuracy": 100 * r["accuracy"]}
                   for r in fam["records"] if r["experiment"] == "n_models" and r["aligner"] != "base"]
        base = 100 * float(np.mean([m["accuracy"] for m in fam["models"]]))
        plot_accuracy_vs_models(records, ax=ax, baselines={"base models (mean)": base})
        ax.set_title(fam["label"])
        ax.set_ylabel("test accuracy (%)" if ax in axes[:, 0] else "")
        ax.get_legend().remove()
    handles, names = axes.flat[0].get_legend_handles_labels()
    spare = list(axes.flat)[len(fams):]
    for ax in spare:
        ax.set_axis_off()
    if spare:  # the legend takes the first free panel
        spare[0].legend(handles, names, loc="center", fontsize="large", frameon=False)
    else:
        fig.legend(handles, names, loc="outside lower center", ncols=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tables_only:
        results = read_json(args.output)
        write_outputs(results, args)
        return results
    setup_torch(args.threads)
    start = time.perf_counter()
    data = benchmark_data(args)
    results = {"config": config_of(args), "machine": machine_info("cpu"), "command": " ".join(sys.argv),
               "families": {}}
    for name, family in args.family_specs.items():
        results["families"][name] = run_family(name, family, data, args)
        results["wall_seconds"] = time.perf_counter() - start
        results["cpu_seconds"] = time.process_time()
        results["train_seconds"] = sum(f["train_seconds"] for f in results["families"].values())
        results["train_seconds_this_run"] = sum(f["train_seconds_this_run"]
                                                for f in results["families"].values())
        if not args.train_only:
            write_json(args.output, results)
    if args.train_only:
        log(f"trained in {time.perf_counter() - start:.0f} s")
        return results
    write_outputs(results, args)
    log(f"wrote {args.output} and tables under {args.docs_dir} in {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
