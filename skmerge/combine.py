"""How the aligned models are combined: ``ModelMerger(combine=...)``.

After alignment every model is expressed in one feature basis, and
:class:`~skmerge.ModelMerger` averages them, uniformly or with its
``weights``. Two weighted alternatives from the model-merging literature:

* :class:`Fisher`: Fisher-weighted averaging (Matena and Raffel, "Merging
  Models with Fisher-Weighted Averaging", NeurIPS 2022): per parameter entry,
  ``sum_k w_k F_k theta_k / sum_k w_k F_k`` with ``F_k`` the diagonal Fisher
  information of model ``k`` on the alignment data, carried into the
  aligned basis;
* :class:`RegMean`: regression mean (Jin, Ren, Preotiuc-Pietro and Cheng,
  "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR
  2023): every Linear and Conv layer is the least-squares fit of all aligned
  models' outputs from their inputs, closed form from the inputs' Gram
  matrices; the other parameters are averaged.

``combine="fisher"`` and ``combine="regmean"`` use the defaults; pass an
instance to change them (``GridSearchCV`` reaches them as ``combine__*``).
"""

from __future__ import annotations

import numbers
import time
import warnings

import torch
from sklearn.base import BaseEstimator

from ._fisher import FisherSums, aligned_fisher, diagonal_fisher, fisher_average
from ._regmean import GramSums, input_grams, input_transform, regmean_layers, regmean_solve

__all__ = ["Fisher", "RegMean"]


def resolve_combine(value):
    """``None`` for uniform averaging, else a :class:`Fisher` or :class:`RegMean` instance."""
    if isinstance(value, str):
        options = {"uniform": None, "fisher": Fisher, "regmean": RegMean}
        if value not in options:
            raise ValueError(f"combine must be 'uniform', 'fisher', 'regmean' or a Fisher / RegMean "
                             f"instance, got {value!r}.")
        return None if options[value] is None else options[value]()
    if isinstance(value, (Fisher, RegMean)):
        value._check_params()
        return value
    raise TypeError(f"combine must be 'uniform', 'fisher', 'regmean' or a Fisher / RegMean instance, "
                    f"got {type(value).__name__}.")


def _on_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_on_cpu(v) for v in value]
    return value


class _Combination(BaseEstimator):
    """Shared: statistics on the data (``fit_statistics``), then ``merged_state`` of the aligned models.

    The statistics are measured in every model's own basis, so they do not
    depend on the aligner: a merger reuses them when only the aligner, the
    weights or the parameters outside ``_statistics_params`` change.
    """

    #: the parameters the statistics depend on
    _statistics_params: tuple = ()
    #: the fitted statistics (attributes set by ``fit_statistics``)
    _statistics_attrs: tuple = ()

    def statistics_key(self) -> tuple:
        """What the statistics depend on, besides the models and the data."""
        return (type(self).__name__,) + tuple(getattr(self, name) for name in self._statistics_params)

    def statistics(self) -> dict:
        """The fitted statistics, by attribute name."""
        return {name: getattr(self, name) for name in self._statistics_attrs}

    def use_statistics(self, statistics: dict):
        """Take statistics fitted before (by a combination of the same :meth:`statistics_key`)."""
        for name, value in statistics.items():
            setattr(self, name, value)
        return self

    def stream(self, merger, models, dtype, runner) -> _PassStream:
        """A :class:`_PassStream` that measures the statistics inside the merger's alignment pass."""
        raise NotImplementedError

    def __getstate__(self):
        # A combination fitted on a GPU loads on a CPU-only machine.
        return {key: _on_cpu(value) for key, value in self.__dict__.items()}

    def _transforms(self, merger, k: int) -> list:
        from .merge import _transform_of

        return [_transform_of(row[k]) for row in merger.aligners_]


