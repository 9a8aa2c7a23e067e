"""How CCAAligner's regularization affects merged accuracy on real networks.

Trains 4 models per family on scikit-learn's digits (an MLP, a VGG11 with
BatchNorm and a CIFAR-style ResNet20), merges 2 and 4 of them with
PermutationAligner and CCAAligner at several regularizations, and writes the
test accuracies to ``docs/_generated/cca_regularization_default.txt``. This
is the measurement behind CCAAligner's default regularization.

Run: ``python benchmarks/cca_regularization_default.py`` (about 5 minutes on
2 CPU cores).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from skmerge import CCAAligner, ModelMerger, PermutationAligner
from skmerge.datasets import dataset_info, load_digits
from skmerge.models import get_model
from skmerge.training import evaluate, train_model

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "_generated" / "cca_regularization_default.txt"
FAMILIES = {
    "mlp 64-64-64": ("mlp", {"hidden": (64, 64, 64)}, 40),
    "vgg11-bn x0.25": ("vgg11", {"width": 0.25}, 10),
    "resnet20 x1": ("resnet20", {"width": 1}, 10),
}
REGULARIZATIONS = ["auto", 0.0, 0.03, 0.1, 0.3, 1.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-models", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    train, test = load_digits("train"), load_digits("test")
    info = dataset_info("digits")
    inputs = train.tensors[0]
    aligners = [("permutation", PermutationAligner())] + [
        (f"cca r={r}", CCAAligner(regularization=r)) for r in REGULARIZATIONS]
    lines = [f"Test accuracy on digits; merges of the first 2 and of all {args.n_models} models.", ""]
    header = f"{'family':<16} {'models':>6} " + " ".join(f"{name:>12}" for name, _ in aligners)
    lines += [header, "-" * len(header)]
    start = time.perf_counter()
    for family, (name, kwargs, epochs) in FAMILIES.items():
        models = []
        for seed in range(args.n_models):
            torch.manual_seed(seed)
            model = get_model(name, in_channels=info["in_channels"], image_size=info["image_size"],
                              num_classes=info["num_classes"], **kwargs)
            models.append(train_model(model, train, epochs=epochs, seed=seed))
        base = sum(evaluate(m, test)["accuracy"] for m in models) / len(models)
        lines.append(f"{family:<16} {'base':>6} {base:>12.3f}")
        for n in (2, args.n_models):
            cells = [ModelMerger(models[:n], aligner, device="cpu").fit(inputs).score(*test.tensors)
                     for _, aligner in aligners]
            lines.append(f"{family:<16} {n:>6} " + " ".join(f"{c:>12.3f}" for c in cells))
            print(lines[-1], flush=True)
    lines += ["", f"Wall time {time.perf_counter() - start:.0f} s, {args.threads} CPU thread(s)."]
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
