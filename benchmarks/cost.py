"""What merging costs: ModelMerger.fit against its lower bound, memory, solve time.

Three measurements (untrained models: the timings do not depend on the
weights):

1. **fit time vs the forward-pass lower bound.** ``ModelMerger.fit`` of 2 and
   8 ResNet20x4 models on growing alignment sets, against the forward passes
   of all models over the same data plus one BatchNorm re-estimation pass of
   the merged model (``skmerge.batchnorm.reset_bn_stats``), measured in the
   same run, alternating with the fits. Goal: fit <= 1.5x that bound. The
   breakdown is ``ModelMerger.timings_``: ``statistics`` (forward passes and
   accumulation), ``solve``, ``transform`` (weights and averaging),
   ``reset_bn``, and the rest (validation, tracing the spaces).
2. **peak memory vs number of models** (2, 4, 8, 16), each configuration in a
   fresh subprocess: peak resident memory during ``fit`` minus the peak after
   loading the models and data (``resource.getrusage``), and the exact bytes
   of the accumulated statistics (``merger.statistics_``), which should be
   ``O(n_models * d^2)``.
3. **solve time per space** for d = 64 ... 2048: ``fit_from_stats`` of each
   aligner on one (d, d) space, and the parts of the CCA solve.
4. **a large model** (``--parts large``): two VGG11-BN in torchvision's layout
   (129 M parameters: ``AdaptiveAvgPool2d(7)``, a 25088-input Linear and two
   4096-wide classifier layers) on 3x32x32 images, in a fresh subprocess:
   the fit's breakdown against its own bound (the forward passes of both
   models + one float32 SVD per solved space and model + the float32 products
   of the weight transform + one BatchNorm pass, each measured in the same
   run), and the peak extra memory against the models' size.
5. **the polar factor** (``--parts polar``) for d = 1024 ... 4096: float64 and
   float32 SVDs, the eigendecomposition route, and the CCA solve in both
   precisions (with the difference of the mappings).
6. **reusing the statistics** (``--parts reuse``): ``GridSearchCV`` over
   ``aligner__regularization`` with the statistics of each fold reused,
   against the same search with the reuse turned off.

Run::

    python benchmarks/cost.py                 # about 10 min on 2 busy CPU cores
    python benchmarks/cost.py --quick         # smoke run, < 1 min
    python benchmarks/cost.py --device cuda   # on a GPU (writes cost_cuda.json)
    python benchmarks/cost.py --profile       # cProfile of one 8-model fit

Results go to ``benchmarks/results/cost[_DEVICE].json`` and the tables to
``docs/_generated/benchmarks/``.
"""

from __future__ import annotations

import _common  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import (CACHE, GENERATED, RESULTS, load_benchmark_data, log, machine_info,  # noqa: E402
                     machine_line, read_json, rst_table, setup_torch, text_table, write_json,
                     write_text)
from skmerge import CCAAligner, IdentityAligner, ModelMerger, PermutationAligner  # noqa: E402
from skmerge.batchnorm import reset_bn_stats  # noqa: E402
from skmerge.models import get_model  # noqa: E402
from skmerge import _linalg as linalg  # noqa: E402
from skmerge.aligners._cca import _whitening  # noqa: E402
from skmerge.stats import CrossCovariance  # noqa: E402

MMAP_THRESHOLD = 65536  # bytes; glibc malloc setting of the memory runs