class _PassStream:
    """A combination's statistics, fed by the merger's alignment pass as it runs.

    The merger asks its runner to also report ``keys`` (graph nodes or
    module paths), calls :meth:`observe` with every reported tensor of model
    ``k`` and :meth:`after_batch` once model ``k`` has seen a batch (with the
    output tensors of that forward pass); then
    :meth:`finish` sets the combination's statistics. ``seconds`` is the
    time spent in these calls, ``n_calls`` the number of (model, batch)
    runs seen.
    """

    keys: dict = {}

    def __init__(self) -> None:
        self.seconds, self.n_calls = 0.0, 0

    def observe(self, k: int, key: str, tensor: torch.Tensor) -> None:
        tick = time.perf_counter()
        self._observe(k, key, tensor)
        self.seconds += time.perf_counter() - tick

    def after_batch(self, k: int, inputs: torch.Tensor, outputs: tuple) -> None:
        tick = time.perf_counter()
        self._after_batch(k, inputs, outputs)
        self.n_calls += 1
        self.seconds += time.perf_counter() - tick

    def _observe(self, k, key, tensor) -> None:
        pass

    def _after_batch(self, k, inputs, outputs) -> None:
        pass

    def finish(self, merger, models, loader, dtype) -> None:
        raise NotImplementedError


class _FisherStream(_PassStream):
    """Fisher: each model's squared per-example gradients, batch by batch."""

    def __init__(self, combination, merger, models) -> None:
        super().__init__()
        self.combination = combination
        self.sums = [FisherSums(model, merger.device_, int(combination.random_state)) for model in models]

    def _after_batch(self, k, inputs, outputs) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There is a performance drop")
            self.sums[k].add(inputs, outputs)  # the pass's logits: the labels are drawn from them

    def finish(self, merger, models, loader, dtype) -> None:
        self.combination.fishers_ = [sums.fisher() for sums in self.sums]


class _RegMeanStream(_PassStream):
    """RegMean: the input Gram matrices of every layer the runner reports."""

    def __init__(self, combination, merger, models, dtype, runner) -> None:
        super().__init__()
        self.combination = combination
        self.layers = combination._layers(models[0])
        self.keys, self.unmapped = runner.layer_inputs(self.layers)
        mapped = {path: self.layers[path] for paths in self.keys.values() for path in paths}
        precision = merger._statistics_precision(dtype)
        self.sums = [GramSums(mapped, merger.device_, precision) for _ in models]

    def _observe(self, k, key, tensor) -> None:
        for path in self.keys.get(key, ()):
            self.sums[k].observe(tensor, path)

    def finish(self, merger, models, loader, dtype) -> None:
        from .merge import _reread

        grams = [sums.result() for sums in self.sums]
        if self.unmapped:  # layers the runner cannot report: a pass of their own
            rest = {path: self.layers[path] for path in self.unmapped}
            loader = _reread(loader, f"measure the input Gram matrices of {sorted(rest)[:3]} for RegMean")
            for k, model in enumerate(models):
                grams[k].update(self.combination._grams(merger, model, rest, loader, dtype, k))
        self.combination.grams_ = grams


