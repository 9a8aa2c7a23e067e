"""Shared helpers of the benchmark scripts: threads, data, machine info, output.

Import this module *before* torch (``from _common import ...`` at the top of a
script): it sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already
sets it. On a small machine shared with other processes, OpenMP's default
busy-waiting makes every multi-threaded torch op wait for a descheduled
sibling thread; we measured 10x to 100x slowdowns of training steps on the
2-core benchmark machine while other test suites ran, and none with the
passive policy.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
CACHE = HERE / "cache"
GENERATED = REPO / "docs" / "_generated" / "benchmarks"


# --------------------------------------------------------------------------
# environment


def setup_torch(threads: int) -> None:
    """Fix the number of intra-op threads (the benchmarks default to 2)."""
    torch.set_num_threads(int(threads))


def machine_info(device: str = "cpu") -> dict:
    """Where a result came from: CPU, cores, threads, library versions, date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import sklearn

    import skmerge
    from skmerge.graph._walk import DEFAULT_TAPS

    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if str(device).startswith("cuda") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "skmerge": skmerge.__version__,
        "default_taps": DEFAULT_TAPS,
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def machine_line(info: dict) -> str:
    """One sentence describing the machine of a result file."""
    where = info["gpu"] or f"{info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads)"
    load = info.get("load_average_at_start")
    load = f", load average {load[0]:g} at start" if load else ""
    # records written before the placement was recorded ran at the default of their time, "formed"
    taps = info.get("default_taps", "formed")
    return (f"{where}; torch {info['torch']}, scikit-learn {info['sklearn']}, "
            f"skmerge {info['skmerge']} (default placement ``taps=\"{taps}\"``), Python {info['python']}; "
            f"{info['date']}{load}.")


# --------------------------------------------------------------------------
# data


def _stratified_pick(labels: np.ndarray, sizes: list[int], seed: int) -> list[np.ndarray]:
    """Disjoint stratified index sets of the given sizes (in a shuffled order)."""
    from sklearn.model_selection import train_test_split

    remaining = np.arange(len(labels))
    picks = []
    for size in sizes:
        if size <= 0:
            picks.append(remaining[:0])
            continue
        if size >= len(remaining):
            picks.append(np.random.default_rng(seed).permutation(remaining))
            remaining = remaining[:0]
            continue
        chosen, remaining = train_test_split(
            remaining, train_size=size, stratify=labels[remaining], random_state=seed)
        picks.append(np.asarray(chosen))
    return picks


def _resize(x: torch.Tensor, image_size: int) -> torch.Tensor:
    if x.shape[-1] == image_size:
        return x
    # "area" is average pooling for integer factors (28 -> 14).
    return F.interpolate(x, size=(image_size, image_size), mode="area").contiguous()


def load_benchmark_data(dataset: str, *, n_train: int, n_heldout: int, n_test: int,
                        image_size: int | None, seed: int = 0, root: str | None = None) -> dict:
    """Stratified subsets of a data set, resized.

    Returns a dict with ``train`` (``n_train`` training images), ``heldout``
    (``n_heldout`` *other* training images: the alignment data and the only
    data GridSearchCV sees), ``test`` (``n_test`` test images) as
    TensorDatasets, and ``info`` (``in_channels``, ``image_size``,
    ``num_classes``).
    """
    from skmerge.datasets import dataset_info, load_dataset

    info = dataset_info(dataset)
    train = load_dataset(dataset, "train", root=root)
    test = load_dataset(dataset, "test", root=root)
    size = int(image_size or info["image_size"])
    x, y = train.tensors
    idx_train, idx_heldout = _stratified_pick(y.numpy(), [n_train, n_heldout], seed)
    xt, yt = test.tensors
    (idx_test,) = _stratified_pick(yt.numpy(), [n_test], seed)
    idx_test = np.sort(idx_test)

    def subset(x, y, idx):
        idx = torch.as_tensor(idx)
        return TensorDataset(_resize(x[idx], size), y[idx].clone())

    return {
        "train": subset(x, y, idx_train),
        "heldout": subset(x, y, idx_heldout),
        "test": subset(xt, yt, idx_test),
        "info": {"dataset": info["name"], "in_channels": info["in_channels"],
                 "image_size": size, "native_image_size": info["image_size"],
                 "num_classes": info["num_classes"]},
    }


