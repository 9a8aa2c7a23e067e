"""The ``skmerge`` command line: ``demo``, ``train``, ``merge`` and ``evaluate``.

``main`` parses the arguments and turns user errors (wrong paths, unknown
names, checkpoints that do not fit together, missing data sets) into one
line ``skmerge: error: ...`` on stderr and exit status 2, never a
traceback (``skmerge --debug ...`` shows it). Results go to stdout,
progress to stderr, so ``skmerge demo > table.txt`` keeps only the table.
Heavy modules (torch, the models) are imported when a command runs, so
that ``--help`` answers quickly.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CLIError", "build_parser", "main"]

EXIT_ERROR = 2

# Kept here (not imported from skmerge.models/datasets, which import torch) so
# that building the parser stays cheap; a test checks they match the registries.
MODELS = ("mlp", "resnet18", "resnet20", "vgg11", "vgg16", "vit")
DATASETS = ("cifar10", "cifar100", "digits", "fashion-mnist")
_DATASET_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
                    "cifar-10": "cifar10", "cifar-100": "cifar100"}
DEMO_ALIGNERS = ("identity", "permutation", "cca")
ALIGNERS = DEMO_ALIGNERS + ("procrustes", "ot")
SPLITS = ("same", "disjoint", "skewed")


class CLIError(Exception):
    """A user error: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors go through :func:`main`'s one-line report."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse takes a token such as "-1,2" or "-1e3" for an unknown option
        # ("--weights -1,2: expected one argument"). No skmerge option starts
        # with a digit, so such a token is a value, and its option's check
        # says what is wrong with it.
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message} (see '{self.prog} --help')")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the hand-wrapped descriptions and examples (defaults are in each help)."""


# --------------------------------------------------------------------------
# argument types


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _regularization(text: str) -> float | str:
    if text.lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number in [0, 1] or 'auto', got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] or 'auto', got {text}")
    return value


def _model_name(text: str) -> str:
    name = text.lower()
    if name not in MODELS:
        raise argparse.ArgumentTypeError(
            f"unknown model {text!r}; available models: {', '.join(MODELS)}")
    return name


def _dataset_name(text: str) -> str:
    name = _DATASET_ALIASES.get(text.lower(), text.lower())
    if name not in DATASETS:
        raise argparse.ArgumentTypeError(
            f"unknown dataset {text!r}; available datasets: {', '.join(DATASETS)}")
    return name


def _aligner_list(text: str) -> list[str]:
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in ALIGNERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(ALIGNERS)}, got {text!r}")
    return list(dict.fromkeys(names))  # drop repeats, keep the order


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 64,64, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"layer sizes must be positive, got {text!r}")
    return values


def _weights(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.5,0.5, got {text!r}") from None
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"weights must be non-negative numbers, got {text!r}")
    if sum(values) <= 0:
        raise argparse.ArgumentTypeError(f"weights must not all be zero, got {text!r}")
    return values


# --------------------------------------------------------------------------
# the parser

_DESCRIPTION = """\
Merge separately trained neural networks by aligning their hidden features
(CCA Merge, permutation matching or none) and averaging their parameters.
"""

_EPILOG = """\
examples:
  skmerge demo
  skmerge train --model mlp --dataset digits --n-models 2 --out runs/
  skmerge merge runs/mlp_seed0.pt runs/mlp_seed1.pt --dataset digits --out merged.pt
  skmerge evaluate merged.pt runs/*.pt --dataset digits

'skmerge COMMAND --help' describes each command. Errors are reported on one
line; 'skmerge --debug COMMAND ...' shows the full traceback instead.
"""

_DEMO_DESCRIPTION = """\
Train N small models with seeds S, S+1, ... on scikit-learn's digits (embedded,
nothing to download), merge the first two and then all N with each aligner,
and print a table of test accuracies: every base model, the ensemble (mean of
the softmax outputs) and every merge with its merge time. The table goes to
stdout, progress to stderr. The defaults (4 MLPs with three hidden layers of
64 units, 40 epochs) run in well under a minute on 2 CPU cores.
"""

_DEMO_EPILOG = """\
examples:
  skmerge demo
  skmerge demo --n-models 8 --plot accuracy.png
  skmerge demo --model resnet20 --width 0.5 --epochs 5 --aligners permutation,cca
"""