class Fisher(_Combination):
    """Fisher-weighted averaging of the aligned models (Matena and Raffel, NeurIPS 2022).

    Each model's diagonal Fisher information is estimated on the alignment
    data from the model's own predictive distribution (one label per input
    drawn from its softmax, so no labels are needed): the mean over the
    inputs of the squared per-example gradients of ``log p(y_hat | x)``,
    computed on a private copy of the model in evaluation mode. It is then
    carried into the aligned basis: a permutation moves it with the
    parameters (exact); a dense map ``M`` moves the gradients with its
    inverse transpose, and the diagonal Fisher takes the squared
    coefficients (``F'_j = sum_i (M^-1)_ji^2 F_i`` on a layer's rows,
    ``sum_i M_ij^2 F_i`` on its columns: the off-diagonal terms of the
    Fisher, which a diagonal estimate does not have, are left out). Every
    parameter entry of the merged model is then
    ``sum_k w_k F_k theta_k / sum_k w_k F_k`` (the merger's ``weights`` as
    ``w``); entries of zero Fisher in every model, and all buffers, are
    averaged with ``weights``.

    Parameters
    ----------
    random_state : int, default=0
        Seed of the labels drawn from each model's predictive distribution
        (the same seed for every model).

    Attributes
    ----------
    fishers_ : list of dict
        Per model, the float64 Fisher of every parameter name, in the
        model's own basis (set by the merger's ``fit``).

    Notes
    -----
    Costs per-example gradients of every model over the alignment data
    (``torch.func.vmap``; one example at a time, with a warning, for models
    whose ops vmap cannot batch), made batch by batch inside the merger's
    alignment pass, whose forward pass gives the logits the labels are drawn
    from (so a stream that can be read only once suffices). The models must
    return ``(n_samples, n_classes)`` logits.
    """

    _statistics_params = ("random_state",)
    _statistics_attrs = ("fishers_",)

    def __init__(self, random_state: int = 0):
        self.random_state = random_state

    def _check_params(self) -> None:
        seed = self.random_state
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"Fisher random_state must be an int, got {seed!r}.")

    def stream(self, merger, models, dtype, runner) -> _PassStream:
        """Estimate every model's Fisher inside the merger's alignment pass."""
        return _FisherStream(self, merger, models)

    def fit_statistics(self, merger, models, loader, dtype):
        """Estimate every model's Fisher on ``loader``, a pass of its own (``refit`` with new data)."""
        seed = self.random_state
        self.fishers_ = [diagonal_fisher(model, loader, merger.device_, dtype, int(seed),
                                         verbose=merger._show_progress(),
                                         description=f"Fisher information, model {k}")
                         for k, model in enumerate(models)]
        return self

    def merged_state(self, merger, models, weights, reference: int, aligned_states=None) -> dict:
        """The Fisher-weighted average of the aligned models."""
        if aligned_states is None:
            aligned_states = list(merger._aligned_states(models))
        fishers = [aligned_fisher({key: f.to(merger.device_) for key, f in fisher.items()}, state,
                                  merger.spaces_, self._transforms(merger, k))
                   for k, (fisher, state) in enumerate(zip(self.fishers_, aligned_states))]
        merged = fisher_average(aligned_states, fishers, weights)
        return _with_reference_integers(merged, models[reference], merger.device_)


