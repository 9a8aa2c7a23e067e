"""
Correlations and interpolation barriers
=======================================

Two diagnostics of :mod:`skmerge.diagnostics`, drawn by
:mod:`skmerge.plotting` (``pip install skmerge[plot]``):

* are the hidden features of two networks one to one? If they were, each
  neuron of the reference would have one highly correlated neuron in the
  other model and a permutation would be the right alignment;
* is the straight line between the two networks' weights a good path once
  they are aligned? The *barrier* is the largest drop of accuracy (or rise
  of loss) along it, compared with the chord between the end points.

See :doc:`/user_guide/diagnostics` for how the numbers are computed.
"""

import matplotlib.pyplot as plt
import torch

from skmerge import CCAAligner, ModelMerger, PermutationAligner
from skmerge.datasets import load_digits
from skmerge.diagnostics import correlation_summary, interpolation_path
from skmerge.models import get_model
from skmerge.plotting import plot_correlation_distributions, plot_interpolation
from skmerge.training import train_models

torch.set_num_threads(1)  # tiny models: one thread is the fastest

train, test = load_digits("train"), load_digits("test")
X_train = train.tensors[0]


def make_mlp():
    return get_model("mlp", in_features=64, num_classes=10,
                     hidden=(128, 128, 128))


models = train_models(make_mlp, train, n_models=2, epochs=20, batch_size=64)
cca = ModelMerger(models, CCAAligner()).fit(X_train)

# %%
# Correlations against CCA coefficients
# -------------------------------------
# One row per hidden layer. Left: for every neuron of the reference, its
# largest (top-1) and second largest (top-2) absolute correlation with the
# other model's neurons. Right: the two largest normalized coefficients of
# the CCA mapping that rebuilds that neuron. Top-2 correlations well above
# zero say that a feature is spread over several neurons, which a
# permutation cannot express and a linear map can. Everything is computed
# from the statistics the merger accumulated during ``fit``.

fig = plot_correlation_distributions(cca)

for index in range(len(cca.spaces_)):
    s = correlation_summary(cca, index)
    print(f"{s['space_name']:<11} mean |corr|: "
          f"top-1 {s['top1_correlation'].mean():.2f}, "
          f"top-2 {s['top2_correlation'].mean():.2f}")

# %%
# Linear interpolation, before and after alignment
# ------------------------------------------------
# Accuracy and loss on the test images along
# ``(1 - alpha) * model_0 + alpha * model_1``: dashed with the raw weights,
# solid after aligning model 1 to model 0. At ``alpha = 0.5`` the solid curve
# is the merged model.

permutation = ModelMerger(models, PermutationAligner()).fit(X_train)
fig, axes = plt.subplots(2, 2, figsize=(9, 6.4), layout="constrained")
for merger, row in zip((permutation, cca), axes):
    path = interpolation_path(merger, *test.tensors)
    plot_interpolation(path, axes=row)
    row[0].set_title(path["aligner"], loc="left", fontsize="medium")
    print(f"{path['aligner']:<18} accuracy barrier: "
          f"before {path['accuracy_barrier_before']:.3f}, "
          f"after {path['accuracy_barrier_after']:.3f}")