_TRAIN_DESCRIPTION = """\
Train N models with seeds S, S+1, ... (different initializations and data
orders) and save each as OUT/<model>_seed<seed>.pt: a weights-only file with
the architecture, data set and test accuracy in its metadata, which 'merge'
and 'evaluate' read back. With --split disjoint or skewed each model sees
its own part of the training data (the label-skew setups of the merging
literature). Default recipes: Adam with cosine decay for MLPs, SGD with
warmup and cosine decay for conv nets.
"""

_TRAIN_EPILOG = """\
examples:
  skmerge train --model mlp --dataset digits --n-models 4 --out runs/
  skmerge train --model resnet20 --width 2 --dataset cifar10 \\
      --data-root ~/data --epochs 100 --augment crop_flip --out runs/cifar/
  skmerge train --model vgg11 --dataset fashion-mnist --split disjoint --out runs/fm/
"""

#: find_spaces' tap placements and the default (skmerge.graph._walk.TAPS and DEFAULT_TAPS,
#: repeated: the parser does not import torch)
MERGE_TAPS = ("formed", "consumers", "both", "pre_and_post_activation")
MERGE_DEFAULT_TAPS = "both"

_MERGE_DESCRIPTION = """\
Merge two or more checkpoints of one architecture into one. The feature
spaces of the architecture are found automatically; each model is aligned
to the reference model on the training images of DATASET (all of them, or
N random ones with --n-align) and the aligned weights are averaged. Prints
the test accuracy of every input, of their ensemble and of the merged
model, and the merge time; writes the merged checkpoint (its metadata
names the inputs and the aligner).
"""

_MERGE_EPILOG = """\
examples:
  skmerge merge runs/mlp_seed0.pt runs/mlp_seed1.pt --dataset digits --out merged.pt
  skmerge merge runs/*.pt --dataset digits --aligner permutation --out perm.pt
  skmerge merge runs/*.pt --dataset digits --reference-free --repair --out free.pt
  skmerge merge runs/vit_*.pt --dataset fashion-mnist --space-aligner '*mlp*=permutation' --out vit.pt
  skmerge merge runs/vgg_*.pt --dataset fashion-mnist --taps both --out vgg.pt
  skmerge merge runs/*.pt --dataset digits --learn-coefficients 10 --out learned.pt
  skmerge merge a.pt b.pt --dataset cifar10 --data-root ~/data \\
      --regularization 0.1 --n-align 10000 --out merged.pt
  skmerge merge a_state_dict.pt b_state_dict.pt --model vgg11 --width 0.5 \\
      --dataset digits --out merged.pt
"""

_EVALUATE_DESCRIPTION = """\
Print the accuracy and mean cross-entropy of each checkpoint on the test
split of DATASET (or the training split with --split train) and, for
several checkpoints, of their ensemble (mean of the softmax outputs).
"""

_EVALUATE_EPILOG = """\
examples:
  skmerge evaluate merged.pt --dataset digits
  skmerge evaluate runs/*.pt merged.pt --dataset digits
"""


def _add_runtime_options(p: argparse.ArgumentParser, threads_help: str) -> None:
    p.add_argument("--device", default="auto",
                   help="'cpu', 'cuda', 'cuda:1', ... or 'auto': CUDA when available "
                        "(default: auto)")
    p.add_argument("--threads", type=_int_at_least(1), default=None, metavar="N",
                   help=threads_help)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress messages on stderr")


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, type=_dataset_name, metavar="NAME",
                   help=f"data set: {', '.join(DATASETS)}")
    p.add_argument("--data-root", metavar="PATH", default=None,
                   help="folder holding the data set's files (default: the loader's "
                        "environment variable or standard folder; digits needs none)")


def _add_architecture_options(p: argparse.ArgumentParser, override: bool) -> None:
    if override:
        p.add_argument("--model", type=_model_name, default=None, metavar="NAME",
                       help="build every checkpoint as this architecture instead of the "
                            "one its metadata records (needed for bare state_dicts): "
                            f"{', '.join(MODELS)}")
        p.add_argument("--width", type=_positive_float, default=None, metavar="W",
                       help="with --model: width multiplier (default: 1)")
        p.add_argument("--hidden", type=_int_list, default=None, metavar="H1,H2,...",
                       help="with --model mlp: hidden layer sizes (default: 512,512,512)")
    else:
        p.add_argument("--model", type=_model_name, required=True, metavar="NAME",
                       help=f"architecture: {', '.join(MODELS)}")
        p.add_argument("--width", type=_positive_float, default=1.0, metavar="W",
                       help="width multiplier of every hidden layer (default: 1)")
        p.add_argument("--hidden", type=_int_list, default=None, metavar="H1,H2,...",
                       help="hidden layer sizes of an mlp before --width (default: "
                            "512,512,512)")


