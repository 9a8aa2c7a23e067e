"""Train the converged base models of the merging benchmarks (once; they are committed).

For every family of ``_base_models.FAMILIES`` (the CCA Merge reference code's
VGG11 without BatchNorm at widths 1/2 and 1/4, VGG11 with BatchNorm at width
1/4, ResNet20 at widths 1 and 2) the script trains one model per seed (seeds
0-4: different initialization and data order) on 55,000 Fashion-MNIST
training images, keeping 5,000 other training images out of training (the
alignment data of the merging benchmarks, listed in
``benchmarks/models/split.json``). Each model is stored in half precision as
``benchmarks/models/<family>/seed<k>.pt`` (``skmerge.training.save_checkpoint``;
``skmerge.training.load_model`` rebuilds it in float32), after checking that
the float16 weights, reloaded in float32, score within 0.1 points of the
float32 model on the 10,000 test images. ``benchmarks/models/MANIFEST.json``
records recipe, accuracies, training times, thread count and command per
model; the table in ``benchmarks/README.md`` is rewritten from it.

Existing checkpoints are kept (``--force`` retrains), so an interrupted run
resumes where it stopped. Other scripts load the models with
``_base_models.load_base_models``.

Run (about 5 hours on one core; see benchmarks/README.md)::

    nice -n 19 python benchmarks/base_models.py                 # every missing model
    nice -n 19 python benchmarks/base_models.py --families resnet20-x1 --seeds 0 --force
    python benchmarks/base_models.py --time-steps 20            # time an epoch of each family
    python benchmarks/base_models.py --verify                   # re-evaluate the committed files
    python benchmarks/base_models.py --quick                    # smoke run, under benchmarks/cache/
"""

from __future__ import annotations

import _common  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)

import argparse  # noqa: E402
import fcntl  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from _base_models import (DATASET, FAMILIES, IMAGE_SIZE, MODELS_DIR, N_HELDOUT, RECIPE,  # noqa: E402
                          SEEDS, SPLIT_SEED, base_model_data, checkpoint_path, load_base_models,
                          make_split, model_kwargs)
from _common import CACHE, HERE, log, machine_info, read_json, setup_torch, write_json  # noqa: E402
from skmerge.models import architecture_of, get_model  # noqa: E402
from skmerge.training import evaluate, load_model, save_checkpoint, train_models  # noqa: E402

README = HERE / "README.md"
TABLE_BEGIN = "<!-- base-models table: written by benchmarks/base_models.py -->"
TABLE_END = "<!-- end of base-models table -->"
#: Largest accepted drop of test accuracy from storing the weights in float16.
FP16_TOLERANCE = 0.001


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=None,
                        help=f"comma-separated, from {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2,3,4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--force", action="store_true", help="retrain models whose checkpoint exists")
    parser.add_argument("--epochs", type=int, default=None,
                        help="override every family's epochs (exploration; use with --models-dir)")
    parser.add_argument("--augment", default=None,
                        help="override the augmentation: none, flip, crop, crop_flip (exploration)")
    parser.add_argument("--models-dir", default=None, help="where checkpoints and manifest go "
                        "(default benchmarks/models; --quick: benchmarks/cache/quick/models)")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST folder")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1,000 training and test images, 1 epoch, seeds 0 and 1")
    parser.add_argument("--time-steps", type=int, default=0, metavar="N",
                        help="time N training steps of each family, print the epoch time, stop")
    parser.add_argument("--verify", action="store_true",
                        help="reload every checkpoint, re-measure its test accuracy, compare with the manifest")
    parser.add_argument("--table-only", action="store_true",
                        help="rewrite the README table from the manifest, train nothing")
    args = parser.parse_args(argv)
    names = args.families.split(",") if args.families else list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    args.families = names
    args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else (
        [0, 1] if args.quick else list(SEEDS))
    if args.augment == "none":
        args.augment_value = None
    else:
        args.augment_value = args.augment or RECIPE["augment"]
    if args.quick and args.epochs is None:
        args.epochs = 1
    default_dir = CACHE / "quick" / "models" if args.quick else MODELS_DIR
    args.models_dir = Path(args.models_dir) if args.models_dir else default_dir
    return args


# --------------------------------------------------------------------------
# data


