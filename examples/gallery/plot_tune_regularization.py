"""
Tune the CCA regularization with GridSearchCV
=============================================

:class:`~skmerge.CCAAligner` shrinks the covariances it whitens with
(``regularization=r`` in [0, 1]: 0 is plain CCA, 1 the orthogonal
Procrustes rotation). With little alignment data the covariances of wide
layers are noisy and some shrinkage helps. :class:`~skmerge.ModelMerger` is
a scikit-learn meta-estimator: its ``score`` is the accuracy of the merged
model and ``get_params`` exposes the aligner's parameters as
``aligner__*``, so :class:`~sklearn.model_selection.GridSearchCV` picks
``r`` by cross-validation on labelled alignment images, with no test data.
"""

import matplotlib.pyplot as plt
import torch
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from skmerge import CCAAligner, ModelMerger
from skmerge.datasets import load_digits
from skmerge.models import get_model
from skmerge.training import train_models

torch.set_num_threads(1)  # tiny models: one thread is the fastest

train, test = load_digits("train"), load_digits("test")
X_test, y_test = test.tensors


def make_mlp():
    return get_model("mlp", in_features=64, num_classes=10,
                     hidden=(128, 128, 128))


models = train_models(make_mlp, train, n_models=3, epochs=20, batch_size=64)

# %%
# The search
# ----------
# Only 450 labelled images to align on: each training fold of the 3-fold
# search has 300 images for hidden layers of 128 units. Every candidate
# merges the three models on the training folds and is scored (accuracy of
# the merged model) on the held-out fold. ``clone`` shares the source
# models instead of copying them, so the search stays cheap.

X_align, y_align = train.tensors[0][:450], train.tensors[1][:450]
grid = [0.0, 0.01, 0.03, 0.1, 0.3, 1.0]
search = GridSearchCV(
    ModelMerger(models, CCAAligner()),
    {"aligner__regularization": grid},
    cv=StratifiedKFold(n_splits=3, shuffle=True, random_state=0),
)
search.fit(X_align, y_align)
print("chosen:", search.best_params_)
print(f"test accuracy of the refitted merger: "
      f"{search.score(X_test, y_test):.3f}")

# %%
# Cross-validated accuracy against the regularization, next to what each
# value would have given on the test images (for this illustration only:
# the choice above never saw them).

cv_mean = search.cv_results_["mean_test_score"]
cv_std = search.cv_results_["std_test_score"]
test_scores = [
    ModelMerger(models, CCAAligner(regularization=r))
    .fit(X_align).score(X_test, y_test)
    for r in grid
]
for r, cv, acc in zip(grid, cv_mean, test_scores):
    print(f"r={r:<5g} CV accuracy {cv:.3f}   test accuracy {acc:.3f}")

positions = range(len(grid))
fig, ax = plt.subplots(figsize=(6.4, 3.4), layout="constrained")
ax.errorbar(positions, cv_mean, yerr=cv_std, marker="o", capsize=3,
            label="cross-validated (alignment images)")
ax.plot(positions, test_scores, marker="s", label="test images")
ax.set_xticks(list(positions), [f"{r:g}" for r in grid])
ax.set_xlabel("aligner__regularization")
ax.set_ylabel("accuracy of the merged model")
ax.legend()
plt.show()