def build_parser() -> argparse.ArgumentParser:
    """Build the ``skmerge`` argument parser.

    Returns
    -------
    argparse.ArgumentParser
        The parser; its errors raise :class:`CLIError` instead of exiting.
    """
    from . import __version__

    parser = _Parser(prog="skmerge", description=_DESCRIPTION, epilog=_EPILOG,
                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"skmerge {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of errors")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND",
                                     parser_class=_Parser)

    def command(name: str, summary: str, description: str, epilog: str, handler):
        sub = commands.add_parser(name, help=summary, description=description, epilog=epilog,
                                  formatter_class=_Formatter)
        sub.set_defaults(handler=handler)
        return sub

    demo = command("demo", "train small models on the embedded digits data, merge them with "
                   "every aligner and print the accuracies", _DEMO_DESCRIPTION, _DEMO_EPILOG,
                   _demo)
    demo.add_argument("--n-models", type=_int_at_least(2), default=4, metavar="N",
                      help="number of models to train, at least 2 (default: 4)")
    demo.add_argument("--model", type=_model_name, default="mlp", metavar="NAME",
                      help=f"architecture: {', '.join(MODELS)} (default: mlp)")
    demo.add_argument("--width", type=_positive_float, default=None, metavar="W",
                      help="width multiplier (default: 1 for mlp and resnet20, 0.25 for "
                           "vgg11, vgg16 and resnet18)")
    demo.add_argument("--epochs", type=_int_at_least(1), default=None, metavar="E",
                      help="training epochs per model (default: 40 for mlp, 10 for the "
                           "others)")
    demo.add_argument("--aligners", type=_aligner_list, default=list(DEMO_ALIGNERS),
                      metavar="LIST", help="comma-separated aligners among "
                                           f"{','.join(ALIGNERS)} (default: {','.join(DEMO_ALIGNERS)})")
    demo.add_argument("--seed", type=_int_at_least(0), default=0, metavar="S",
                      help="seed of the first model; the others get S+1, S+2, ... "
                           "(default: 0)")
    demo.add_argument("--plot", metavar="FILE", default=None,
                      help="also save a chart of accuracy vs number of merged models "
                           "(.png, .pdf, .svg, ...; needs matplotlib: "
                           "pip install 'skmerge[plot]')")
    _add_runtime_options(demo, "torch CPU threads (default: 1 for the mlp, whose tiny "
                               "layers gain nothing from more, else min(4, cores))")

    train = command("train", "train models and save them as checkpoints",
                    _TRAIN_DESCRIPTION, _TRAIN_EPILOG, _train)
    _add_architecture_options(train, override=False)
    _add_data_options(train)
    train.add_argument("--n-models", type=_int_at_least(1), default=2, metavar="N",
                       help="number of models (default: 2)")
    train.add_argument("--epochs", type=_int_at_least(1), default=10, metavar="E",
                       help="training epochs (default: 10)")
    train.add_argument("--seed", type=_int_at_least(0), default=0, metavar="S",
                       help="seed of the first model; the others get S+1, S+2, ... "
                            "(default: 0)")
    train.add_argument("--split", choices=SPLITS, default="same",
                       help="training data per model: all of it (same), disjoint classes "
                            "(disjoint), or mostly its own classes (skewed; see "
                            "--majority) (default: same)")
    train.add_argument("--majority", type=float, default=0.8, metavar="F",
                       help="with --split skewed: fraction of each class kept by the model "
                            "owning it (default: 0.8)")
    train.add_argument("--batch-size", type=_int_at_least(2), default=128, metavar="B",
                       help="mini-batch size (default: 128)")
    train.add_argument("--lr", type=_positive_float, default=None,
                       help="peak learning rate (default: 1e-3 (Adam) for mlp, "
                            "0.05 * B / 128 (SGD) for conv nets)")
    train.add_argument("--augment", choices=("crop", "flip", "crop_flip"), default=None,
                       help="augment image batches: random crops, horizontal flips or both "
                            "(crop_flip for CIFAR; never flip digits) (default: none)")
    train.add_argument("--out", required=True, metavar="DIR",
                       help="folder for the checkpoints, created if needed")
    _add_runtime_options(train, "torch CPU threads (default: torch's choice)")

    merge = command("merge", "merge checkpoints into one checkpoint",
                    _MERGE_DESCRIPTION, _MERGE_EPILOG, _merge)
    merge.add_argument("checkpoints", nargs="+", metavar="CKPT",
                       help="two or more checkpoints of one architecture")
    _add_data_options(merge)
    merge.add_argument("--aligner", choices=ALIGNERS, default="cca",
                       help="how to align the features (default: cca)")
    merge.add_argument("--regularization", type=_regularization, default=None, metavar="R",
                       help="CCA shrinkage in [0, 1], or 'auto' for Oracle Approximating "
                            "Shrinkage (default: CCAAligner's, 0.3)")
    merge.add_argument("--space-aligner", type=_space_aligner, action="append", default=None,
                       metavar="PATTERN=ALIGNER", dest="space_aligners",
                       help="align the feature spaces whose name matches the shell pattern with "
                            f"another aligner ({', '.join(ALIGNERS)}), e.g. '*mlp*=permutation'; "
                            "repeatable, the first match wins (ModelMerger's space_aligners)")
    merge.add_argument("--taps", choices=MERGE_TAPS, default=MERGE_DEFAULT_TAPS,
                       help="where the feature spaces are observed: where their features are formed, "
                            "at the inputs of the layers that read them, both, or where they are formed "
                            f"and at the inputs of their nonlinearities (default: {MERGE_DEFAULT_TAPS})")
    merge.add_argument("--reference", type=_int_at_least(0), default=0, metavar="K",
                       help="index of the checkpoint the others are aligned to (default: 0)")
    merge.add_argument("--weights", type=_weights, default=None, metavar="W1,W2,...",
                       help="averaging weights, one per checkpoint (default: uniform)")
    merge.add_argument("--reference-free", action="store_true",
                       help="align all models to their common barycenter instead of to the "
                            "reference (ReferenceFreeMerger; --reference is its starting point)")
    merge.add_argument("--repair", action="store_true",
                       help="after averaging, rescale every channel to the interpolated "
                            "activation statistics of the aligned models (REPAIR)")
    merge.add_argument("--learn-coefficients", type=_int_at_least(1), default=None, metavar="EPOCHS",
                       help="after aligning, learn one coefficient per model and parameter "
                            "tensor on the labelled alignment images for EPOCHS epochs "
                            "(LearnedCoefficientMerger; a tenth of them held out for early "
                            "stopping) instead of using --weights")
    merge.add_argument("--n-align", type=_int_at_least(1), default=None, metavar="N",
                       help="align on N random training images (default: all of them)")
    merge.add_argument("--seed", type=_int_at_least(0), default=0, metavar="S",
                       help="seed of the --n-align subset (default: 0)")
    merge.add_argument("--batch-size", type=_int_at_least(1), default=128, metavar="B",
                       help="batch size of the passes over the data (default: 128)")
    _add_architecture_options(merge, override=True)
    merge.add_argument("--out", required=True, metavar="FILE",
                       help="merged checkpoint to write")
    _add_runtime_options(merge, "torch CPU threads (default: torch's choice)")

    evaluate = command("evaluate", "accuracy and loss of checkpoints and of their ensemble",
                       _EVALUATE_DESCRIPTION, _EVALUATE_EPILOG, _evaluate)
    evaluate.add_argument("checkpoints", nargs="+", metavar="CKPT",
                          help="checkpoints, of any architectures with the data set's "
                               "number of classes")
    _add_data_options(evaluate)
    evaluate.add_argument("--split", choices=("test", "train"), default="test",
                          help="which split to evaluate on (default: test)")
    evaluate.add_argument("--batch-size", type=_int_at_least(1), default=512, metavar="B",
                          help="evaluation batch size (default: 512)")
    _add_architecture_options(evaluate, override=True)
    _add_runtime_options(evaluate, "torch CPU threads (default: torch's choice)")
    return parser


