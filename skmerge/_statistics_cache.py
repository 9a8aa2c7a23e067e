"""Statistics of the last passes, reused when the same models see the same data again.

``GridSearchCV(ModelMerger(...), {"aligner__regularization": [...]})`` fits
one merger per candidate and fold; the statistics of a fold do not depend on
the aligner, so every candidate after the first only solves and transforms.
An entry is keyed by the models' tensors (identity and version counter: an
in-place update of a weight, an optimizer step or ``load_state_dict``, is a
new key), the content of the alignment data (tensors and arrays; loaders and
datasets are not cached) and every setting the pass depends on. The entries
hold weak references to the tensors they were computed from, so a key whose
tensors were freed (and whose ids were reused) never matches. Two entries are
kept; :func:`clear_statistics_cache` drops them. The statistics of a
``combine`` strategy (Fisher information, RegMean's Gram matrices; they do
not depend on the aligner either) are kept the same way, in a cache of their
own (``combination_cache``) so that they never evict the spaces' statistics.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import joblib
import numpy as np
import torch

__all__ = ["statistics_cache", "combination_cache", "clear_statistics_cache", "data_key"]

_SIZE = 2


def data_key(X) -> str | None:
    """A content hash of array or tensor data; None for datasets, loaders and streams."""
    if isinstance(X, torch.Tensor):
        if X.is_sparse or X.device.type == "meta":
            return None
        return "tensor:" + joblib.hash((str(X.dtype), tuple(X.shape), X.detach().cpu().numpy()))
    if isinstance(X, np.ndarray):
        return "array:" + joblib.hash(X)
    return None


class _Cache:
    def __init__(self):
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def model_key(models) -> tuple:
        """Identity and version of every tensor of every model (and weak references to check them)."""
        key, refs = [], []
        for model in models:
            for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(
                    model.named_buffers(remove_duplicate=False)):
                key.append((name, id(tensor), tensor._version, tuple(tensor.shape), str(tensor.device)))
                refs.append(weakref.ref(tensor))
        return tuple(key), refs

    def get(self, key):
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            refs, value = entry
            if any(ref() is None for ref in refs):  # a tensor died: its id may be reused
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return value

    def put(self, key, refs, value) -> None:
        with self._lock:
            self._entries[key] = (refs, value)
            self._entries.move_to_end(key)
            while len(self._entries) > _SIZE:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


statistics_cache = _Cache()
combination_cache = _Cache()


def clear_statistics_cache() -> None:
    """Forget the statistics kept for reuse (the spaces' are small: O(n_models d^2) per space)."""
    statistics_cache.clear()
    combination_cache.clear()