# --------------------------------------------------------------------------
# output


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def update_families(path: Path, families: dict, order=None, merge=None, **fields) -> dict:
    """Write ``families`` (name -> results) and ``fields`` into the results JSON at ``path``.

    The families that other runs wrote meanwhile are kept: the file is read
    and written under a lock, so runs for different families may overlap.
    ``merge(name, on_disk, mine)``, when given, combines a family with what
    is on disk (runs of one family that share the machine). ``order``
    (family names) orders the families. Returns the results written.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = read_json(path) if path.exists() else {}
        on_disk = results.get("families", {})
        if merge is not None:
            families = {name: merge(name, on_disk.get(name), fam) for name, fam in families.items()}
        merged = {**on_disk, **families}
        if order is not None:
            merged = {k: merged[k] for k in order if k in merged}
        results.update(fields, families=merged)
        write_json(path, results)
    return results


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def rst_table(header: list[str], rows: list[list], *, widths: str | None = None,
              title: str | None = None, stub_columns: int = 1) -> str:
    """A ``.. list-table::`` directive (included by docs/benchmarks.rst)."""
    lines = [f".. list-table::{(' ' + title) if title else ''}",
             "   :header-rows: 1",
             f"   :stub-columns: {stub_columns}"]
    if widths:
        lines.append(f"   :widths: {widths}")
    lines.append("")
    for row in [header] + rows:
        cells = [str(c) if str(c) != "" else " " for c in row]
        lines.append(f"   * - {cells[0]}")
        lines.extend(f"     - {c}" for c in cells[1:])
    return "\n".join(lines) + "\n"


def text_table(header: list[str], rows: list[list]) -> str:
    """A plain fixed-width table (for the console and .txt files)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for k, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n"


def write_tables(results: dict, tables: dict, docs_dir: Path, prefix: str) -> None:
    """Write ``{prefix}_meta.inc`` (machine, command, wall time), ``{prefix}_tables.inc`` and ``.txt``.

    ``tables`` maps a name to ``(title, header, rows)``; the text is also printed.
    """
    meta = (f"Machine: {machine_line(results['machine'])} Command: ``{results['command']}``; "
            f"wall time {results['wall_seconds'] / 60:.1f} min.")
    text, rst = [meta, ""], []
    for title, head, rows in tables.values():
        rst.append(rst_table(head, rows, title=title))
        text += [title, "", text_table(head, rows), ""]
    write_text(docs_dir / f"{prefix}_meta.inc", meta + "\n")
    write_text(docs_dir / f"{prefix}_tables.inc", "\n".join(rst))
    write_text(docs_dir / f"{prefix}_tables.txt", "\n".join(text))
    print("\n".join(text))


def pm(values, scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std`` of a list (std over model sets, ddof=0); ``mean`` alone for one value."""
    values = np.asarray([v for v in values if v is not None], dtype=float) * scale
    if values.size == 0:
        return "–"
    if values.size == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# the digits studies (more_aligners.py, beyond_the_paper.py)


def train_digits_mlps(seeds, train, epochs: int) -> list:
    """One MLP 64-64-64-10 per seed, trained on the digits training set."""
    from skmerge.models import get_model
    from skmerge.training import train_model

    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = get_model("mlp", in_features=64, num_classes=10, hidden=(64, 64))
        models.append(train_model(model, train, epochs=epochs, seed=seed))
    return models


def mean_range(values) -> str:
    """``mean (min..max)`` of accuracies, three decimals."""
    values = np.asarray(values)
    return f"{values.mean():.3f} ({values.min():.3f}..{values.max():.3f})"


def emit_table(table: str, output: str | None, seconds: float) -> None:
    """Print a study's table and its wall time; write the table to ``output`` when given."""
    print(table)
    print(f"\n({seconds:.1f} s)")
    if output:
        write_text(Path(output), table + "\n")