# --------------------------------------------------------------------------
# entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``skmerge`` command line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        Exit status: 0 on success, 2 on a user error (reported as one
        ``skmerge: error: ...`` line on stderr), 130 when interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help and --version exit through argparse
        return int(done.code or 0)
    except CLIError as error:
        return _report(error)
    try:
        if args.command is None:
            raise CLIError("missing command: choose one of demo, train, merge, evaluate "
                           "(see 'skmerge --help')")
        return _run(args)
    except KeyboardInterrupt:
        print("skmerge: interrupted", file=sys.stderr)
        return 130
    except (CLIError, OSError, ValueError, ImportError) as error:
        # The library raises ValueError/FileNotFoundError with messages written
        # for users; anything else is a bug and keeps its traceback.
        if args.debug:
            raise
        return _report(error)


def _report(error: Exception) -> int:
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"skmerge: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _run(args: argparse.Namespace) -> int:
    """Run a command with the requested torch thread count, restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    threads = args.threads
    if threads is None and args.command == "demo":
        # The demo's models are tiny: an MLP's 64x64 layers gain nothing from
        # more threads, and on a loaded or large machine OpenMP spin-waiting
        # makes every thread past the first slower. Conv nets gain up to ~4.
        threads = 1 if args.model == "mlp" else min(4, _available_cpus())
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        return args.handler(args)
    finally:
        torch.set_num_threads(previous)


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _space_aligner(text: str) -> tuple[str, str]:
    pattern, sep, name = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"expected PATTERN=ALIGNER, e.g. '*mlp*=permutation', got {text!r}")
    if name not in ALIGNERS:
        raise argparse.ArgumentTypeError(f"unknown aligner {name!r} in {text!r}: choose one of "
                                         f"{', '.join(ALIGNERS)}")
    return pattern, name


def _progress(args: argparse.Namespace) -> Callable[[str], None]:
    if args.quiet:
        return lambda message: None
    return lambda message: print(message, file=sys.stderr, flush=True)


def _device(name: str):
    from ._validation import check_device

    try:
        return check_device(name, "--device")
    except ValueError as error:
        raise CLIError(str(error)) from None


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-align the first column, right-align the others."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]

    def line(cells):
        first = f"{cells[0]:<{widths[0]}}"
        rest = "".join(f"  {c:>{w}}" for c, w in zip(cells[1:], widths[1:]))
        return (first + rest).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


# --------------------------------------------------------------------------
# demo


def _demo(args: argparse.Namespace) -> int:
    from . import _demo as demo

    if args.plot is not None:
        _check_matplotlib()
        _check_writable(Path(args.plot))
    result = demo.run_demo(args.model, args.n_models, width=args.width, epochs=args.epochs,
                           aligners=args.aligners, seed=args.seed,
                           device=str(_device(args.device)), log=_progress(args))
    sys.stdout.write(demo.format_table(result))
    sys.stdout.flush()
    if args.plot is not None:
        demo.save_plot(result, args.plot)
        _progress(args)(f"wrote {args.plot}")
    return 0


def _check_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise CLIError("--plot needs matplotlib, an optional dependency: "
                       "pip install 'skmerge[plot]' (or pip install matplotlib)")


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise CLIError(f"{path} is a folder; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"cannot write {path}: no permission to write in {parent}")


def _check_folder_writable(folder: Path) -> None:
    """A folder that exists or can be created, and can be written (before any work)."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"--out {folder} exists and is not a folder" if existing == folder else
                       f"cannot create --out {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"cannot write --out {folder}: no permission to write in {existing}")