def ensure_split(models_dir: Path, root: str | None) -> None:
    """Write split.json (the held-out training indices) unless it exists."""
    path = models_dir / "split.json"
    if path.exists():
        return
    from skmerge.datasets import load_dataset

    labels = load_dataset(DATASET, "train", root=root).tensors[1].numpy()
    heldout = make_split(labels)
    write_json(path, {"dataset": DATASET, "split": "train", "n_total": len(labels),
                      "n_heldout": len(heldout), "seed": SPLIT_SEED,
                      "how": "sklearn train_test_split stratified by class "
                             "(benchmarks/_common.py _stratified_pick), sorted",
                      "heldout_indices": heldout.tolist()})
    log(f"wrote {path} ({len(heldout)} held-out training images)")


def _head(dataset: TensorDataset, n: int) -> TensorDataset:
    return TensorDataset(*(t[:n] for t in dataset.tensors))


def training_data(args) -> dict:
    ensure_split(args.models_dir, args.data_root)
    data = base_model_data(args.models_dir, args.data_root)
    if args.quick:
        data = dict(data, train=_head(data["train"], 1000), test=_head(data["test"], 1000))
    return data


# --------------------------------------------------------------------------
# training


def recipe_of(name: str, args) -> dict:
    """Everything that decides how one family's models are trained."""
    spec = FAMILIES[name]
    recipe = dict(RECIPE, epochs=args.epochs or spec.epochs, lr=spec.lr,
                  augment=args.augment_value, **(spec.recipe or {}))
    return recipe


def _build(name: str):
    spec, kwargs = FAMILIES[name], model_kwargs(name)
    # channels_last: about 20 % faster ResNet20 training steps on one CPU thread.
    return get_model(spec.model, **kwargs).to(memory_format=torch.channels_last)


def train_one(name: str, seed: int, recipe: dict, data: dict, verbose: bool = True) -> tuple:
    """Train one base model; returns it with its training wall and CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    (model,) = train_models(
        lambda: _build(name), data["train"], 1, seeds=[seed], epochs=recipe["epochs"],
        batch_size=recipe["batch_size"], lr=recipe["lr"], optimizer=recipe["optimizer"],
        weight_decay=recipe["weight_decay"], schedule=recipe["schedule"],
        augment=recipe["augment"], label_smoothing=recipe["label_smoothing"], verbose=verbose)
    return model, time.perf_counter() - wall, time.process_time() - cpu


def half_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict with floating tensors in float16 (contiguous); integer buffers kept."""
    return {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous()
            for k, v in model.state_dict().items()}


def store(name: str, seed: int, model, recipe: dict, data: dict, seconds: tuple, args) -> dict:
    """Save one trained model in float16, check the reload, return its manifest record."""
    spec = FAMILIES[name]
    test32 = evaluate(model, data["test"])["accuracy"]
    held32 = evaluate(model, data["heldout"])["accuracy"]
    state = half_state(model)
    reloaded = get_model(spec.model, **model_kwargs(name))
    reloaded.load_state_dict(state)
    test16 = evaluate(reloaded, data["test"])["accuracy"]
    held16 = evaluate(reloaded, data["heldout"])["accuracy"]
    if abs(test16 - test32) > FP16_TOLERANCE + 1e-9:
        message = (f"{name} seed {seed}: float16 weights score {test16:.4f} on the test set, "
                   f"the float32 model {test32:.4f}")
        if not args.quick:  # 1,000 test images: one image is already 0.1 points
            raise RuntimeError(message)
        log("  " + message)
    command = shlex.join(["python", "benchmarks/base_models.py"] + sys.argv[1:])
    record = {
        "file": f"{name}/seed{seed}.pt",
        "test_accuracy": round(test16, 6), "test_accuracy_float32": round(test32, 6),
        "heldout_accuracy": round(held16, 6), "heldout_accuracy_float32": round(held32, 6),
        "train_wall_seconds": round(seconds[0], 1), "train_cpu_seconds": round(seconds[1], 1),
        "threads": torch.get_num_threads(), "nice": os.nice(0),
        "date": machine_info()["date"], "command": command,
    }
    path = checkpoint_path(name, seed, args.models_dir)
    save_checkpoint(state, path, family=name, seed=seed, architecture=architecture_of(model),
                    recipe=recipe, dtype="float16", dataset=DATASET, image_size=IMAGE_SIZE,
                    n_train=len(data["train"]), **{k: v for k, v in record.items() if k != "file"})
    loaded, _ = load_model(path)
    for key, value in reloaded.state_dict().items():
        if not torch.equal(loaded.state_dict()[key], value):
            raise RuntimeError(f"{path}: {key} differs after the round trip through the file")
    record["bytes"] = path.stat().st_size
    return record


