"""Feature spaces of a network: find them, transform them, check them.

A *feature space* is a set of channels that must share one transform when a
model is re-expressed in another basis (aligned to a reference model before
averaging): the rows of the layer(s) producing it, the columns of the layers
consuming it, and the places (taps) where its activations are observed.

- :func:`find_spaces` traces a model with torch.fx and finds its spaces.
- :func:`apply_transforms` re-expresses a state_dict space by space.
- :func:`permute_model` / :func:`check_spaces`: the self-check that permuting
  every space at random leaves the model's function unchanged.
- :class:`Space`, :class:`ParamSlice`, :class:`Tap` describe spaces, also by
  hand for models torch.fx cannot trace.
"""

from ._apply import apply_transforms
from ._permute import check_spaces, permute_model, random_permutations
from ._spaces import ParamSlice, Space, Tap, UnsupportedOperationError
from ._trace import find_spaces

__all__ = [
    "ParamSlice",
    "Space",
    "Tap",
    "UnsupportedOperationError",
    "apply_transforms",
    "check_spaces",
    "find_spaces",
    "permute_model",
    "random_permutations",
]