def _check_not_an_input(out: Path, inputs: Sequence[str]) -> None:
    """Refuse to overwrite an input checkpoint (same file, whatever the spelling of its path)."""
    if not out.exists():
        return
    for path in inputs:
        try:
            same = os.path.samefile(out, path)
        except OSError:
            continue  # a missing input is reported when it is read
        if same:
            raise CLIError(f"--out {out} is one of the input checkpoints ({path}); write the "
                           "merged checkpoint to another file")


# --------------------------------------------------------------------------
# data and checkpoints


def _load_split(args: argparse.Namespace, split: str):
    from .datasets import load_dataset

    try:
        return load_dataset(args.dataset, split, root=args.data_root)
    except FileNotFoundError as error:
        # The loaders speak Python ("pass it as root="); say it for the CLI too.
        raise CLIError(f"{error} On the command line, pass the folder as --data-root.") from None


def _architecture_kwargs(name: str, dataset: str, width: float | None,
                         hidden: Sequence[int] | None) -> dict[str, Any]:
    """Keyword arguments of ``get_model`` for an architecture on a data set."""
    from .datasets import dataset_info

    info = dataset_info(dataset)
    kwargs: dict[str, Any] = dict(in_channels=info["in_channels"],
                                  image_size=info["image_size"],
                                  num_classes=info["num_classes"])
    if width is not None:
        kwargs["width"] = width
    if hidden is not None:
        if name != "mlp":
            raise CLIError(f"--hidden applies to the mlp only, not {name}")
        kwargs["hidden"] = tuple(hidden)
    if name == "resnet18" and info["image_size"] <= 64:
        kwargs["stem"] = "cifar"  # the ImageNet stem would shrink small images 4x at once
    return kwargs


def _describe_arch(arch: dict[str, Any]) -> str:
    kwargs = ", ".join(f"{k}={v!r}" for k, v in sorted(dict(arch.get("kwargs", {})).items()))
    return f"{arch.get('name')}({kwargs})"


