"""Feature spaces of a network: find them, transform them, check them.

A *feature space* is a set of channels that must share one transform when a
model is re-expressed in another basis (aligned to a reference model before
averaging): the rows of the layer(s) producing it, the columns of the layers
consuming it, and the places (taps) where its activations are observed.

- :func:`find_spaces` captures a model with torch.export and finds its spaces.
- :func:`apply_transforms` re-expresses a state_dict space by space.
- :func:`permute_model` / :func:`check_spaces`: the self-check that permuting
  every space at random leaves the model's function unchanged.
- :class:`Space`, :class:`ParamSlice`, :class:`Tap`, :class:`GraphTap`
  describe spaces, also by hand for models torch.export cannot capture.
"""

from ._apply import apply_transforms
from ._permute import check_spaces, permute_model, random_permutations
from ._find import find_spaces
from ._spaces import AveragingFallbackWarning, GraphTap, ParamSlice, Space, Tap, UnsupportedOperationError

__all__ = [
    "AveragingFallbackWarning",
    "GraphTap",
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