#: The measurements, in the order they run.
PARTS = ("fit", "memory", "solve", "large", "polar", "reuse")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run (< 1 min), writes under benchmarks/cache/quick")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--width", type=float, default=None, help="ResNet20 width (default 4)")
    parser.add_argument("--image-size", type=int, default=14,
                        help="Fashion-MNIST images resized to this size (default 14, as in accuracy.py)")
    parser.add_argument("--batch-size", type=int, default=128, help="ModelMerger batch_size (default 128)")
    parser.add_argument("--fit-sizes", default=None,
                        help="alignment sizes per number of models, e.g. '2:128,256,512,1024;8:128,256,512'")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats, minimum kept (default 2)")
    parser.add_argument("--memory-models", default=None, help="numbers of models (default 2,4,8,16)")
    parser.add_argument("--memory-size", type=int, default=None, help="alignment images for memory (default 256)")
    parser.add_argument("--dims", default=None, help="solve widths (default 64,128,256,512,1024,2048)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="which measurements to run (a subset keeps the other parts' committed results)")
    parser.add_argument("--large-size", type=int, default=None, help="alignment images of the large model (256)")
    parser.add_argument("--large-threads", default="1,2",
                        help="torch threads of the large model's runs, one fresh process each (default 1,2)")
    parser.add_argument("--polar-dims", default=None, help="polar factor widths (default 1024,2048,4096)")
    parser.add_argument("--large-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one fit and exit")
    parser.add_argument("--output", default=None, help="results JSON (default benchmarks/results/cost[_DEVICE].json)")
    parser.add_argument("--docs-dir", default=None, help="where tables go (default docs/_generated/benchmarks)")
    parser.add_argument("--tables-only", action="store_true", help="regenerate the tables from the results JSON")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    q = args.quick
    defaults = dict(width=1.0 if q else 4.0, fit_sizes="2:64,128;4:64" if q else "2:128,256,512,1024,2048;8:128,256,512,1024,2048",
                    repeats=1 if q else 2, memory_models="2,4" if q else "2,4,8,16",
                    memory_size=64 if q else 256, dims="64,128,256" if q else "64,128,256,512,1024,2048")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.fit_sizes = {int(n): [int(s) for s in sizes.split(",")]
                      for n, sizes in (part.split(":") for part in args.fit_sizes.split(";"))}
    args.memory_models = [int(n) for n in args.memory_models.split(",")]
    args.dims = [int(d) for d in args.dims.split(",")]
    args.parts = set(args.parts.split(","))
    if args.large_size is None:
        args.large_size = 32 if args.quick else 256
    args.large_threads = [int(t) for t in str(args.large_threads).split(",")]
    if args.polar_dims is None:
        args.polar_dims = [128, 256] if args.quick else [1024, 2048, 4096]
    else:
        args.polar_dims = [int(d) for d in str(args.polar_dims).split(",")]
    suffix = "" if args.device == "cpu" else "_" + torch.device(args.device).type
    out_root = CACHE / "quick" if q else None
    args.output = Path(args.output) if args.output else (out_root or RESULTS) / f"cost{suffix}.json"
    args.docs_dir = Path(args.docs_dir) if args.docs_dir else (out_root or GENERATED)
    args.doc_prefix = "cost" + suffix
    return args


def make_models(n: int, width: float, device) -> list:
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        models.append(get_model("resnet20", width=width, in_channels=1, num_classes=10).to(device).eval())
    return models


def alignment_data(size: int, image_size: int, device) -> torch.Tensor:
    data = load_benchmark_data("fashion-mnist", n_train=size, n_heldout=0, n_test=10,
                               image_size=image_size, seed=0)
    return data["train"].tensors[0].to(device)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def forward_bound(models, X, batch_size: int, device) -> tuple[float, float]:
    """Seconds of the forward passes of all models, and of one BatchNorm pass, over X."""
    _sync(device)
    start = time.perf_counter()
    for model in models:
        for i in range(0, len(X), batch_size):
            model(X[i:i + batch_size])
    _sync(device)
    forward = time.perf_counter() - start
    merged = copy.deepcopy(models[0])
    _sync(device)
    start = time.perf_counter()
    reset_bn_stats(merged, X, batch_size=batch_size, device=device)
    _sync(device)
    return forward, time.perf_counter() - start


def timed_fit(models, X, args, precision: str = "auto") -> dict:
    """The timings of one fit with its statistics pass (the reuse of a previous pass is cleared)."""
    from skmerge._statistics_cache import clear_statistics_cache

    clear_statistics_cache()
    _sync(args.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merger = ModelMerger(models, CCAAligner(), batch_size=args.batch_size, device=args.device,
                             precision=precision).fit(X)
    _sync(args.device)
    return dict(merger.timings_)


# --------------------------------------------------------------------------
# 1. fit vs lower bound


def measure_fit(args) -> list[dict]:
    rows = []
    for n, sizes in args.fit_sizes.items():
        models = make_models(n, args.width, args.device)
        X_all = alignment_data(max(sizes), args.image_size, args.device)
        # Warm-up: oneDNN primitives, tracing imports, allocator.
        forward_bound(models[:1], X_all[:args.batch_size], args.batch_size, args.device)
        timed_fit(models[:2], X_all[:args.batch_size], args)
        for size in sizes:
            X = X_all[:size]
            bounds, fits, doubles = [], [], []
            for _ in range(args.repeats):
                bounds.append(forward_bound(models, X, args.batch_size, args.device))
                fits.append(timed_fit(models, X, args))
                if size == max(sizes):  # the float64 products, for comparison
                    doubles.append(timed_fit(models, X, args, precision="double"))
            forward = min(b[0] for b in bounds)
            bn = min(b[1] for b in bounds)
            fit = min(fits, key=lambda t: t["total"])
            row = {"n_models": n, "n_samples": size, "forward": forward, "bn_pass": bn,
                   "bound": forward + bn, **{f"fit_{k}": v for k, v in fit.items()},
                   "ratio": fit["total"] / (forward + bn),
                   "all_forward": [b[0] for b in bounds], "all_bn": [b[1] for b in bounds],
                   "all_fit": [f["total"] for f in fits]}
            if doubles:
                double = min(doubles, key=lambda t: t["total"])
                row.update({f"double_{k}": v for k, v in double.items()})
            rows.append(row)
            log(f"  fit n={n} N={size}: forward {forward:.2f} + BN {bn:.2f} s, fit {fit['total']:.2f} s "
                f"(stats {fit['statistics']:.2f}, solve {fit['solve']:.2f}, transform {fit['transform']:.2f}, "
                f"BN {fit['reset_bn']:.2f}), ratio {row['ratio']:.2f}")
        del models
        gc.collect()
    return rows


# --------------------------------------------------------------------------
# 2. memory (one subprocess per configuration)


def _maxrss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def _proc_status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the peak resident set size to the current one (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _alignment_file(size: int, args) -> Path:
    """The alignment images saved once by the parent, so a child does not load the whole data set."""
    path = CACHE / f"cost_alignment_{size}_{args.image_size}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(alignment_data(size, args.image_size, "cpu"), path)
    return path


def memory_child(n: int, args) -> dict:
    X = torch.load(_alignment_file(args.memory_size, args), weights_only=True).to(args.device)
    models = make_models(n, args.width, args.device)
    with torch.no_grad():  # warm-up: libraries, oneDNN primitives
        models[0](X[:args.batch_size])
    gc.collect()
    # Baseline: what is resident once the models and data are loaded. Where the
    # kernel allows it, the peak is reset to that; else the peak so far is used.
    reset = _reset_peak()
    baseline = _proc_status_mib("VmRSS") if reset else _maxrss_mib()
    if args.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
        gpu_base = torch.cuda.memory_allocated()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merger = ModelMerger(models, CCAAligner(), batch_size=args.batch_size, device=args.device).fit(X)
    peak = (_proc_status_mib("VmHWM") if reset else None) or _maxrss_mib()
    stats_bytes = sum(t.numel() * t.element_size() for s in merger.statistics_
                      for t in list(s._means) + list(s._moments.values()))
    dims = [int(s.n_features_[0]) for s in merger.statistics_]
    # A second fit in the same process: without the one-time cost of loading and running torch.export.
    del merger
    gc.collect()
    second = None
    if reset and _reset_peak():
        again = _proc_status_mib("VmRSS")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merger = ModelMerger(models, CCAAligner(), batch_size=args.batch_size, device=args.device).fit(X)
        second = _proc_status_mib("VmHWM") - again
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merger = ModelMerger(models, CCAAligner(), batch_size=args.batch_size, device=args.device).fit(X)
    out = {"n_models": n, "baseline_mib": baseline, "peak_mib": peak, "fit_extra_mib": peak - baseline,
           "second_fit_extra_mib": second,
           "statistics_mib": stats_bytes / 2**20, "sum_d2": int(sum(d * d for d in dims)),
           "captured_batch_mib": _tapped_bytes(merger, models[0], X[:args.batch_size]) / 2**20,
           "n_spaces": len(dims), "fit_seconds": merger.timings_["total"], "peak_reset": reset}
    if args.device != "cpu":
        out["gpu_peak_extra_mib"] = (torch.cuda.max_memory_allocated() - gpu_base) / 2**20
    return out


def _tapped_bytes(merger, model, inputs) -> int:
    """Bytes of the tensors the merger observes in one batch of one model."""
    from skmerge.graph._find import analyze
    from skmerge.graph._runner import GraphRunner, model_tensors

    traced, spaces = analyze(model, inputs[:2])
    seen = {}

    class Sizes:
        def observe(self, tensor, key):
            seen[key] = tensor.numel() * tensor.element_size()

    runner = GraphRunner(traced, [t.node for s in spaces for t in s.taps], model)
    with torch.no_grad():
        runner.run(model_tensors(model), (inputs,), Sizes())
    return sum(seen.values())


def measure_memory(args) -> list[dict]:
    rows = []
    _alignment_file(args.memory_size, args)
    for n in args.memory_models:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(n),
               "--device", args.device, "--threads", str(args.threads), "--width", str(args.width),
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
               "--memory-size", str(args.memory_size)]
        # Freed tensors go back to the system at once: with glibc's dynamic mmap
        # threshold the peak of identical runs differed by up to 300 MiB,
        # depending on the order of allocations.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
        result = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(row)
        log(f"  memory n={n}: fit +{row['fit_extra_mib']:.0f} MiB over {row['baseline_mib']:.0f} MiB, "
            f"statistics {row['statistics_mib']:.1f} MiB")
    return rows


# --------------------------------------------------------------------------
# 3. solve time per space


def _timeit(fn, repeats: int, device) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _stats(d: int, device, seed: int = 0) -> CrossCovariance:
    """Statistics of two correlated d-dimensional views (4d samples, decaying spectrum)."""
    gen = torch.Generator().manual_seed(seed)
    n = 4 * d
    scale = torch.arange(1, d + 1, dtype=torch.float64).rsqrt()
    X = torch.randn(n, d, generator=gen, dtype=torch.float64) * scale
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64) / d ** 0.5
    Y = X @ mix + 0.5 * torch.randn(n, d, generator=gen, dtype=torch.float64) * scale
    stats = CrossCovariance()
    for i in range(0, n, 4096):
        stats.update(X[i:i + 4096].to(device), Y[i:i + 4096].to(device))
    return stats


def _conditioned_stats(d: int, seed: int = 0) -> CrossCovariance:
    """A well-conditioned pair of views: ``y = x Q + noise``, canonical correlations 0.14 ... 1 (4d samples)."""
    gen = torch.Generator().manual_seed(seed)
    n = 4 * d
    scale = torch.linspace(1.0, 0.1, d, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    stats = CrossCovariance()
    for i in range(0, n, 4096):
        x = torch.randn(min(4096, n - i), d, generator=gen, dtype=torch.float64) * scale
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64) * scale.flip(0)
        stats.update(x, x @ rotation + 0.5 * noise)
    return stats


def _polar_by_eigh(m: torch.Tensor) -> torch.Tensor:
    """The polar factor ``U Vt`` of ``m`` from the eigendecomposition of ``m^T m`` (the alternative to one SVD)."""
    evals, evecs = torch.linalg.eigh(m.T @ m)
    return (m @ (evecs * evals.clamp_min(torch.finfo(m.dtype).tiny).rsqrt())) @ evecs.T


def _polar_by_svd(m: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


def _whitened_cross(stats: CrossCovariance, r: float) -> torch.Tensor:
    """``W_x^T S_xy W_y`` with the shrunk covariances' symmetric whitenings (float64)."""
    _, w_x = _whitening(stats.covariance_xx(), r)
    _, w_y = _whitening(stats.covariance_yy(), r)
    return w_x.T @ stats.covariance_xy() @ w_y


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / a.double().norm())


def measure_solve(args) -> list[dict]:
    rows = []
    device = torch.device(args.device)
    for d in args.dims:
        stats = _stats(d, device)
        repeats = 3 if d <= 512 else 1
        row = {"d": d}
        for key, make in [("identity", IdentityAligner), ("permutation", PermutationAligner),
                          ("cca_auto", lambda: CCAAligner(regularization="auto")), ("cca_fixed", lambda: CCAAligner(regularization=0.1))]:
            if d <= 512:
                make().fit_from_stats(stats)  # warm-up
            row[key] = _timeit(lambda: make().fit_from_stats(stats), repeats, device)
        s = stats.covariance_xx()
        m = stats.covariance_xy()
        row["eigh"] = _timeit(lambda: torch.linalg.eigh(s), repeats, device)
        row["svd"] = _timeit(lambda: torch.linalg.svd(m, full_matrices=False), repeats, device)
        row["matmul"] = _timeit(lambda: s @ m, repeats, device)
        rows.append(row)
        log(f"  solve d={d}: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in row.items() if k != "d"))
        stats = None  # free the d x d statistics before the next width
    return rows



# --------------------------------------------------------------------------
# 4. a large model: VGG11-BN in torchvision's layout


VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def vgg11_bn_torchvision(num_classes: int = 10, width: float = 1.0) -> torch.nn.Module:
    """torchvision's ``vgg11_bn`` layout: 128.8 M parameters (width 1, 10 classes)."""
    from torch import nn

    layers, channels = [], 3
    for v in VGG11:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            v = max(1, int(v * width))
            layers += [nn.Conv2d(channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            channels = v
    hidden = max(1, int(4096 * width))
    return nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(7), nn.Flatten(),
                         nn.Linear(channels * 49, hidden), nn.ReLU(True), nn.Dropout(),
                         nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
                         nn.Linear(hidden, num_classes)).eval()


def _transform_products(merger) -> list[tuple[int, int]]:
    """``(d, columns)`` of every float32 product the weight transform of one model needs."""
    from skmerge.graph._apply import slices_by_tensor
    from skmerge.merge import _transform_of
    from skmerge.graph._apply import normalize_transforms

    state = merger.models[0].state_dict()
    k = 1 - merger.reference
    ops = normalize_transforms(merger.spaces_, [_transform_of(row[k]) for row in merger.aligners_])
    products = []
    for key, entries in slices_by_tensor(merger.spaces_, ops).items():
        for sl, op, _, space in entries:
            if op[0] == "pair":
                products.append((space.dim, state[key].numel() // space.dim))
    return products


def large_child(args) -> dict:
    """One fresh process: the fit of two large models, its bound, its peak memory."""
    from skmerge._statistics_cache import clear_statistics_cache

    torch.manual_seed(0)
    models = [vgg11_bn_torchvision(width=1 / 16 if args.quick else 1.0) for _ in range(2)]
    X = torch.randn(args.large_size, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model_mib = sum(p.numel() * p.element_size() for p in models[0].parameters()) / 2**20
    with torch.no_grad():
        models[0](X[:4])
    gc.collect()
    reset = _reset_peak()
    baseline = _proc_status_mib("VmRSS") if reset else _maxrss_mib()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merger = ModelMerger(models, CCAAligner(), batch_size=args.batch_size, device="cpu").fit(X)
    peak = (_proc_status_mib("VmHWM") if reset else None) or _maxrss_mib()
    stats_mib = sum(t.numel() * t.element_size() for st in merger.statistics_
                    for t in list(st._means) + list(st._moments.values())) / 2**20
    timings = dict(merger.timings_)
    clear_statistics_cache()
    del merger
    gc.collect()
    # the bound, measured now, with the same threads
    forward, bn = forward_bound(models, X, args.batch_size, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merger = ModelMerger(models, CCAAligner(), batch_size=args.batch_size, device="cpu",
                             self_check=False).fit(X[:2 * args.batch_size])
    dims = [s.dim for s in merger.spaces_]
    svd_torch, svd_lapack = {}, {}
    for d in sorted(set(dims)):
        m = torch.randn(d, d, generator=torch.Generator().manual_seed(d))
        svd_torch[d] = _timeit(lambda: torch.linalg.svd(m, full_matrices=False), 1, "cpu")
        svd_lapack[d] = _timeit(lambda: linalg.svd(m), 1, "cpu")  # SciPy's LAPACK, what the solve uses
    products = _transform_products(merger)
    gemm = 0.0
    for d, columns in products:
        a = torch.randn(d, d)
        b = torch.randn(d, min(columns, (1 << 22) // d) or 1)
        scale = columns / b.shape[1]
        gemm += scale * _timeit(lambda: a @ b, 1, "cpu")
    # one SVD per space and model (2 models: one is the reference), with the faster backend
    svd_total = sum(min(svd_torch[d], svd_lapack[d]) for d in dims)
    bound = forward + svd_total + gemm + bn
    return {"model_mib": model_mib, "n_parameters": sum(p.numel() for p in models[0].parameters()),
            "baseline_mib": baseline, "fit_extra_mib": peak - baseline, "statistics_mib": stats_mib,
            "timings": timings, "forward": forward, "bn_pass": bn, "svd": svd_total,
            "svd_torch": sum(svd_torch[d] for d in dims), "svd_lapack": sum(svd_lapack[d] for d in dims),
            "threads": torch.get_num_threads(),
            "transform_gemm": gemm, "bound": bound, "ratio": timings["total"] / bound,
            "dims": dims, "n_samples": args.large_size, "peak_reset": reset}


def measure_large(args) -> list[dict]:
    """One fresh process per thread count in ``--large-threads``."""
    rows = []
    for threads in args.large_threads:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--large-child", "--threads", str(threads),
               "--batch-size", str(args.batch_size), "--large-size", str(args.large_size)] + (
                   ["--quick"] if args.quick else [])
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
        result = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        t = row["timings"]
        log(f"  large, {threads} thread(s): fit {t['total']:.1f} s (stats {t['statistics']:.1f}, solve "
            f"{t['solve']:.1f}, transform {t['transform']:.1f}, BN {t['reset_bn']:.1f}) vs bound "
            f"{row['bound']:.1f} s; memory +{row['fit_extra_mib']:.0f} MiB for models of {row['model_mib']:.0f} MiB")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------
# 5. the polar factor of wide spaces


def measure_polar(args) -> list[dict]:
    rows = []
    for d in args.polar_dims:
        stats = _stats(d, torch.device("cpu"))
        m = stats.covariance_xy()
        row = {"d": d,
               "svd64": _timeit(lambda: torch.linalg.svd(m, full_matrices=False), 1, "cpu"),
               "svd32": _timeit(lambda: torch.linalg.svd(m.float(), full_matrices=False), 1, "cpu"),
               "svd32_lapack": _timeit(lambda: linalg.svd(m.float()), 1, "cpu"),
               "eigh64": _timeit(lambda: torch.linalg.eigh(m.T @ m), 1, "cpu")}
        fitted = {}
        for solver in ("double", "single"):
            row[f"cca_{solver}"] = _timeit(
                lambda: fitted.__setitem__(solver, CCAAligner(0.3, solver=solver).fit_from_stats(stats)),
                1, "cpu")
        row["cca_single_error"] = _relative(fitted["double"].mapping_, fitted["single"].mapping_)
        # what the float32 solve is made of: one SVD plus triangular solves and products of d x d matrices
        m32, lower = m.float(), torch.linalg.cholesky(stats.covariance_xx(dtype=torch.float32))
        row["gemm32"] = _timeit(lambda: m32 @ m32, 1, "cpu")
        row["trsm32"] = _timeit(lambda: torch.linalg.solve_triangular(lower, m32, upper=False), 1, "cpu")
        row["trsm32_blas"] = _timeit(lambda: linalg.triangular_solve(lower, m32), 1, "cpu")
        row["trmm32_blas"] = _timeit(lambda: linalg.triangular_multiply(lower, m32), 1, "cpu")
        row["cholesky32"] = _timeit(lambda: torch.linalg.cholesky(stats.covariance_xx(dtype=torch.float32)),
                                    1, "cpu")
        row["eigh32"] = _timeit(lambda: torch.linalg.eigh(m32.T @ m32), 1, "cpu")
        row["polar_eigh32"] = _timeit(lambda: _polar_by_eigh(m32), 1, "cpu")
        stats = fitted = m = m32 = lower = None  # free the d x d statistics before the conditioned ones
        # a well-conditioned space (canonical correlations bounded away from zero)
        stats = _conditioned_stats(d)
        fitted = {solver: CCAAligner(0.3, solver=solver).fit_from_stats(stats) for solver in ("double", "single")}
        row["cca_single_error_conditioned"] = _relative(fitted["double"].mapping_, fitted["single"].mapping_)
        row["cca_single_inverse_error_conditioned"] = _relative(fitted["double"].inverse_mapping_,
                                                                fitted["single"].inverse_mapping_)
        # the polar factor alone, of that space's whitened cross-covariance, in float32 by either route
        m = _whitened_cross(stats, 0.3)
        exact = _polar_by_svd(m)
        row["polar_svd32_error_conditioned"] = _relative(exact, _polar_by_svd(m.float()))
        row["polar_eigh32_error_conditioned"] = _relative(exact, _polar_by_eigh(m.float()))
        rows.append(row)
        log(f"  polar d={d}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if k != "d"))
        stats = None  # free the d x d statistics before the next width
    return rows


# --------------------------------------------------------------------------
# 6. statistics reused across a grid search


def measure_reuse(args) -> dict:
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from skmerge import _statistics_cache

    size = 128 if args.quick else 1024
    models = make_models(2, args.width, args.device)
    X = alignment_data(size, args.image_size, args.device)
    y = np.arange(size) % 10
    grid = {"aligner__regularization": [0.1, 0.3, 0.5, 0.9]}
    out = {"n_samples": size, "candidates": len(grid["aligner__regularization"]), "folds": 2}
    with warnings.catch_warnings():  # warm-up: the export of the architecture, libraries
        warnings.simplefilter("ignore")
        ModelMerger(models, CCAAligner(), batch_size=args.batch_size, device=args.device).fit(X[:64])
    for label, reuse in (("not_reused", False), ("reused", True)):
        _statistics_cache.clear_statistics_cache()
        original = _statistics_cache._Cache.get
        if not reuse:
            _statistics_cache._Cache.get = lambda self, key: None
        try:
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                GridSearchCV(ModelMerger(models, CCAAligner(), batch_size=args.batch_size, device=args.device),
                             grid, cv=StratifiedKFold(2), refit=False).fit(X, y)
            out[label] = time.perf_counter() - start
        finally:
            _statistics_cache._Cache.get = original
    _statistics_cache.clear_statistics_cache()
    out["speedup"] = out["not_reused"] / out["reused"]
    log(f"  reuse: grid search {out['reused']:.1f} s with the statistics reused, {out['not_reused']:.1f} s without")
    return out

# --------------------------------------------------------------------------
# output


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.0f}" if seconds >= 0.1 else f"{1e3 * seconds:.1f}"


def _other(r: dict) -> float:
    """Fit time outside the four timed steps: validation and tracing the spaces (torch.fx)."""
    return r["fit_total"] - sum(r[f"fit_{k}"] for k in ("statistics", "solve", "transform", "reset_bn"))


def make_tables(results: dict) -> dict:
    tables = {}
    rows = []
    for r in results.get("fit", []):
        rows.append([r["n_models"], r["n_samples"], f"{r['forward']:.2f}", f"{r['bn_pass']:.2f}",
                     f"{r['bound']:.2f}", f"{r['fit_total']:.2f}", f"{r['ratio']:.2f}",
                     f"{r['fit_statistics']:.2f}", f"{r['fit_statistics'] - r['forward']:.2f}",
                     f"{r['fit_solve']:.2f}", f"{r['fit_transform']:.2f}", f"{r['fit_reset_bn']:.2f}",
                     f"{_other(r):.2f}",
                     f"{r['double_total']:.2f}" if "double_total" in r else "-",
                     f"{r['double_statistics']:.2f}" if "double_statistics" in r else "-"])
    tables["fit"] = (["models", "images", "forward (s)", "BN pass (s)", "bound (s)", "fit (s)",
                      "fit / bound", "statistics (s)", "statistics - forward (s)", "solve (s)",
                      "transform (s)", "reset BN (s)", "other (s)", "fit, float64 products (s)",
                      "statistics, float64 products (s)"], rows)
    rows = []
    mem = results.get("memory", [])
    for r in mem:
        rows.append([r["n_models"], f"{r['baseline_mib']:.0f}", f"{r['fit_extra_mib']:.0f}",
                     f"{r['fit_extra_mib'] / r['n_models']:.1f}", f"{r['statistics_mib']:.1f}",
                     f"{r['statistics_mib'] / ((2 * r['n_models'] - 1) * r['sum_d2'] * 8 / 2**20):.3f}",
                     f"{r['captured_batch_mib']:.1f}",
                     f"{r['second_fit_extra_mib']:.0f}" if r.get("second_fit_extra_mib") is not None else "-"]
                    + ([f"{r['gpu_peak_extra_mib']:.0f}"] if "gpu_peak_extra_mib" in r else []))
    header = ["models", "after loading (MiB)", "fit peak extra (MiB)", "extra per model (MiB)",
              "statistics (MiB)", "statistics / ((2 n_models - 1) sum d^2 x 8 B)",
              "activations captured per batch and model (MiB)",
              "second fit in the process, peak extra (MiB)"]
    if mem and "gpu_peak_extra_mib" in mem[0]:
        header.append("GPU peak extra (MiB)")
    tables["memory"] = (header, rows)
    rows = []
    for r in results.get("solve", []):
        rows.append([r["d"], _ms(r["identity"]), _ms(r["permutation"]), _ms(r["cca_auto"]),
                     _ms(r["cca_fixed"]), _ms(r["eigh"]), _ms(r["svd"]), _ms(r["matmul"])])
    tables["solve"] = (["d", "Identity (ms)", "Permutation (ms)", "CCA auto (OAS) (ms)", "CCA r=0.1 (ms)",
                        "one eigh (ms)", "one SVD (ms)", "one matmul (ms)"], rows)
    runs = results.get("large", [])
    if runs:
        def ratio_cells(key, bound_of):
            cells = []
            for run in runs:
                t = run["timings"]
                value = t[key] if key != "other" else t["total"] - sum(
                    t[k] for k in ("statistics", "solve", "transform", "reset_bn"))
                bound = bound_of(run)
                cells += [f"{value:.1f}", f"{bound:.1f}" if bound else "-", f"{value / bound:.2f}" if bound else "-"]
            return cells

        header = [""]
        for run in runs:
            n = run["threads"]
            header += [f"fit, {n} thread{'s' if n != 1 else ''} (s)", "its bound (s)", "fit / bound"]
        tables["large"] = (header, [
            ["statistics vs forward passes", *ratio_cells("statistics", lambda r: r["forward"])],
            ["solve vs one float32 SVD per space and model (the faster of SciPy's LAPACK and torch.linalg)",
             *ratio_cells("solve", lambda r: r["svd"])],
            ["solve vs one torch.linalg float32 SVD per space and model",
             *ratio_cells("solve", lambda r: r["svd_torch"])],
            ["transform vs its float32 products", *ratio_cells("transform", lambda r: r["transform_gemm"])],
            ["BatchNorm re-estimation vs one pass", *ratio_cells("reset_bn", lambda r: r["bn_pass"])],
            ["other (finding the spaces, self-check)", *ratio_cells("other", lambda r: None)],
            ["total", *ratio_cells("total", lambda r: r["bound"])],
            ["peak extra memory / (one model + statistics)",
             *[cell for run in runs for cell in (
                 f"{run['fit_extra_mib']:.0f} MiB", f"{run['model_mib'] + run['statistics_mib']:.0f} MiB",
                 f"{(run['fit_extra_mib'] - run['statistics_mib']) / run['model_mib']:.2f} x model")]],
        ])
    def _cells(r, keys, fmt):
        return [fmt.format(r[k]) if k in r else "-" for k in keys]

    rows = [[r["d"], *_cells(r, ("svd64", "svd32", "svd32_lapack", "eigh64", "eigh32", "polar_eigh32", "gemm32",
                                 "trsm32", "trsm32_blas", "trmm32_blas", "cca_double", "cca_single"), "{:.2f}"),
             f"{r['cca_single'] / _fastest_svd32(r):.2f}",
             *_cells(r, ("cca_single_error", "cca_single_error_conditioned", "polar_svd32_error_conditioned",
                         "polar_eigh32_error_conditioned"), "{:.1e}")]
            for r in results.get("polar", [])]
    tables["polar"] = (["d", "SVD float64 (s)", "SVD float32 (s)", "SVD float32, SciPy's LAPACK (s)",
                        "eigh of M^T M float64 (s)",
                        "eigh of M^T M float32 (s)", "polar factor by eigh float32 (s)", "product float32 (s)",
                        "triangular solve float32 (s)", "triangular solve float32, BLAS trsm (s)",
                        "triangular product float32, BLAS trmm (s)", "CCA solve float64 (s)",
                        "CCA solve float32 (s)", "CCA float32 / fastest SVD float32", "mapping difference, decaying spectrum (rel.)",
                        "mapping difference, well-conditioned (rel.)", "polar factor error, SVD float32",
                        "polar factor error, eigh float32"], rows)
    reuse = results.get("reuse")
    if reuse:
        tables["reuse"] = (["statistics", "GridSearchCV (s)"], [
            ["reused (one pass per fold)", f"{reuse['reused']:.1f}"],
            ["not reused (one pass per candidate and fold)", f"{reuse['not_reused']:.1f}"]])
    return tables


def _fastest_svd32(row: dict) -> float:
    return min(row["svd32"], row.get("svd32_lapack", float("inf")))


def linear_fit(mem: list[dict]) -> dict | None:
    if len(mem) < 2:
        return None
    n = np.array([r["n_models"] for r in mem], dtype=float)
    extra = np.array([r["fit_extra_mib"] for r in mem])
    slope, intercept = np.polyfit(n, extra, 1)
    pred = slope * n + intercept
    ss_res = float(((extra - pred) ** 2).sum())
    ss_tot = float(((extra - extra.mean()) ** 2).sum()) or 1.0
    return {"slope_mib_per_model": float(slope), "intercept_mib": float(intercept),
            "r2": 1 - ss_res / ss_tot}


def write_outputs(results: dict, args) -> None:
    tables = make_tables(results)
    text = []
    titles = {"fit": "ModelMerger.fit vs the forward-pass lower bound (ResNet20, seconds, min over repeats)",
              "memory": "Peak memory of ModelMerger.fit vs number of models (fresh process each)",
              "solve": "Solve time per (d, d) space (fit_from_stats, min over repeats)",
              "large": "Two VGG11-BN (torchvision layout): the fit against its bound",
              "polar": "The polar factor of wide spaces, CPU",
              "reuse": "GridSearchCV over the regularization, statistics reused or not"}
    for key, (header, rows) in tables.items():
        if rows:
            write_text(args.docs_dir / f"{args.doc_prefix}_{key}.inc", rst_table(header, rows))
            text.append(titles[key] + "\n\n" + text_table(header, rows))
    cfg = results["config"]
    fit = linear_fit(results.get("memory", []))
    memo = ""
    if fit:
        memo = (f" Memory: a straight line through the fit peaks gives {fit['slope_mib_per_model']:.1f} MiB "
                f"per model + {fit['intercept_mib']:.0f} MiB (R^2 = {fit['r2']:.3f}).")
    default = cfg.get("cca_default")
    meta = (f"ResNet20 x{cfg['width']:g} (untrained), Fashion-MNIST images at {cfg['image_size']}x"
            f"{cfg['image_size']}, batch size {cfg['batch_size']}, "
            f"CCAAligner(){f' (regularization={default})' if default is not None else ''}, device {cfg['device']}; "
            f"{cfg['memory_size']} alignment images for the memory runs"
            + (f" (glibc MALLOC_MMAP_THRESHOLD_={cfg['malloc_mmap_threshold']})"
               if "malloc_mmap_threshold" in cfg else "")
            + f".{memo} "
            f"Machine: {machine_line(results['machine'])} Wall time {results['wall_seconds'] / 60:.1f} min."
            + _reruns(results) + "\n")
    summary = headline(results)
    write_text(args.docs_dir / f"{args.doc_prefix}_meta.inc", meta)
    write_text(args.docs_dir / f"{args.doc_prefix}_summary.inc", summary)
    write_text(args.docs_dir / f"{args.doc_prefix}_tables.txt", meta + "\n" + summary + "\n" + "\n".join(text))
    print(meta + "\n" + summary + "\n" + "\n".join(text))


def headline(results: dict) -> str:
    """Generated bullet list of the headline cost numbers."""
    lines = []
    fit = results.get("fit", [])
    for n in sorted({r["n_models"] for r in fit}):
        rows = [r for r in fit if r["n_models"] == n]
        big = max(rows, key=lambda r: r["n_samples"])
        rows.sort(key=lambda r: r["n_samples"])
        ratios = ", ".join(f"{r['ratio']:.2f}" for r in rows)
        met = [r["n_samples"] for i, r in enumerate(rows) if all(s["ratio"] <= 1.5 for s in rows[i:])]
        fixed = [r["fit_solve"] + r["fit_transform"] for r in rows]
        lines.append(
            f"- **fit / (forward + BN pass), {n} models:** {ratios} for "
            f"{', '.join(str(r['n_samples']) for r in rows)} images "
            f"(goal: at most 1.5; "
            + (f"met from {met[0]} images on" if met else "not met at these sizes")
            + f"). The solve and the weight transform cost {min(fixed):.1f}-{max(fixed):.1f} s whatever "
            f"the data size, so they dominate small alignment sets. "
            f"At {big['n_samples']} images the fit took {big['fit_total']:.1f} s: "
            f"statistics {big['fit_statistics']:.1f} s (of which forward passes {big['forward']:.1f} s), "
            f"solve {big['fit_solve']:.1f} s, transform {big['fit_transform']:.1f} s, "
            f"BN re-estimation {big['fit_reset_bn']:.1f} s, other (tracing, validation) {_other(big):.1f} s."
            + (f" With float64 products (``precision=\"double\"``) the same fit took {big['double_total']:.1f} s "
               f"(statistics {big['double_statistics']:.1f} s, ratio "
               f"{big['double_total'] / big['bound']:.2f})." if "double_total" in big else ""))
    fitm = results.get("memory_fit")
    mem = results.get("memory", [])
    if fitm and mem:
        lines.append(
            f"- **memory:** the peak extra memory of fit grows by {fitm['slope_mib_per_model']:.1f} MiB per "
            f"model (straight-line fit over {', '.join(str(r['n_models']) for r in mem)} models, "
            f"R^2 = {fitm['r2']:.3f}). What grows with the models is the statistics: "
            f"{mem[-1]['statistics_mib']:.1f} MiB for {mem[-1]['n_models']} models, (2 n_models - 1) sum(d^2) "
            f"float64 comoments (an auto- and a cross-comoment per model, the reference's auto-comoment "
            f"once) plus the means, and the same comoments of the batch in progress, per tap, until "
            f"the batch is added. The constant part is the per-batch buffers: the reference's "
            f"centered observations of the batch, kept until every model has run (the tapped "
            f"activations are {mem[-1]['captured_batch_mib']:.1f} MiB per model at batch size "
            f"{results['config']['batch_size']}), and what the forward pass of the model being processed "
            f"still holds (each observed activation is freed when the forward pass is done with it), the "
            f"averaged weights, "
            f"allocator overhead and, in the first fit of a process, the one-time cost of loading and "
            f"running torch.export"
            + (f" (a second fit of {mem[-1]['n_models']} models in the same process peaks "
               f"{mem[-1]['second_fit_extra_mib']:.0f} MiB above its start, against "
               f"{mem[-1]['fit_extra_mib']:.0f} MiB for the first)"
               if mem[-1].get("second_fit_extra_mib") is not None else "") + ".")
    for large in results.get("large", []):
        t = large["timings"]
        n = large["threads"]
        lines.append(
            f"- **a large model, {n} thread{'s' if n != 1 else ''}:** two VGG11-BN in torchvision's layout "
            f"({large['n_parameters'] / 1e6:.1f} M parameters, {large['model_mib']:.0f} MiB each in float32), "
            f"{large['n_samples']} images: fit {t['total']:.1f} s against a bound of {large['bound']:.1f} s "
            f"({large['ratio']:.2f}x; solve {t['solve']:.1f} s against {large['svd']:.1f} s of float32 SVDs "
            f"({t['solve'] / large['svd']:.2f}x, {t['solve'] / large['svd_torch']:.2f}x torch.linalg's "
            f"{large['svd_torch']:.1f} s), "
            f"transform {t['transform']:.1f} s against {large['transform_gemm']:.1f} s of float32 products); "
            f"peak extra memory {large['fit_extra_mib']:.0f} MiB = "
            f"{(large['fit_extra_mib'] - large['statistics_mib']) / large['model_mib']:.2f} x one model + the "
            f"statistics ({large['statistics_mib']:.0f} MiB).")
    polar = results.get("polar", [])
    if polar:
        last = polar[-1]
        fastest = _fastest_svd32(last)
        lines.append(
            f"- **wide spaces (d = {last['d']}):** the CCA solve takes {last['cca_single']:.1f} s in float32 "
            f"({last['cca_single'] / fastest:.2f}x the fastest float32 SVD, {fastest:.1f} s"
            + (f"; {last['cca_single'] / last['svd32']:.2f}x torch.linalg's, {last['svd32']:.1f} s"
               if "svd32_lapack" in last else "")
            + f"; {last['cca_double']:.1f} s in float64); "
            f"the float32 mapping differs from the float64 one by {last['cca_single_error']:.0e} (relative) on "
            f"a space whose weakest canonical directions carry almost no correlation" + (
                f" and by {last['cca_single_error_conditioned']:.0e} on a well-conditioned one (canonical "
                f"correlations 0.14 to 1). Beside its SVD the solve does about "
                f"{(last['cca_single'] - fastest) / last['gemm32']:.1f} float32 products' worth of "
                f"Cholesky factorizations, triangular solves and products (the whitening, the polar factor "
                f"and both maps); the polar factor through the eigendecomposition of M^T M takes "
                f"{last['polar_eigh32']:.1f} s against {fastest:.1f} s for the SVD, at "
                f"{last['polar_eigh32_error_conditioned']:.0e} error against "
                f"{last['polar_svd32_error_conditioned']:.0e} on the well-conditioned space."
                if "cca_single_error_conditioned" in last else "."))
    reuse = results.get("reuse")
    if reuse:
        lines.append(
            f"- **reusing the statistics:** a grid search over {reuse['candidates']} regularizations with "
            f"{reuse['folds']} folds took {reuse['reused']:.1f} s with one pass per fold and "
            f"{reuse['not_reused']:.1f} s with one per candidate ({reuse['speedup']:.1f}x).")
    solve = results.get("solve", [])
    if solve:
        last = solve[-1]
        lines.append(
            f"- **solve per space at d = {last['d']}:** CCA {last['cca_fixed']:.2f} s with r=0.1, "
            f"{last['cca_auto']:.2f} s with regularization='auto' (OAS); permutation {last['permutation']:.2f} s; one eigh "
            f"{last['eigh']:.2f} s, one SVD {last['svd']:.2f} s.")
    return "\n".join(lines) + "\n"


def profile(args) -> None:
    import cProfile
    import pstats

    n, sizes = max(args.fit_sizes.items())
    models = make_models(n, args.width, args.device)
    X = alignment_data(sizes[-1], args.image_size, args.device)
    timed_fit(models[:2], X[:args.batch_size], args)
    log(f"forward bound: {forward_bound(models, X, args.batch_size, args.device)}")
    profiler = cProfile.Profile()
    profiler.enable()
    log(f"fit: {timed_fit(models, X, args)}")
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def _reruns(results: dict) -> str:
    """The parts measured by a later run than the one the machine line describes."""
    later = [(part, run) for part, run in results.get("part_runs", {}).items()
             if run.get("machine", {}).get("date") != results["machine"].get("date")]
    return "".join(f" Part ``{part}`` rerun: ``{run['command']}``, {machine_line(run['machine'])}"
                   for part, run in later)


def _part_runs(previous: dict) -> dict:
    """Per part, the command and machine that measured it (results of older runs: their one command)."""
    runs = dict(previous.get("part_runs", {}))
    for part in PARTS:
        if part in previous and part not in runs:
            command = previous.get("command_large") if part == "large" and "command_large" in previous \
                else previous["command"]
            runs[part] = {"command": command, "machine": previous["machine"]}
    return runs


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    setup_torch(args.threads)
    if args.memory_child is not None:
        print(json.dumps(memory_child(int(args.memory_child), args)))
        return None
    if args.large_child:
        print(json.dumps(large_child(args)))
        return None
    if args.tables_only:
        results = read_json(args.output)
        write_outputs(results, args)
        return results
    if args.profile:
        profile(args)
        return None
    start = time.perf_counter()
    partial = set(args.parts) != set(PARTS) and args.output.exists()
    previous = read_json(args.output) if partial else {}
    runs = _part_runs(previous)
    results = {**previous, "config": {"device": args.device, "width": args.width, "image_size": args.image_size,
                          "batch_size": args.batch_size, "fit_sizes": args.fit_sizes,
                          "repeats": args.repeats, "memory_models": args.memory_models,
                          "memory_size": args.memory_size, "malloc_mmap_threshold": MMAP_THRESHOLD, "dims": args.dims, "threads": args.threads,
                          "cca_default": CCAAligner().get_params()["regularization"]},
               "machine": machine_info(args.device), "command": " ".join(sys.argv)}
    results.pop("command_large", None)
    config = results["config"]
    if partial:  # the other parts keep their run's machine, command and settings
        results["machine"], results["command"] = previous["machine"], previous["command"]
        results["config"] = previous["config"]
    for part in args.parts:
        runs[part] = {"command": " ".join(sys.argv), "machine": machine_info(args.device), "config": config}
    results["part_runs"] = runs
    if "fit" in args.parts:
        log("fit vs forward passes")
        results["fit"] = measure_fit(args)
    if "memory" in args.parts:
        log("peak memory")
        results["memory"] = measure_memory(args)
        results["memory_fit"] = linear_fit(results["memory"])
    if "solve" in args.parts:
        log("solve time per space")
        results["solve"] = measure_solve(args)
    if "large" in args.parts:
        log("a large model")
        results["large"] = measure_large(args)
    if "polar" in args.parts:
        log("the polar factor of wide spaces")
        results["polar"] = measure_polar(args)
    if "reuse" in args.parts:
        log("statistics reused across a grid search")
        results["reuse"] = measure_reuse(args)
    if not partial:
        results["wall_seconds"] = time.perf_counter() - start
        results["cpu_seconds"] = time.process_time()
    for part in args.parts:
        runs[part]["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_json(args.output, results)
    write_outputs(results, args)
    return results


if __name__ == "__main__":
    main()