def _check_model_size(arch: dict[str, Any], what: str, copies: int = 1) -> None:
    """Refuse, before allocating anything, an architecture too large for the memory available.

    The model is first built on the meta device (shapes without values), so
    a width of 1e9 or hidden sizes of 10^6 in a checkpoint's metadata give
    this error instead of an attempt to allocate terabytes. ``copies``: how
    many times its parameters' size the command needs.
    """
    import torch

    from ._memory import available_bytes
    from .models import get_model

    try:
        with torch.device("meta"):
            skeleton = get_model(arch["name"], **dict(arch.get("kwargs", {})))
    except (TypeError, ValueError) as error:
        raise CLIError(f"{what}cannot build {_describe_arch(arch)}: {error}") from None
    except RuntimeError as error:  # sizes past what a tensor can index
        first = (str(error).strip().splitlines() or [""])[0]
        raise CLIError(f"{what}{_describe_arch(arch)} has too many parameters to build ({first})") from None
    tensors = [*skeleton.parameters(), *skeleton.buffers()]
    n_params = sum(t.numel() for t in skeleton.parameters())
    size = copies * sum(t.numel() * t.element_size() for t in tensors)
    available = available_bytes("cpu")
    if available is not None and size > available:
        raise CLIError(f"{what}{_describe_arch(arch)} has {n_params:,} parameters and needs "
                       f"{size / 2**30:,.1f} GiB, but only {available / 2**30:,.1f} GiB of memory "
                       "are available")


def _read_checkpoint(path: str) -> tuple[dict, dict]:
    from .training import load_checkpoint

    p = Path(path)
    if not p.exists():
        raise CLIError(f"checkpoint not found: {path}")
    if not p.is_file():
        raise CLIError(f"{path} is not a file")
    try:
        return load_checkpoint(p)
    except Exception as error:  # torch.load fails on garbage in many different ways
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CLIError(f"{path} is not a checkpoint that torch.load(weights_only=True) "
                       f"can read: {first}") from error


def _load_models(args: argparse.Namespace) -> list[tuple[str, Any, dict]]:
    """Rebuild every checkpoint as a model: ``[(path, model, metadata), ...]``."""
    from .models import get_model

    override = None
    if args.model is not None:
        override = {"name": args.model, "kwargs": _architecture_kwargs(
            args.model, args.dataset, args.width, args.hidden)}
    elif args.width is not None or args.hidden is not None:
        raise CLIError("--width and --hidden describe the architecture given with --model; "
                       "checkpoints with metadata already record theirs")
    loaded = []
    for path in args.checkpoints:
        state, metadata = _read_checkpoint(path)
        arch = override or metadata.get("architecture")
        if not isinstance(arch, dict) or "name" not in arch:
            raise CLIError(f"{path} does not record its architecture (a bare state_dict?); "
                           "pass --model NAME (and --width/--hidden) to say how to build it")
        _check_model_size(arch, f"{path}: ")
        model = get_model(arch["name"], **dict(arch.get("kwargs", {})))
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            detail = lines[1] if len(lines) > 1 else lines[0] if lines else ""
            raise CLIError(f"{path} does not fit the architecture {_describe_arch(arch)}: "
                           f"{detail}") from None
        loaded.append((path, model.eval(), metadata))
    return loaded


def _check_fits_data(loaded, dataset, name: str) -> None:
    """Run every model on two images: a clear error instead of a shape error later."""
    import torch

    x = dataset.tensors[0][:2]
    n_classes = int(dataset.tensors[1].max()) + 1
    for path, model, _ in loaded:
        try:
            with torch.no_grad():
                out = model(x)
        except RuntimeError as error:
            first = (str(error).splitlines() or [""])[0]
            raise CLIError(f"{path} cannot read {name} images of shape "
                           f"{tuple(x.shape[1:])}: {first}") from None
        if out.ndim != 2 or out.shape[1] < n_classes:
            raise CLIError(f"{path} has {out.shape[-1]} outputs but {name} has "
                           f"{n_classes} classes")


def _check_same_architecture(loaded) -> None:
    from ._model_checks import architecture_difference

    first_path, first, _ = loaded[0]
    for path, model, _ in loaded[1:]:
        difference = architecture_difference(model, first, path, first_path)
        if difference is not None:
            raise CLIError(f"checkpoints of different architectures cannot be merged: {difference}")


def _save(model, path: Path, **metadata: Any) -> None:
    from .training import save_checkpoint

    save_checkpoint(model, path, **metadata)