# --------------------------------------------------------------------------
# manifest


def _summary(family: dict) -> dict:
    seeds = family["seeds"]
    acc = np.array([r["test_accuracy"] for r in seeds.values()])
    return {
        "n_models": len(seeds),
        "test_accuracy_mean": round(float(acc.mean()), 6),
        "test_accuracy_std": round(float(acc.std(ddof=1)), 6) if len(acc) > 1 else 0.0,
        "test_accuracy_min": float(acc.min()), "test_accuracy_max": float(acc.max()),
        "train_wall_seconds": round(sum(r["train_wall_seconds"] for r in seeds.values()), 1),
        "train_cpu_seconds": round(sum(r["train_cpu_seconds"] for r in seeds.values()), 1),
        "bytes": sum(r["bytes"] for r in seeds.values()),
    }


def update_manifest(models_dir: Path, name: str, seed: int, recipe: dict, record: dict,
                    data: dict) -> dict:
    """Add one model's record to MANIFEST.json (locked: two runs may train side by side)."""
    with open(models_dir / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = _update_manifest(models_dir, name, seed, recipe, record, data)
        if models_dir.resolve() == MODELS_DIR.resolve():
            write_readme_table(manifest)
        return manifest


def _update_manifest(models_dir: Path, name: str, seed: int, recipe: dict, record: dict,
                     data: dict) -> dict:
    path = models_dir / "MANIFEST.json"
    manifest = read_json(path) if path.exists() else {}
    manifest.update({
        "description": "Base models of the merging benchmarks: Fashion-MNIST, float16 "
                       "state_dicts (skmerge.training.save_checkpoint); load with "
                       "benchmarks/_base_models.py load_base_models",
        "data": {"dataset": DATASET, "image_size": IMAGE_SIZE, "in_channels": 1,
                 "normalization": "skmerge.datasets.NORMALIZATION['fashion-mnist']",
                 "n_train": len(data["train"]), "n_heldout": len(data["heldout"]),
                 "heldout": "split.json", "n_test": len(data["test"])},
        "regenerate": "nice -n 19 python benchmarks/base_models.py --force",
    })
    families = manifest.setdefault("families", {})
    spec = FAMILIES[name]
    fam = families.setdefault(name, {"seeds": {}})
    fam.update({"label": spec.label,
                "architecture": {"name": spec.model, "kwargs": model_kwargs(name)},
                "parameters": sum(p.numel() for p in get_model(spec.model, **model_kwargs(name))
                                  .parameters()),
                "recipe": recipe,
                "command": f"nice -n 19 python benchmarks/base_models.py --families {name}"})
    fam["seeds"][str(seed)] = record
    fam["seeds"] = dict(sorted(fam["seeds"].items(), key=lambda kv: int(kv[0])))
    fam.update(_summary(fam))
    manifest["families"] = {k: families[k] for k in FAMILIES if k in families}
    fams = manifest["families"].values()
    manifest["total"] = {"n_models": sum(f["n_models"] for f in fams),
                         "bytes": sum(f["bytes"] for f in fams),
                         "train_wall_seconds": round(sum(f["train_wall_seconds"] for f in fams), 1),
                         "train_cpu_seconds": round(sum(f["train_cpu_seconds"] for f in fams), 1)}
    manifest["machine"] = machine_info()
    write_json(path, manifest)
    return manifest


def markdown_table(manifest: dict) -> str:
    rows = ["| family | parameters | optimizer | epochs | lr | test accuracy, % (mean ± std over seeds, "
            "min..max) | training (CPU time, all seeds) | files |",
            "|---|---|---|---|---|---|---|---|"]
    for name, fam in manifest["families"].items():
        r = fam["recipe"]
        acc = (f"{100 * fam['test_accuracy_mean']:.2f} ± {100 * fam['test_accuracy_std']:.2f} "
               f"({100 * fam['test_accuracy_min']:.2f}..{100 * fam['test_accuracy_max']:.2f}), "
               f"{fam['n_models']} seed{'s' if fam['n_models'] > 1 else ''}")
        rows.append(f"| `{name}` | {fam['parameters']:,} | {r['optimizer']} | {r['epochs']} | {r['lr']:g} | {acc} "
                    f"| {fam['train_cpu_seconds'] / 60:.0f} min | {fam['bytes'] / 2**20:.1f} MiB |")
    total = manifest["total"]
    threads = sorted({r["threads"] for f in manifest["families"].values() for r in f["seeds"].values()})
    rows.append(f"\nAll {total['n_models']} models: {total['train_cpu_seconds'] / 3600:.1f} h of CPU "
                f"time ({total['train_wall_seconds'] / 3600:.1f} h wall, "
                f"{'/'.join(map(str, threads))} torch thread(s), shared machine), "
                f"{total['bytes'] / 2**20:.1f} MiB of checkpoints; {manifest['machine']['cpu']}.")
    return "\n".join(rows) + "\n"


def write_readme_table(manifest: dict) -> None:
    """Rewrite the base-models table of benchmarks/README.md (it describes the committed models)."""
    text = README.read_text()
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise RuntimeError(f"{README} lacks the markers {TABLE_BEGIN!r} ... {TABLE_END!r}")
    before, rest = text.split(TABLE_BEGIN, 1)
    after = rest.split(TABLE_END, 1)[1]
    README.write_text(before + TABLE_BEGIN + "\n" + markdown_table(manifest) + TABLE_END + after)


# --------------------------------------------------------------------------
# the other modes


def time_steps(args) -> None:
    """Time ``--time-steps`` training steps of each family on random images."""
    batch = RECIPE["batch_size"]
    steps_per_epoch = -(-(60000 - N_HELDOUT) // batch)
    total = 0.0
    for name in args.families:
        model = _build(name).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        x = torch.randn(batch, 1, IMAGE_SIZE, IMAGE_SIZE)
        y = torch.randint(0, 10, (batch,))
        for i in range(args.time_steps + 3):  # 3 warm-up steps
            if i == 3:
                start = time.process_time()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        epoch = (time.process_time() - start) / args.time_steps * steps_per_epoch
        epochs = recipe_of(name, args)["epochs"]
        total += epoch * epochs * len(args.seeds)
        print(f"{name:16s} {epoch / 60:5.1f} CPU-min per epoch; {epochs} epochs x "
              f"{len(args.seeds)} seeds = {epoch * epochs * len(args.seeds) / 60:.0f} min", flush=True)
    print(f"total {total / 3600:.1f} h of CPU time at {torch.get_num_threads()} thread(s)")


def verify(args) -> None:
    """Re-measure every checkpoint's test accuracy and compare with the manifest."""
    manifest = read_json(args.models_dir / "MANIFEST.json")
    data = None
    worst = 0.0
    for name in args.families:
        fam = manifest["families"].get(name)
        if fam is None:
            continue
        seeds = [int(s) for s in fam["seeds"] if int(s) in args.seeds]
        models, loaded = load_base_models(name, seeds, models_dir=args.models_dir,
                                          data=data is None, root=args.data_root)
        data = data or loaded
        for seed, model in zip(seeds, models):
            acc = evaluate(model, data["test"])["accuracy"]
            recorded = fam["seeds"][str(seed)]["test_accuracy"]
            worst = max(worst, abs(acc - recorded))
            print(f"{name:16s} seed {seed}: test {100 * acc:.2f} % (manifest {100 * recorded:.2f} %)",
                  flush=True)
    if worst > FP16_TOLERANCE:
        raise SystemExit(f"a checkpoint differs from the manifest by {100 * worst:.2f} points")
    print(f"all within {100 * FP16_TOLERANCE:.1f} points of the manifest")


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_torch(args.threads)
    if args.time_steps:
        return time_steps(args)
    if args.verify:
        return verify(args)
    if args.table_only:
        return write_readme_table(read_json(args.models_dir / "MANIFEST.json"))
    data = training_data(args)
    for name in args.families:
        recipe = recipe_of(name, args)
        for seed in args.seeds:
            path = checkpoint_path(name, seed, args.models_dir)
            if path.exists() and not args.force:
                log(f"{path} exists, kept (--force retrains)")
                continue
            log(f"training {name} seed {seed}: {recipe['epochs']} epochs, lr {recipe['lr']}")
            model, wall, cpu = train_one(name, seed, recipe, data)
            record = store(name, seed, model, recipe, data, (wall, cpu), args)
            update_manifest(args.models_dir, name, seed, recipe, record, data)
            log(f"  {name} seed {seed}: test {100 * record['test_accuracy']:.2f} % "
                f"(float32 {100 * record['test_accuracy_float32']:.2f} %), {wall / 60:.1f} min wall, "
                f"{cpu / 60:.1f} min CPU, {record['bytes'] / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
