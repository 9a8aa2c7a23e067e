"""
Merge two models with each aligner
==================================

Two small networks trained from different random seeds are merged into one
with every aligner of skmerge. Plain averaging of the weights
(:class:`~skmerge.IdentityAligner`) ignores that neuron ``i`` of one network
has no reason to do the job of neuron ``i`` of the other; the other aligners
first express the second model's hidden features in the basis of the first
(:class:`~skmerge.PermutationAligner` by matching neurons one to one,
:class:`~skmerge.CCAAligner` and :class:`~skmerge.ProcrustesAligner` by a
linear map, :class:`~skmerge.OptimalTransportAligner` by a soft matching) and
only then average.
"""

import matplotlib.pyplot as plt
import torch

from skmerge import (
    CCAAligner,
    IdentityAligner,
    ModelMerger,
    OptimalTransportAligner,
    PermutationAligner,
    ProcrustesAligner,
)
from skmerge.datasets import load_digits
from skmerge.models import get_model
from skmerge.training import ensemble_accuracy, evaluate, train_models

torch.set_num_threads(1)  # tiny models: one thread is the fastest

# %%
# Two base models
# ---------------
# An MLP with three hidden layers of 128 units, trained twice on the 1,198
# training images of the digits data (8x8 pixels), with seeds 0 and 1.

train, test = load_digits("train"), load_digits("test")
X_train = train.tensors[0]
X_test, y_test = test.tensors


def make_mlp():
    return get_model("mlp", in_features=64, num_classes=10,
                     hidden=(128, 128, 128))


models = train_models(make_mlp, train, n_models=2, epochs=20, batch_size=64)
for seed, model in enumerate(models):
    accuracy = evaluate(model, test)["accuracy"]
    print(f"model {seed}: test accuracy {accuracy:.3f}")
ensemble = ensemble_accuracy(models, test)
print(f"ensemble of both (runs two models): {ensemble:.3f}")

# %%
# One merge per aligner
# ---------------------
# :class:`~skmerge.ModelMerger` finds the feature spaces of the network,
# streams the training images once through both models, fits one aligner
# per space against the reference (model 0) and averages the aligned
# weights. Swapping the method is one argument.

aligners = {
    "Identity": IdentityAligner(),
    "Permutation": PermutationAligner(),
    "CCA": CCAAligner(),
    "Procrustes": ProcrustesAligner(),
    "Optimal transport + REPAIR": OptimalTransportAligner(),
}
scores = {}
for name, aligner in aligners.items():
    # A soft plan averages features, which shrinks them layer after layer:
    # without BatchNorm, REPAIR renormalizes the merged model (the merger
    # warns when neither does).
    repair = isinstance(aligner, OptimalTransportAligner)
    merger = ModelMerger(models, aligner, repair=repair).fit(X_train)
    scores[name] = merger.score(X_test, y_test)
    print(f"{name:<26} merged accuracy {scores[name]:.3f}"
          f"   ({merger.timings_['total']:.2f} s)")

# %%
# The merged model is a plain ``torch.nn.Module`` of the same architecture:
# one model to run instead of two.

print(type(merger.merged_model_).__name__,
      sum(p.numel() for p in merger.merged_model_.parameters()), "parameters")

# %%
# Side by side
# ------------

base = sum(evaluate(m, test)["accuracy"] for m in models) / len(models)
fig, ax = plt.subplots(figsize=(6.4, 3.2), layout="constrained")
bars = ax.barh(list(scores), list(scores.values()), color="C0")
ax.bar_label(bars, fmt="%.3f", label_type="center", color="white")
ax.axvline(base, color="k", linestyle=":")
ax.invert_yaxis()
ax.set_xlim(0, 1)
ax.set_xlabel("test accuracy of the merged model")
ax.set_title("dotted: mean of the two base models", fontsize="medium",
             loc="left")
plt.show()