def _fmt(value: float) -> str:
    return f"{value:.4f}"


# --------------------------------------------------------------------------
# train


def _train(args: argparse.Namespace) -> int:
    from . import __version__
    from .datasets import split_disjoint_classes, split_same, split_skewed
    from .models import get_model
    from .training import evaluate, train_models

    out = Path(args.out)
    _check_folder_writable(out)
    if not 0.0 <= args.majority <= 1.0:
        raise CLIError(f"--majority must be in [0, 1], got {args.majority}")
    device = _device(args.device)
    say = _progress(args)
    kwargs = _architecture_kwargs(args.model, args.dataset, args.width, args.hidden)
    # Weights, gradients and the optimizer's two moments.
    _check_model_size({"name": args.model, "kwargs": kwargs}, "", copies=4)
    train, test = _load_split(args, "train"), _load_split(args, "test")
    if args.split == "same":
        parts = split_same(train, args.n_models)
    elif args.split == "disjoint":
        parts = split_disjoint_classes(train, args.n_models, seed=args.seed)
    else:
        parts = split_skewed(train, args.n_models, majority=args.majority, seed=args.seed)

    rows = []
    for i, part in enumerate(parts):
        seed = args.seed + i
        say(f"training {args.model} {i + 1}/{args.n_models} (seed {seed}, "
            f"{len(part)} images, {args.epochs} epochs)")
        tick = time.perf_counter()
        (model,) = train_models(lambda: get_model(args.model, **kwargs), part, 1, seeds=[seed],
                                epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                augment=args.augment, device=device, verbose=not args.quiet)
        seconds = time.perf_counter() - tick
        scores = evaluate(model, test)
        path = out / f"{args.model}_seed{seed}.pt"
        classes = getattr(part, "classes", None)
        _save(model, path, dataset=args.dataset, split=args.split, part=i,
              classes=classes, seed=seed, epochs=args.epochs, batch_size=args.batch_size,
              lr=args.lr, augment=args.augment, n_train=len(part),
              test_accuracy=scores["accuracy"], test_loss=scores["loss"],
              train_seconds=seconds, skmerge_version=__version__)
        rows.append([str(path), str(seed), str(len(part)), _fmt(scores["accuracy"]),
                     _fmt(scores["loss"])])
    print(_table(["checkpoint", "seed", "train images", "test accuracy", "test loss"], rows))
    return 0


# --------------------------------------------------------------------------
# merge


