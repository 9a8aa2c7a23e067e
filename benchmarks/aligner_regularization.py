"""CCAAligner regularization: fixed grid vs ``"auto"`` (OAS) vs GridSearchCV.

Synthetic "two networks" data with a known answer: ``X`` has an anisotropic
spectrum (eigenvalues decaying like 1/k, as hidden activations do), the
reference is ``y = X A + noise`` with a random invertible ``A``, and there
are only a few more samples than features. Each cell is the held-out
``CCAAligner.score`` (mean per-feature Pearson correlation between
``transform(X_test)`` and ``y_test``, 20 000 test samples), averaged over
seeds. Run (with skmerge installed, e.g. ``pip install -e .``; about a
minute on two CPU cores)::

    python benchmarks/aligner_regularization.py

The table is written to docs/_generated/aligner_regularization.txt, which
docs/user_guide/aligners.rst includes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import time
import warnings

import numpy as np
from sklearn.model_selection import GridSearchCV

from skmerge.aligners import CCAAligner, SmallSampleWarning

GRID = [0.0, 0.01, 0.03, 0.1, 0.3, 1.0]


def make_data(rng, n, d, noise, n_test=20_000):
    spectrum = 1.0 / np.arange(1, d + 1)
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mixing = basis * np.sqrt(spectrum)
    A = rng.normal(size=(d, d)) / np.sqrt(d)
    X = rng.normal(size=(n + n_test, d)) @ mixing.T
    signal = X @ A
    y = signal + noise * signal.std(0) * rng.normal(size=signal.shape)
    return X[:n], y[:n], X[n:], y[n:]


OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "_generated" / "aligner_regularization.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    d = args.d
    columns = [str(r) for r in GRID] + ["auto", "GridSearchCV"]
    header = f"{'n':>5} {'noise':>5} | " + " ".join(f"{c:>7}" for c in columns[:-1]) + f" | {'CV pick':>12}"
    lines = []

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    emit(f"d = {d}, mean held-out score over {args.seeds} seeds")
    emit(header)
    emit("-" * len(header))
    start = time.perf_counter()
    for n in (int(1.25 * d), 2 * d, 8 * d):
        for noise in (0.5, 1.0):
            scores = np.zeros(len(GRID) + 2)
            picks = []
            for seed in range(args.seeds):
                rng = np.random.default_rng(seed)
                X, y, X_test, y_test = make_data(rng, n, d, noise)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", SmallSampleWarning)
                    for i, r in enumerate(GRID + ["auto"]):
                        scores[i] += CCAAligner(regularization=r).fit(X, y).score(X_test, y_test)
                    search = GridSearchCV(CCAAligner(), {"regularization": GRID}, cv=3).fit(X, y)
                scores[-1] += search.score(X_test, y_test)
                picks.append(search.best_params_["regularization"])
            scores /= args.seeds
            pick = f"{scores[-1]:.3f} ({np.median(picks):g})"
            emit(
                f"{n:>5} {noise:>5} | "
                + " ".join(f"{s:7.3f}" for s in scores[:-1])
                + f" | {pick:>12}"
            )
    emit("")
    emit("(CV pick: held-out score of GridSearchCV(cv=3) over the grid, median chosen r)")
    print(f"{time.perf_counter() - start:.1f} s")
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
