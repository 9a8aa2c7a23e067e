"""Learned merge coefficients: non-uniform averaging of aligned models (AdaMerging-style).

A fitted :class:`~skmerge.ModelMerger` expresses every model in the
reference's feature basis and averages the aligned parameters with fixed
weights. :class:`LearnedCoefficientMerger` keeps that alignment and learns the
averaging coefficients instead, by gradient descent on a small labelled set,
one coefficient vector per parameter tensor or one for the whole network
(after AdaMerging: Yang et al., "AdaMerging: Adaptive Model Merging for
Multi-Task Learning", ICLR 2024, here with a supervised loss).
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import NotFittedError
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ._batches import as_loader, split_batch
from .batchnorm import _BN_TYPES, has_batchnorm, reset_bn_stats
from ._prediction import MergedModelClassifierMixin
from .merge import _module_device, _on_cpu

__all__ = ["LearnedCoefficientMerger"]

_GRANULARITIES = ("tensor", "model")


class LearnedCoefficientMerger(MergedModelClassifierMixin, BaseEstimator):
    """Learn the averaging coefficients of aligned models on labelled data.

    Starting from a fitted :class:`~skmerge.ModelMerger` (its aligned models,
    :meth:`~skmerge.ModelMerger.aligned_state_dicts`), every parameter tensor
    ``p`` of the merged model becomes a convex combination of the aligned
    models' tensors ``p_k``::

        p = sum_k c_k(p) p_k,        c(p) = softmax(a_g(p))

    with free logits ``a_g`` per group ``g``: one group per parameter tensor
    (``granularity="tensor"``, layer-wise coefficients) or one for the whole
    network (``granularity="model"``). The logits start at
    ``log(merger.weights_)``, so before the first step the model *is* the
    merger's own average, and are trained with Adam to minimize the loss
    (cross-entropy by default) of the combined model on ``(X, y)``; the
    alignment itself and every aligned parameter stay fixed, only the
    coefficients move, so they always lie on the simplex. A model whose merger
    weight is 0 keeps coefficient 0.

    During learning dropout is off and BatchNorm layers normalize with the
    statistics of each batch (the running statistics of the merged model
    describe the initial average, not the changing combination); at the end
    the BatchNorm running statistics of the learned model are re-estimated on
    the inputs of ``X`` with :func:`~skmerge.batchnorm.reset_bn_stats`. Other
    buffers keep the merger's average.

    Parameters
    ----------
    merger : ModelMerger
        A :class:`~skmerge.ModelMerger` (or a subclass such as
        :class:`~skmerge.weight_matching.WeightMatchingMerger`), fitted or not.
        A fitted merger is used as it is and never modified; an unfitted one is
        cloned and the clone is fitted on the inputs of ``X`` (``merger_``).
        :func:`sklearn.base.clone` (and so ``GridSearchCV``) clones the merger
        into an unfitted one; wrap a fitted merger in
        :class:`sklearn.frozen.FrozenEstimator` to keep its alignment through
        cloning.
    granularity : {"tensor", "model"}, default="tensor"
        ``"tensor"``: one coefficient vector per parameter tensor (weights and
        biases of a layer have their own); ``"model"``: one vector for the
        whole network.
    n_epochs : int, default=10
        Passes over ``(X, y)``.
    learning_rate : float, default=0.05
        Adam's learning rate on the logits (0 keeps the initial coefficients,
        the merger's own average).
    batch_size : int, default=128
        Mini-batch size for array, tensor and Dataset inputs (a DataLoader is
        used as it is).
    loss : "cross_entropy" or callable, default="cross_entropy"
        ``"cross_entropy"``: :func:`torch.nn.functional.cross_entropy` of the
        outputs against integer class labels (or class probabilities). A
        callable gets ``(outputs, targets)`` on the merger's device and returns
        a scalar tensor to minimize (averaged over the batch).
    n_iter_no_change : int, default=5
        With ``validation`` data in :meth:`fit`: stop after this many epochs
        without a lower validation loss. Ignored without validation data.
    random_state : int, RandomState instance or None, default=None
        Seeds the order of the samples in each epoch.
    verbose : bool, default=False
        Show a progress bar over the epochs (with the loss).

    Attributes
    ----------
    merger_ : ModelMerger
        The fitted merger whose aligned models are combined (``merger`` itself
        when it was fitted).
    merged_model_ : torch.nn.Module
        The model with the learned coefficients, in evaluation mode on
        ``device_``, BatchNorm statistics re-estimated on ``X``.
    coefficients_ : dict of str to numpy.ndarray, or numpy.ndarray
        ``"tensor"``: parameter name -> coefficients of shape ``(n_models,)``;
        ``"model"``: one array of shape ``(n_models,)``. Non-negative, summing
        to one.
    loss_curve_ : list of float
        Mean training loss of each epoch (over its batches, measured before
        each step).
    validation_loss_curve_ : list of float or None
        With validation data: the validation loss of the initial coefficients,
        then after each epoch (``n_iter_ + 1`` values); None otherwise.
    best_epoch_ : int
        Number of epochs after which the kept coefficients were reached: the
        one with the lowest validation loss (0 means the merger's own average
        was best), or ``n_iter_`` without validation data.
    n_iter_ : int
        Number of epochs run.
    n_models_ : int
        Number of merged models.
    classes_ : numpy.ndarray
        ``arange(n_outputs)``: class indices predicted by ``predict``.
    n_features_in_ : int
        Number of input features, set when ``X`` is a 2-D array or tensor.
    device_ : torch.device
        The merger's device, where learning and prediction run.

    See Also
    --------
    skmerge.ModelMerger.merge_with_weights : fixed, user-chosen weights per model.

    Notes
    -----
    The learner holds all aligned models in memory (``n_models`` copies of
    the parameters) and backpropagates through the whole network once per
    batch. The coefficients are fitted to ``(X, y)``: with many groups
    (``"tensor"``) and few labelled samples they can overfit it, so measure
    the result on other data (or pass ``validation`` to :meth:`fit`).

    Examples
    --------
    >>> import torch
    >>> from skmerge import ModelMerger, PermutationAligner
    >>> from skmerge.coefficients import LearnedCoefficientMerger
    >>> _ = torch.manual_seed(0)
    >>> models = [torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
    ...                               torch.nn.Linear(16, 3)) for _ in range(2)]
    >>> X, y = torch.randn(256, 4), torch.randint(0, 3, (256,))
    >>> merger = ModelMerger(models, PermutationAligner(), device="cpu").fit(X)
    >>> learner = LearnedCoefficientMerger(merger, n_epochs=2, random_state=0).fit(X, y)
    >>> sorted(learner.coefficients_)
    ['0.bias', '0.weight', '2.bias', '2.weight']
    >>> learner.coefficients_["0.weight"].shape
    (2,)
    >>> learner.predict(X[:5]).shape
    (5,)
    """

    def __init__(
        self,
        merger,
        granularity: str = "tensor",
        n_epochs: int = 10,
        learning_rate: float = 0.05,
        batch_size: int = 128,
        loss: str | Callable = "cross_entropy",
        n_iter_no_change: int = 5,
        random_state=None,
        verbose: bool = False,
    ):
        self.merger = merger
        self.granularity = granularity
        self.n_epochs = n_epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.loss = loss
        self.n_iter_no_change = n_iter_no_change
        self.random_state = random_state
        self.verbose = verbose

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Labels may come inside X (a Dataset or DataLoader of (x, y) pairs).
        tags.target_tags.required = False
        tags.input_tags.three_d_array = True
        return tags

    # ---------------------------------------------------------------- validation
    def _check_params(self) -> None:
        merger = self.merger
        if not (hasattr(merger, "aligned_state_dicts") and hasattr(merger, "fit")):
            raise TypeError("merger must be a skmerge ModelMerger (with aligned_state_dicts), "
                            f"got {type(merger).__name__}.")
        if not isinstance(self.granularity, str) or self.granularity not in _GRANULARITIES:
            raise ValueError(f"granularity must be one of {_GRANULARITIES}, "
                             f"got {self.granularity!r}.")
        for name in ("n_epochs", "batch_size", "n_iter_no_change"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        rate = self.learning_rate
        if (not isinstance(rate, numbers.Real) or isinstance(rate, bool) or not math.isfinite(rate)
                or rate < 0):
            raise ValueError(f"learning_rate must be a finite number >= 0, got {rate!r}.")
        if not callable(self.loss) and self.loss != "cross_entropy":
            raise ValueError(f"loss must be 'cross_entropy' or a callable, got {self.loss!r}.")

    def _fitted_merger(self, X):
        try:
            check_is_fitted(self.merger, "merged_model_")
        except NotFittedError:
            return clone(self.merger).fit(X)
        return self.merger

    # ----------------------------------------------------------------------- fit
    def fit(self, X, y=None, *, validation=None):
        """Learn the coefficients on ``(X, y)`` and build ``merged_model_``.

        Parameters
        ----------
        X : torch.Tensor, numpy.ndarray, Dataset or DataLoader
            Labelled held-out inputs (first axis = samples), or a dataset or
            loader of ``(x, y)`` pairs. Not the test data: the coefficients
            are fitted to it.
        y : array-like of shape (n_samples,), optional
            Labels of array or tensor inputs; must be None when ``X`` yields
            ``(x, y)`` pairs.
        validation : tuple (X_val, y_val), Dataset or DataLoader, optional
            Labelled data for early stopping: the validation loss is measured
            before learning and after each epoch, learning stops after
            ``n_iter_no_change`` epochs without improvement, and the
            coefficients with the lowest validation loss are kept.

        Returns
        -------
        self : LearnedCoefficientMerger
        """
        self._check_params()
        train = _labelled_dataset(X, y, self.batch_size, "X")
        valid = None
        if isinstance(validation, (tuple, list)) and len(validation) == 2:
            valid = _labelled_dataset(validation[0], validation[1], self.batch_size, "validation")
        elif validation is not None:
            valid = _labelled_dataset(validation, None, self.batch_size, "validation")

        merger = self._fitted_merger(X)
        device = merger.device_
        combination = _Combination(merger, self.granularity)
        with np.errstate(divide="ignore"):
            initial = np.log(np.asarray(merger.weights_, dtype=np.float64))  # -inf for weight 0
        logit_dtype = torch.float32 if device.type == "mps" else torch.float64  # no float64 on MPS
        logits = nn.Parameter(torch.tensor(np.tile(initial, (combination.n_groups, 1)),
                                           dtype=logit_dtype, device=device))
        optimizer = torch.optim.Adam([logits], lr=float(self.learning_rate))
        loss_fn = self.loss if callable(self.loss) else _cross_entropy
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        train_loader = _loader(train, self.batch_size, torch.Generator().manual_seed(seed))

        loss_curve, validation_curve = [], None
        best, best_epoch, n_iter, n_outputs = logits.detach().clone(), 0, 0, None
        if valid is not None:
            validation_curve = [self._mean_loss(combination, logits, valid, loss_fn)]
            stale = 0
        progress = tqdm(range(self.n_epochs), desc="Learning coefficients", unit="epoch",
                        disable=not self.verbose, leave=False)
        for epoch in progress:
            total, seen = 0.0, 0
            for inputs, targets in combination.batches(train_loader):
                outputs = combination.forward(logits, inputs)
                n_outputs = _n_outputs(outputs) if n_outputs is None else n_outputs
                value = _checked_loss(loss_fn(outputs, targets), epoch)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                total += float(value.detach()) * len(inputs)
                seen += len(inputs)
            if seen == 0:
                raise ValueError("X is empty (or holds only batches of one sample, which "
                                 "BatchNorm cannot use).")
            loss_curve.append(total / seen)
            n_iter = epoch + 1
            progress.set_postfix(loss=f"{loss_curve[-1]:.4f}")
            if valid is None:
                best, best_epoch = logits.detach().clone(), n_iter
                continue
            validation_curve.append(self._mean_loss(combination, logits, valid, loss_fn))
            if validation_curve[-1] < validation_curve[best_epoch]:
                best, best_epoch, stale = logits.detach().clone(), n_iter, 0
            else:
                stale += 1
                if stale >= self.n_iter_no_change:
                    break
        progress.close()

        model = combination.model(best)
        if has_batchnorm(model):
            reset_bn_stats(model, _loader(train, self.batch_size), device=device,
                           verbose=self.verbose)
        coefficients = torch.softmax(best, dim=1).cpu().numpy().astype(np.float64)
        if self.granularity == "tensor":
            self.coefficients_ = {name: coefficients[combination.groups[name]].copy()
                                  for name in combination.names}
        else:
            self.coefficients_ = coefficients[0].copy()
        self.merger_ = merger
        self.merged_model_ = model.eval()
        self.loss_curve_ = loss_curve
        self.validation_loss_curve_ = validation_curve
        self.best_epoch_ = best_epoch
        self.n_iter_ = n_iter
        self.n_models_ = combination.n_models
        self.device_ = device
        self.classes_ = np.arange(n_outputs)
        self.__dict__.pop("n_features_in_", None)
        if isinstance(X, (torch.Tensor, np.ndarray)) and X.ndim == 2:
            self.n_features_in_ = int(X.shape[1])
        return self

    @torch.no_grad()
    def _mean_loss(self, combination, logits, dataset, loss_fn) -> float:
        """Loss over ``dataset`` (BatchNorm on batch statistics, as in learning)."""
        total, seen = 0.0, 0
        for inputs, targets in combination.batches(_loader(dataset, self.batch_size)):
            total += float(loss_fn(combination.forward(logits, inputs), targets)) * len(inputs)
            seen += len(inputs)
        if seen == 0:
            raise ValueError("The validation data is empty.")
        return total / seen

    # --------------------------------------------------------------- inference
    # ------------------------------------------------------------- persistence
    def __getstate__(self):
        # The learned model goes to the CPU so that a learner saved on a GPU
        # machine loads on a CPU-only one (the merger moves its own tensors).
        state = self.__dict__.copy()
        if "merged_model_" in state:
            state["merged_model_"] = _on_cpu(state["merged_model_"])
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        device = getattr(self, "device_", None)
        if device is not None and device.type == "cuda" and not torch.cuda.is_available():
            self.device_ = torch.device("cpu")
        if hasattr(self, "merged_model_") and _module_device(self.merged_model_) != self.device_:
            self.merged_model_.to(self.device_)


# ------------------------------------------------------------------- helpers
class _Combination:
    """The merged architecture with parameters ``sum_k softmax(logits[g])_k * aligned_k``.

    Holds the aligned models' parameters (stacked per name), the group of each
    parameter, and a private copy of the merged model that runs them through
    :func:`torch.func.functional_call`: in evaluation mode (no dropout) except
    its BatchNorm layers, which normalize with batch statistics.
    """

    def __init__(self, merger, granularity: str):
        template = merger.merged_model_
        self.template = template
        self.device = merger.device_
        self.n_models = len(merger.weights_)
        self.names = [name for name, p in template.named_parameters() if p.is_floating_point()]
        if not self.names:
            raise ValueError("The merged model has no floating-point parameters to combine.")
        aligned = merger.aligned_state_dicts()
        self.stacked = {name: [state[name].detach().to(self.device) for state in aligned]
                        for name in self.names}
        if granularity == "tensor":
            self.groups = {name: i for i, name in enumerate(self.names)}
        else:
            self.groups = dict.fromkeys(self.names, 0)
        self.n_groups = max(self.groups.values()) + 1
        self.dtype = self.stacked[self.names[0]][0].dtype
        self.working = copy.deepcopy(template).eval()
        for param in self.working.parameters():
            param.requires_grad_(False)
        self.batchnorm = [m for m in self.working.modules() if isinstance(m, _BN_TYPES)]
        for layer in self.batchnorm:
            layer.train()  # batch statistics; the running ones are re-estimated at the end

    def parameters(self, logits: torch.Tensor) -> dict:
        coefficients = torch.softmax(logits, dim=1)
        params = {}
        for name in self.names:
            tensors = self.stacked[name]
            c = coefficients[self.groups[name]].to(tensors[0].dtype)
            value = c[0] * tensors[0]  # the merger's order of summation
            for k in range(1, self.n_models):
                value = value + c[k] * tensors[k]
            params[name] = value
        return params

    def forward(self, logits: torch.Tensor, inputs: torch.Tensor):
        return functional_call(self.working, self.parameters(logits), (inputs,))

    def batches(self, loader: DataLoader):
        for inputs, targets in _pairs(loader, self.device, self.dtype):
            if self.batchnorm and len(inputs) < 2:
                continue  # BatchNorm cannot normalize a batch of one sample
            yield inputs, targets

    @torch.no_grad()
    def model(self, logits: torch.Tensor) -> nn.Module:
        """A new copy of the merged model with the combined parameters."""
        model = copy.deepcopy(self.template)
        state = model.state_dict()
        state.update(self.parameters(logits))
        model.load_state_dict(state)
        return model


def _checked_loss(value, epoch: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim != 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"loss must return a scalar tensor, got {shape}.")
    if not bool(torch.isfinite(value)):
        raise RuntimeError(f"The loss is not finite ({value.item()}) at epoch {epoch + 1}; "
                           "check the labels and the loss, or lower learning_rate.")
    return value


def _labelled_dataset(X, y, batch_size: int, name: str) -> Dataset | DataLoader:
    """A Dataset (or the user's DataLoader) of ``(x, y)`` pairs; fails early without labels."""
    if isinstance(X, (Dataset, DataLoader)):
        if y is not None:
            raise ValueError(f"{name} is a {type(X).__name__}: give its labels inside it, as "
                             "(x, y) pairs, not as a separate y.")
        data = X
    else:
        if y is None:
            raise ValueError(f"LearnedCoefficientMerger needs labels: pass y with {name}, or a "
                             "Dataset or DataLoader yielding (x, y) pairs.")
        if not isinstance(y, torch.Tensor):
            y = np.asarray(y)
            if y.dtype.kind not in "biuf":
                raise ValueError(f"The labels must be numeric class indices, got dtype {y.dtype}.")
        data = as_loader(X, batch_size, y=y).dataset
    first = next(iter(_loader(data, 2)), None)
    if first is None:
        raise ValueError(f"{name} is empty.")
    if split_batch(first)[1] is None:
        raise ValueError(f"LearnedCoefficientMerger needs labels, but {name} yields inputs "
                         "without them: yield (x, y) pairs.")
    return data


def _loader(data, batch_size: int, generator: torch.Generator | None = None) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    return DataLoader(data, batch_size=batch_size, shuffle=generator is not None,
                      generator=generator)


def _pairs(loader: DataLoader, device: torch.device, dtype: torch.dtype):
    """Yield ``(inputs, labels or None)`` on ``device``, floating inputs cast to ``dtype``."""
    for batch in loader:
        inputs, labels = split_batch(batch)
        inputs = torch.as_tensor(inputs)
        if inputs.is_floating_point():
            if not bool(torch.isfinite(inputs).all()):
                raise ValueError("The input data contains NaN or infinity.")
            inputs = inputs.to(device=device, dtype=dtype)
        else:
            inputs = inputs.to(device=device)
        if labels is not None:
            labels = torch.as_tensor(labels).to(device)
        yield inputs, labels


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if targets.is_floating_point() and targets.shape == outputs.shape:
        return F.cross_entropy(outputs, targets.to(outputs.dtype))  # class probabilities
    if targets.is_floating_point():
        if not bool((targets == targets.round()).all()):
            raise ValueError("Class labels must be integers (or class probabilities of the "
                             "outputs' shape).")
    targets = targets.long()
    n_classes = outputs.shape[1] if outputs.ndim > 1 else 1
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= n_classes):
        raise ValueError(f"Class labels must lie in [0, {n_classes}) for a model with "
                         f"{n_classes} outputs, got labels from {int(targets.min())} to "
                         f"{int(targets.max())}.")
    return F.cross_entropy(outputs, targets)


def _n_outputs(outputs) -> int:
    if not isinstance(outputs, torch.Tensor) or outputs.ndim < 2:
        return 1
    return int(outputs.shape[-1])