def _merge(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from . import __version__
    from ._demo import make_aligner
    from .merge import ModelMerger
    from .reference_free import ReferenceFreeMerger
    from .training import evaluate

    n = len(args.checkpoints)
    if n < 2:
        raise CLIError(f"merge needs at least 2 checkpoints, got {n}")
    if args.reference >= n:
        raise CLIError(f"--reference {args.reference} is out of range for {n} checkpoints "
                       f"(0 to {n - 1})")
    if args.weights is not None and len(args.weights) != n:
        raise CLIError(f"--weights has {len(args.weights)} values for {n} checkpoints")
    if args.regularization is not None and args.aligner != "cca":
        raise CLIError(f"--regularization applies to --aligner cca, not {args.aligner}")
    if args.learn_coefficients is not None and args.repair:
        raise CLIError("--learn-coefficients and --repair cannot be combined: the learned "
                       "coefficients replace the average that REPAIR corrects")
    out = Path(args.out)
    _check_writable(out)
    _check_not_an_input(out, args.checkpoints)
    device = _device(args.device)
    say = _progress(args)

    loaded = _load_models(args)
    _check_same_architecture(loaded)
    train, test = _load_split(args, "train"), _load_split(args, "test")
    _check_fits_data(loaded, test, args.dataset)
    x, y = train.tensors[0], train.tensors[1]
    if args.n_align is not None:
        if args.n_align > len(x):
            raise CLIError(f"--n-align {args.n_align} is more than the {len(x)} training "
                           f"images of {args.dataset}")
        rows = torch.from_numpy(np.sort(
            np.random.default_rng(args.seed).choice(len(x), args.n_align, replace=False)))
        x, y = x[rows], y[rows]

    models = [model for _, model, _ in loaded]
    learn = args.learn_coefficients is not None
    method = ", ".join([args.aligner] + ["reference-free"] * args.reference_free
                       + ["REPAIR"] * args.repair + ["learned coefficients"] * learn)
    say(f"merging {n} models ({method}) on {len(x)} {args.dataset} training images")
    merger_type = ReferenceFreeMerger if args.reference_free else ModelMerger
    space_aligners = [(pattern, make_aligner(name)) for pattern, name in args.space_aligners or ()]
    merger = merger_type(models, make_aligner(args.aligner, args.regularization),
                         space_aligners=space_aligners or None, taps=args.taps, reference=args.reference,
                         weights=args.weights, repair=args.repair,
                         batch_size=args.batch_size, device=device, verbose=not args.quiet)
    tick = time.perf_counter()
    merger.fit(x)
    merged = merger.merged_model_
    coefficients = None
    if learn:
        merged, coefficients = _learned_coefficients(merger, x, y, args)
    merged = merged.cpu()
    seconds = time.perf_counter() - tick

    say(f"evaluating on {len(test)} test images")
    rows = []
    for path, model, _ in loaded:
        s = evaluate(model, test, device=device)
        rows.append([path, _fmt(s["accuracy"]), _fmt(s["loss"])])
    acc, loss = _ensemble_scores(models, test, device)
    rows.append([f"ensemble of {n}", _fmt(acc), _fmt(loss)])
    s = evaluate(merged, test, device=device)
    rows.append([f"merged ({method})", _fmt(s["accuracy"]), _fmt(s["loss"])])

    aligner_params = {k: v for k, v in merger.aligner.get_params(deep=False).items()}
    _save(merged, out, dataset=args.dataset, merged_from=[str(p) for p in args.checkpoints],
          aligner=args.aligner, aligner_params=aligner_params,
          space_aligners=[list(pair) for pair in args.space_aligners or ()], taps=args.taps,
          reference=args.reference,
          reference_free=args.reference_free, repair=args.repair,
          weights=[float(w) for w in merger.weights_], n_align=len(x),
          learned_coefficients=coefficients, coefficient_epochs=args.learn_coefficients,
          test_accuracy=s["accuracy"], test_loss=s["loss"], merge_seconds=seconds,
          skmerge_version=__version__)
    print(_table(["model", "test accuracy", "test loss"], rows))
    print(f"\nmerge time {seconds:.2f} s ({method}, reference {args.reference}, "
          f"aligned on {len(x)} training images); wrote {out}")
    return 0


def _learned_coefficients(merger, x, y, args: argparse.Namespace):
    """The merged model of a LearnedCoefficientMerger on the fitted ``merger``, and its coefficients.

    A tenth of the labelled alignment images (at least one, chosen with
    ``--seed``) is held out for early stopping; the rest learns the
    coefficients.
    """
    import numpy as np
    import torch

    from .coefficients import LearnedCoefficientMerger

    if len(x) < 2:
        raise CLIError("--learn-coefficients needs at least 2 alignment images (a tenth is held out)")
    order = torch.from_numpy(np.random.default_rng(args.seed).permutation(len(x)))
    n_valid = max(1, len(x) // 10)
    valid, fit = order[:n_valid], order[n_valid:]
    learned = LearnedCoefficientMerger(merger, n_epochs=args.learn_coefficients,
                                       batch_size=args.batch_size, random_state=args.seed,
                                       verbose=not args.quiet)
    learned.fit(x[fit], y[fit], validation=(x[valid], y[valid]))
    coefficients = {name: [float(c) for c in values] for name, values in learned.coefficients_.items()}
    return learned.merged_model_, coefficients


def _ensemble_scores(models, dataset, device) -> tuple[float, float]:
    """Accuracy and cross-entropy of the mean of the models' softmax outputs."""
    import torch

    from .training import predict_logits

    probs = sum(predict_logits(m, dataset, device=device).softmax(1) for m in models) / len(models)
    labels = dataset.tensors[1]
    accuracy = (probs.argmax(1) == labels).float().mean().item()
    loss = torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    return accuracy, loss


# --------------------------------------------------------------------------
# evaluate


def _evaluate(args: argparse.Namespace) -> int:
    from .training import evaluate

    device = _device(args.device)
    loaded = _load_models(args)
    data = _load_split(args, args.split)
    _check_fits_data(loaded, data, args.dataset)
    rows = []
    for path, model, _ in loaded:
        s = evaluate(model, data, batch_size=args.batch_size, device=device)
        rows.append([path, _fmt(s["accuracy"]), _fmt(s["loss"])])
    if len(loaded) > 1:
        acc, loss = _ensemble_scores([m for _, m, _ in loaded], data, device)
        rows.append([f"ensemble of {len(loaded)}", _fmt(acc), _fmt(loss)])
    print(_table(["model", f"{args.split} accuracy", f"{args.split} loss"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
