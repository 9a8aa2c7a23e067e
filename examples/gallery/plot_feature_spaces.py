"""
Inspect the feature spaces of a small CNN
=========================================

Before merging, skmerge has to know which channels of a network must share
one transform: a *feature space* is the set of parameter rows that produce
some channels, the input columns of the layers that read them, and the
places (taps) where their activations are observed. A residual addition
joins the spaces of its two inputs; a flatten turns each channel into a
block of input columns of the next linear layer.
:func:`skmerge.graph.find_spaces` finds them by tracing the model with
``torch.fx``; nothing is written by hand per architecture. See
:doc:`/user_guide/spaces` for the rules.
"""

import matplotlib.pyplot as plt
import torch
from torch import nn

from skmerge.datasets import load_digits
from skmerge.graph import check_spaces, find_spaces, permute_model
from skmerge.models import get_model

torch.set_num_threads(1)


# %%
# A small residual CNN for 8x8 digits
# -----------------------------------
# A stem (convolution, BatchNorm, ReLU), one residual block whose output is
# added to the stem's, a max-pool, and a two-layer classifier on the
# flattened feature map.


class SmallCNN(nn.Module):
    def __init__(self, width=8, hidden=32, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width),
            nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(width * 4 * 4, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes))

    def forward(self, x):
        x = self.stem(x)
        # The residual addition: stem and block write into one space.
        x = torch.relu(x + self.block(x))
        return self.head(self.pool(x))


model = SmallCNN()
images = load_digits("train").tensors[0][:32]  # any batch the model accepts
spaces = find_spaces(model, images)

# %%
# One line per space: its name, its number of channels and how many
# parameter slices produce it, read it, and where it is observed.

print(f"{'space':<22}{'dim':>4}{'producers':>11}{'consumers':>11}{'taps':>6}")
for space in spaces:
    print(f"{space.name:<22}{space.dim:>4}{len(space.producers):>11}"
          f"{len(space.consumers):>11}{len(space.taps):>6}")

# %%
# The first space is the residual stream: the stem's convolution and the
# block's last convolution write into it (with their BatchNorm parameters
# and running statistics), and the block's first convolution and the
# classifier read it. The classifier reads it after the flatten, so each
# channel is a block of 4 x 4 = 16 input columns.

print(spaces[0])

# %%
# The self-check
# --------------
# If the spaces are right, permuting every space at random leaves the
# model's function unchanged. :func:`~skmerge.graph.permute_model` returns
# such a permuted copy: its weights differ, its outputs do not.
# (:func:`~skmerge.graph.check_spaces` runs the same check and raises an
# error on a mismatch; ``ModelMerger(self_check=True)`` calls it before
# merging.)

permuted, _ = permute_model(model, spaces=spaces, seed=0)
with torch.no_grad():
    before, after = model.eval()(images), permuted.eval()(images)
first = "stem.0.weight"
changed = not torch.equal(model.state_dict()[first],
                          permuted.state_dict()[first])
print(f"{first} changed by the permutation: {changed}")
print(f"largest output difference: {(before - after).abs().max():.2e}")
check_spaces(model, images)

fig, ax = plt.subplots(figsize=(3.6, 3.4), layout="constrained")
ax.scatter(before.flatten(), after.flatten(), s=12)
ax.axline((0, 0), slope=1, color="0.6", linestyle=":", zorder=0)
ax.set_xlabel("outputs of the model")
ax.set_ylabel("outputs of the permuted copy")
plt.show()

# %%
# The library's ResNet20
# ----------------------
# The same call on a CIFAR-style ResNet20 (here at a quarter of its width):
# each stage's residual stream is one space shared by all its blocks, and
# every block adds one inner space.

resnet = get_model("resnet20", in_channels=1, num_classes=10, width=0.25)
for space in find_spaces(resnet, images):
    print(f"{space.name:<34} dim {space.dim:>3}, {len(space.taps)} taps")
