"""
Persist and reload a fitted merger
==================================

A fitted :class:`~skmerge.ModelMerger` is an ordinary picklable scikit-learn
estimator: :func:`joblib.dump` saves it with its merged model, its fitted
aligners and the statistics they were fitted from. Tensors are moved to the
CPU in the file, so a merger fitted on a GPU machine loads on a CPU-only one.
"""

import shutil
import tempfile
from pathlib import Path

import joblib
import matplotlib.pyplot as plt
import numpy as np
import torch

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


models = train_models(make_mlp, train, n_models=2, epochs=20, batch_size=64)
merger = ModelMerger(models, CCAAligner()).fit(train.tensors[0])
print(f"fitted merger: test accuracy {merger.score(X_test, y_test):.3f}")

# %%
# Save and load
# -------------
# The file holds everything the merger was given and fitted: the source
# models (a constructor parameter), the merged model, the aligners and the
# statistics they were solved from.

folder = Path(tempfile.mkdtemp())
path = folder / "merger.joblib"
joblib.dump(merger, path)
print(f"{path.name}: {path.stat().st_size / 1e6:.2f} MB")

loaded = joblib.load(path)
print(f"loaded merger: test accuracy {loaded.score(X_test, y_test):.3f}")

# %%
# The reloaded merger predicts exactly what the original does, and its
# fitted aligners (one per feature space and model) are still there.

same = np.array_equal(loaded.predict_logits(X_test),
                      merger.predict_logits(X_test))
print("identical outputs:", same)
for space, aligners in zip(loaded.spaces_, loaded.aligners_):
    aligner = aligners[1]  # model 1 aligned to the reference, model 0
    print(f"space {space.name!r}: {type(aligner).__name__}, "
          f"mapping_ of shape {tuple(aligner.mapping_.shape)}")

# %%
# The reloaded merger classifies digits like any scikit-learn classifier:
# the first test images with the labels it predicts.

predicted = loaded.predict(X_test[:8])
fig, axes = plt.subplots(1, 8, figsize=(8, 1.5), layout="constrained")
for ax, image, label, truth in zip(axes, X_test, predicted, y_test):
    ax.imshow(image[0], cmap="gray_r")
    ax.set_title(f"{label}" + ("" if label == truth else f" ({truth})"))
    ax.set_axis_off()
plt.show()

# %%
# Only the merged network
# -----------------------
# To ship just the network, save its ``state_dict`` with torch and load it
# into a new model of the same architecture.

torch.save(merger.merged_model_.state_dict(), folder / "merged.pt")
network = make_mlp()
network.load_state_dict(torch.load(folder / "merged.pt"))
network.eval()
with torch.no_grad():
    accuracy = (network(X_test).argmax(1) == y_test).float().mean().item()
print(f"plain torch model: test accuracy {accuracy:.3f}")

shutil.rmtree(folder)  # the files were for this example only
