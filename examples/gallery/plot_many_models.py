"""
Merge many models
=================

Merging more models is where the aligners differ most. Every model is
aligned to the same reference ("all-to-one") and the aligned weights are
averaged. Plain averaging degrades to chance as models are added;
permutation matching loses a little more accuracy with each model; CCA
Merge stays close to the base models. The ensemble, which runs every model,
is the reference point.
"""

import matplotlib.pyplot as plt
import numpy as np
import torch

from skmerge import (CCAAligner, IdentityAligner, ModelMerger,
                     PermutationAligner)
from skmerge.datasets import load_digits
from skmerge.diagnostics import summarize_results
from skmerge.models import get_model
from skmerge.plotting import plot_accuracy_vs_models
from skmerge.training import ensemble_accuracy, evaluate, train_models

torch.set_num_threads(1)  # tiny models: one thread is the fastest

train, test = load_digits("train"), load_digits("test")
X_train = train.tensors[0]
X_test, y_test = test.tensors


def make_mlp():
    return get_model("mlp", in_features=64, num_classes=10,
                     hidden=(128, 128, 128))


pool = train_models(make_mlp, train, n_models=6, epochs=20, batch_size=64)
base = [evaluate(model, test)["accuracy"] for model in pool]
print(f"{len(pool)} base models: test accuracy {np.mean(base):.3f} "
      f"(from {min(base):.3f} to {max(base):.3f})")

# %%
# Merge random subsets
# --------------------
# For 2 to 6 models, two random subsets of the pool (the first model of a
# subset is the reference), merged with each aligner.

aligners = {"Identity": IdentityAligner, "Permutation": PermutationAligner,
            "CCA": CCAAligner}
rng = np.random.default_rng(0)
records = []
for n_models in range(2, len(pool) + 1):
    for repeat in range(2):
        members = rng.permutation(len(pool))[:n_models]
        models = [pool[i] for i in members]
        for name, aligner in aligners.items():
            merger = ModelMerger(models, aligner()).fit(X_train)
            records.append({"aligner": name, "n_models": n_models,
                            "accuracy": merger.score(X_test, y_test)})
        records.append({"aligner": "ensemble", "n_models": n_models,
                        "accuracy": ensemble_accuracy(models, test)})

# %%
# Mean test accuracy per number of merged models
# (:func:`skmerge.diagnostics.summarize_results`):

summary = summarize_results(records)
print("models      " + "".join(f"{n:>7}" for n in summary["CCA"]["n_models"]))
for name, row in summary.items():
    print(f"{name:<12}" + "".join(f"{mean:7.3f}" for mean in row["mean"]))

# %%
# Accuracy against the number of merged models
# --------------------------------------------
# Mean and standard deviation over the subsets, with
# :func:`skmerge.plotting.plot_accuracy_vs_models`.

fig = plot_accuracy_vs_models(
    records, baselines={"base models (mean)": np.mean(base)})
fig.axes[0].set_ylabel("test accuracy")
plt.show()