class RegMean(_Combination):
    """Regression mean of the aligned models' layers (Jin et al., ICLR 2023).

    Every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` layer of the merged
    model is the least-squares fit of all aligned models' outputs from their
    own inputs, ``W = (sum_k w_k W_k G_k) (sum_k w_k G_k)^-1``, where
    ``W_k`` is the aligned layer of model ``k`` with its bias as one more
    column and ``G_k`` the uncentered Gram matrix of its inputs (a
    convolution's input patches) with a constant column 1 for the bias, in
    the aligned basis. Off-diagonal entries of every ``G_k`` are multiplied
    by ``alpha``. All other parameters (norms, embeddings, layers that are
    skipped) and the buffers are averaged with the merger's ``weights``.

    Parameters
    ----------
    alpha : float in [0, 1], default=0.9
        Scale of the off-diagonal entries of the Gram matrices. ``1`` is the
        exact least-squares layer; ``0`` keeps only the diagonals, a
        per-input-feature weighted average of the columns; the paper reports
        that a value below one avoids degenerate merges.
    max_features : int, default=4096
        Layers with more input features (``in_features``, or ``in_channels``
        times the kernel size) are averaged instead: their Gram matrices
        grow with the square and their transforms with the cube of this
        number.

    Attributes
    ----------
    grams_ : list of dict
        Per model, layer path -> float64 Gram matrix of its inputs in the
        model's own basis (set by the merger's ``fit``).
    layers_ : list of str
        The layers merged by regression.
    skipped_ : dict
        Layer path -> why it was averaged instead (grouped convolutions,
        other padding modes, tied weights, too many input features).

    Notes
    -----
    The Gram matrices are measured on each model's real layer inputs, in the
    merger's alignment pass (the graph runner reports the input of every
    ``linear`` / ``conv`` call; a layer it cannot report, e.g. one called
    with other settings than its own, gets a pass of its own through a
    structural copy), not derived from the feature spaces' statistics: those
    pool where features are formed (before pooling or flattening) with the
    layers' inputs and are centered, and a convolution reads patches of
    channels, so in general they are not the Gram matrix of what a layer
    multiplies. Directions that
    no model's inputs reach keep the weighted average of the layers.
    """

    _statistics_params = ("max_features",)
    _statistics_attrs = ("grams_", "layers_", "skipped_")

    def __init__(self, alpha: float = 0.9, max_features: int = 4096):
        self.alpha = alpha
        self.max_features = max_features

    def _check_params(self) -> None:
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= float(alpha) <= 1:
            raise ValueError(f"RegMean alpha must be a float in [0, 1], got {alpha!r}.")
        if (isinstance(self.max_features, bool) or not isinstance(self.max_features, numbers.Integral)
                or self.max_features < 1):
            raise ValueError(f"RegMean max_features must be an int >= 1, got {self.max_features!r}.")

    def _layers(self, model) -> dict:
        """The layers merged by regression (sets ``layers_`` and ``skipped_``)."""
        layers, self.skipped_ = regmean_layers(model, int(self.max_features))
        self.layers_ = list(layers)
        if not layers:
            warnings.warn("RegMean found no Linear or Conv layer it can merge: the merge is plain "
                          "averaging.", UserWarning, stacklevel=5)
        return layers

    def _grams(self, merger, model, layers: dict, loader, dtype, k: int) -> dict:
        modules = dict(model.named_modules())
        return input_grams(model, {p: modules[p] for p in layers}, loader, merger.device_, dtype,
                           merger._statistics_precision(dtype), verbose=merger._show_progress(),
                           description=f"Input Gram matrices, model {k}")

    def stream(self, merger, models, dtype, runner) -> _PassStream:
        """Accumulate the Gram matrices inside the merger's alignment pass (the runner reports the inputs)."""
        return _RegMeanStream(self, merger, models, dtype, runner)

    def fit_statistics(self, merger, models, loader, dtype):
        """Every model's layer-input Gram matrices on ``loader``, a pass of its own (``refit`` with new data)."""
        layers = self._layers(models[0])
        self.grams_ = [self._grams(merger, model, layers, loader, dtype, k) for k, model in enumerate(models)]
        return self

    def merged_state(self, merger, models, weights, reference: int, aligned_states=None) -> dict:
        """The aligned models averaged, with every merged layer replaced by its regression."""
        if aligned_states is None:
            aligned_states = list(merger._aligned_states(models))
        merged = merger._uniform_state(models, weights, reference, aligned_states)
        modules = dict(models[reference].named_modules())
        device = merger.device_
        dense = [[_dense(row[k], device) for row in merger.aligners_] for k in range(len(models))]
        for path in self.layers_:
            module = modules[path]
            weight_name = f"{path}.weight" if path else "weight"
            bias_name = f"{path}.bias" if path else "bias"
            has_bias = module.bias is not None
            rows, grams = [], []
            for k, state in enumerate(aligned_states):
                if path not in self.grams_[k]:  # never called on the data: keep the average
                    break
                w = state[weight_name].to(device, torch.float64).reshape(module.weight.shape[0], -1)
                if has_bias:
                    w = torch.cat([w, state[bias_name].to(device, torch.float64)[:, None]], dim=1)
                gram = self.grams_[k][path].to(device)
                transform = input_transform(module, weight_name, merger.spaces_, dense[k], device)
                if transform is not None:
                    if has_bias:
                        transform = torch.block_diag(transform, torch.ones(1, 1, dtype=torch.float64,
                                                                           device=device))
                    gram = transform.T @ gram @ transform
                rows.append(w)
                grams.append(gram)
            else:
                solution = regmean_solve(rows, grams, weights, float(self.alpha))
                target = merged[weight_name]
                columns = solution[:, :-1] if has_bias else solution
                merged[weight_name] = columns.reshape(target.shape).to(target.dtype)
                if has_bias:
                    merged[bias_name] = solution[:, -1].to(merged[bias_name].dtype)
        return merged


def _dense(aligner, device):
    """The aligner's mapping as a dense float64 matrix (None: the basis is kept)."""
    if aligner is None:
        return None
    return torch.as_tensor(aligner.mapping_, dtype=torch.float64).to(device)


def _with_reference_integers(merged: dict, reference_model, device) -> dict:
    for key, value in reference_model.state_dict().items():
        if not value.is_floating_point():
            merged[key] = value.to(device, copy=True)
    return merged
