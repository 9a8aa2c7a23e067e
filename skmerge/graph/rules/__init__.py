"""Rules of the walk, one module per op family.

Each module registers functions ``rule(walker, node) -> labels of the output``
for the ATen ops it knows with :func:`rule`:

- :mod:`.elementwise`: position-wise ops (activations, arithmetic, casts,
  dropout); any op tagged ``pointwise`` by PyTorch falls here too;
- :mod:`.shape`: views, permutations, slicing, splitting, concatenation;
  followed by applying the op to the labels themselves;
- :mod:`.linear`: layers with weights (Linear, Conv, Embedding, ``addmm``);
- :mod:`.norms`: BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm;
- :mod:`.reduce`: reductions, pooling, softmax and other ops along one axis;
- :mod:`.attention`: matrix products of features (``q @ k.T``, ``att @ v``)
  and ``scaled_dot_product_attention``;
- :mod:`.recurrent`: LSTM and GRU.

Adding an op means adding a function to one of these modules (and a test).
"""

from ._registry import RULES, lookup, rule
from . import elementwise, shape, linear, norms, reduce, attention, recurrent  # noqa: E402,F401  (register)

__all__ = ["RULES", "lookup", "rule"]
