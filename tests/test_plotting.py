"""Diagnostics (skmerge.diagnostics) and their figures (skmerge.plotting), headless."""

import copy
import subprocess
import sys
import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from scipy.stats import wasserstein_distance  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from skmerge import CCAAligner, ModelMerger, PermutationAligner  # noqa: E402
from skmerge.batchnorm import reset_bn_stats  # noqa: E402
from skmerge.datasets import load_digits  # noqa: E402
from skmerge.diagnostics import (  # noqa: E402
    correlation_matrix,
    correlation_summary,
    interpolation_path,
    loss_barrier,
    summarize_results,
)
from skmerge.graph import permute_model  # noqa: E402
from skmerge.models import get_model  # noqa: E402
from skmerge.plotting import (  # noqa: E402
    plot_accuracy_vs_models,
    plot_correlation_distributions,
    plot_interpolation,
)
from skmerge.training import evaluate, train_model  # noqa: E402

import _archs  # noqa: E402



@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The models are tiny: one thread is as fast, and much faster on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


@pytest.fixture(scope="module")
def mlps(digits):
    train, _ = digits
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = get_model("mlp", in_features=64, num_classes=10, hidden=(32, 32))
        models.append(train_model(model, train, epochs=4, batch_size=32, seed=seed))
    return models


@pytest.fixture(scope="module")
def cca_merger(mlps, digits):
    # float64 products: the correlations are compared with numpy to 1e-9.
    return ModelMerger(mlps, CCAAligner(), device="cpu", precision="double").fit(digits[0].tensors[0])


@pytest.fixture(scope="module")
def permutation_merger(mlps, digits):
    return ModelMerger(mlps, PermutationAligner(), device="cpu").fit(digits[0].tensors[0])


def _tap_activations(model, space, inputs):
    """Raw activations of one space at its taps (captured independently of the merger)."""
    return _archs.tap_samples(model, space, inputs)


def _numpy_correlations(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    scale = np.outer(np.linalg.norm(x, axis=0), np.linalg.norm(y, axis=0))
    return np.divide(x.T @ y, scale, out=np.zeros((x.shape[1], y.shape[1])), where=scale > 0)


# ---------------------------------------------------------------- correlations


def test_correlations_equal_numpy_on_captured_activations(cca_merger, mlps, digits):
    inputs = digits[0].tensors[0]
    for index, space in enumerate(cca_merger.spaces_):
        x = _tap_activations(mlps[1], space, inputs)
        y = _tap_activations(mlps[0], space, inputs)
        expected = _numpy_correlations(x, y)
        np.testing.assert_allclose(correlation_matrix(cca_merger, index), expected, atol=1e-9)

        summary = correlation_summary(cca_merger, index)
        alive = np.flatnonzero(y.std(0) > 0)
        np.testing.assert_array_equal(summary["reference_neurons"], alive)
        ranked = -np.sort(-np.abs(expected[:, alive]), axis=0)
        np.testing.assert_allclose(summary["top1_correlation"], ranked[0], atol=1e-9)
        np.testing.assert_allclose(summary["top2_correlation"], ranked[1], atol=1e-9)

        # Coefficients: mapping between standardized neurons, columns of unit L2 norm.
        mapping = np.asarray(cca_merger.aligners_[index][1].mapping_, dtype=float)
        coefficients = mapping * x.std(0)[:, None]
        coefficients /= np.linalg.norm(coefficients, axis=0)
        np.testing.assert_allclose(summary["coefficients"], coefficients, atol=1e-9)
        top = -np.sort(-np.abs(coefficients[:, alive]), axis=0)
        np.testing.assert_allclose(summary["top1_coefficient"], top[0], atol=1e-9)
        np.testing.assert_allclose(summary["top2_coefficient"], top[1], atol=1e-9)
        assert summary["wasserstein_top1"] == pytest.approx(wasserstein_distance(ranked[0], top[0]))
        assert summary["wasserstein_top2"] == pytest.approx(wasserstein_distance(ranked[1], top[1]))


def test_signed_correlations_and_max_normalization(cca_merger):
    summary = correlation_summary(cca_merger, 0, absolute=False, standardize=False, normalize="max")
    corr = summary["correlations"][:, summary["reference_neurons"]]
    np.testing.assert_allclose(summary["top1_correlation"], corr.max(axis=0))
    np.testing.assert_allclose(summary["top1_coefficient"], 1.0)
    mapping = np.asarray(cca_merger.aligners_[0][1].mapping_, dtype=float)
    np.testing.assert_allclose(summary["coefficients"], mapping / np.abs(mapping).max(axis=0))


def test_a_permutation_mapping_has_one_coefficient_per_neuron(permutation_merger):
    summary = correlation_summary(permutation_merger, 1)
    # 1 where the matched neuron is alive, 0 where it is dead (zero variance).
    assert set(np.unique(summary["top1_coefficient"])) <= {0.0, 1.0}
    np.testing.assert_array_equal(summary["top2_coefficient"], 0.0)
    assert summary["aligner"] == "PermutationAligner"


def test_correlation_plot_shows_the_computed_histograms(cca_merger):
    fig = plot_correlation_distributions(cca_merger, bins=10)
    n_spaces = len(cca_merger.spaces_)
    assert len(fig.axes) == 2 * n_spaces
    edges = np.linspace(0, 1, 11)
    for index in range(n_spaces):
        summary = correlation_summary(cca_merger, index)
        ax_corr, ax_coef = fig.axes[2 * index], fig.axes[2 * index + 1]
        for ax, keys in ((ax_corr, ("top1_correlation", "top2_correlation")),
                         (ax_coef, ("top1_coefficient", "top2_coefficient"))):
            assert len(ax.containers) == 2
            for container, key in zip(ax.containers, keys):
                heights = [patch.get_height() for patch in container.patches]
                np.testing.assert_array_equal(heights, np.histogram(summary[key], bins=edges)[0])
                assert sum(heights) == len(summary["reference_neurons"])
        assert f"{summary['wasserstein_top1']:.2f}" in ax_coef.get_title()


def test_correlation_plot_into_given_axes(cca_merger):
    fig, axes = plt.subplots(1, 2)
    assert plot_correlation_distributions(cca_merger, spaces=[1], axes=axes) is fig
    with pytest.raises(ValueError, match="axes must hold 4"):
        plot_correlation_distributions(cca_merger, spaces=[0, 1], axes=axes)


def test_correlation_bad_arguments(cca_merger, mlps):
    n_spaces = len(cca_merger.spaces_)
    with pytest.raises(ValueError, match="out of range"):
        correlation_summary(cca_merger, n_spaces)
    with pytest.raises(ValueError, match="out of range"):
        plot_correlation_distributions(cca_merger, spaces=[0, -n_spaces - 1])
    with pytest.raises(ValueError, match="reference"):
        correlation_summary(cca_merger, 0, model=0)
    with pytest.raises(ValueError, match="out of range"):
        correlation_summary(cca_merger, 0, model=2)
    with pytest.raises(ValueError, match="normalize"):
        correlation_summary(cca_merger, 0, normalize="l1")
    with pytest.raises(NotFittedError):
        correlation_summary(ModelMerger(mlps), 0)
    broken = copy.copy(cca_merger)
    broken.aligners_ = [list(row) for row in cca_merger.aligners_]
    broken.aligners_[0][1] = object()  # an aligner without mapping_
    with pytest.raises(TypeError, match="mapping_"):
        correlation_summary(broken, 0)
    with pytest.raises(TypeError, match="mapping_"):
        plot_correlation_distributions(broken, spaces=0)
    # The default selection skips it and plots the other space.
    assert len(plot_correlation_distributions(broken).axes) == 2


# --------------------------------------------------------------- interpolation


def test_interpolation_end_points_are_the_two_models(cca_merger, mlps, digits):
    _, test = digits
    path = interpolation_path(cca_merger, *test.tensors, n_points=5)
    np.testing.assert_allclose(path["alphas"], [0, 0.25, 0.5, 0.75, 1])
    for end, model in ((0, mlps[0]), (-1, mlps[1])):
        own = evaluate(model, test)
        assert path["accuracy_before"][end] == pytest.approx(own["accuracy"], abs=1e-6)
        assert path["loss_before"][end] == pytest.approx(own["loss"], rel=1e-5)
    # Both curves start at the reference; the middle of the aligned path is the merge.
    assert path["accuracy_after"][0] == path["accuracy_before"][0]
    assert path["accuracy_after"][2] == pytest.approx(cca_merger.score(*test.tensors))
    assert path["loss_barrier_before"] == pytest.approx(loss_barrier(path["alphas"], path["loss_before"]))
    assert path["bn_reset"] is False and path["n_samples"] == len(test)
    from_dataset = interpolation_path(cca_merger, test, n_points=5, batch_size=100)
    np.testing.assert_allclose(from_dataset["loss_after"], path["loss_after"], rtol=1e-6)


def test_interpolation_plot_shows_the_computed_path(cca_merger, digits):
    _, test = digits
    path = interpolation_path(cca_merger, *test.tensors, n_points=4)
    fig = plot_interpolation(path)
    ax_acc, ax_loss = fig.axes
    for ax, metric in ((ax_acc, "accuracy"), (ax_loss, "loss")):
        lines = {line.get_label().split(",")[0]: line for line in ax.lines
                 if not line.get_label().startswith("_")}
        assert set(lines) == {"before alignment", "after alignment (CCAAligner)"}
        np.testing.assert_array_equal(lines["before alignment"].get_xdata(), path["alphas"])
        np.testing.assert_array_equal(lines["before alignment"].get_ydata(), path[f"{metric}_before"])
        np.testing.assert_array_equal(lines["after alignment (CCAAligner)"].get_ydata(),
                                      path[f"{metric}_after"])
        barrier = path[f"{metric}_barrier_before"]
        assert f"barrier {barrier:.3f}" in lines["before alignment"].get_label()
    # From a merger directly: the same numbers.
    fig = plot_interpolation(cca_merger, *test.tensors, n_points=4)
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), path["loss_before"])


def test_a_permuted_copy_is_flat_after_alignment(mlps, digits):
    train, test = digits
    inputs = train.tensors[0]
    model = mlps[0]
    permuted, _ = permute_model(model, inputs[:2], seed=3)
    merger = ModelMerger([model, permuted], PermutationAligner(), device="cpu").fit(inputs)
    path = interpolation_path(merger, *test.tensors, n_points=5)
    np.testing.assert_allclose(path["loss_after"], path["loss_after"][0], rtol=1e-5)
    np.testing.assert_array_equal(path["accuracy_after"], path["accuracy_after"][0])
    assert path["loss_barrier_after"] < 1e-5
    # Before alignment, the same function in another basis: equal ends, a bump in between.
    assert path["loss_before"][-1] == pytest.approx(path["loss_before"][0], rel=1e-5)
    assert path["loss_barrier_before"] > 0.05
    assert path["accuracy_before"][2] < path["accuracy_before"][0]


def test_batchnorm_is_reestimated_at_every_point():
    torch.manual_seed(0)
    model = _archs.VGGBN(width=4)
    inputs = torch.randn(96, 3, 8, 8)
    labels = torch.randint(0, 5, (96,))
    bn_data = torch.randn(64, 3, 8, 8) + 0.5
    permuted, _ = permute_model(model, inputs[:2], seed=0)
    merger = ModelMerger([model, permuted], PermutationAligner(), device="cpu").fit(inputs)
    path = interpolation_path(merger, inputs, labels, n_points=3, X_bn=bn_data)
    assert path["bn_reset"] is True
    expected = reset_bn_stats(copy.deepcopy(model), bn_data)
    own = evaluate(expected, TensorDataset(inputs, labels))
    for curve in ("before", "after"):
        assert path[f"loss_{curve}"][0] == pytest.approx(own["loss"], rel=1e-5)
    # A permutation preserves the function: the aligned copy is the model itself
    # (the middle may differ slightly where dead units were matched arbitrarily).
    np.testing.assert_allclose(path["loss_after"][[0, -1]], own["loss"], rtol=1e-5)
    np.testing.assert_allclose(path["loss_after"], own["loss"], rtol=1e-2)
    with pytest.warns(UserWarning, match="X_eval"):
        fallback = interpolation_path(merger, inputs, labels, n_points=2)
    expected = reset_bn_stats(copy.deepcopy(model), inputs)
    assert fallback["loss_before"][0] == pytest.approx(
        evaluate(expected, TensorDataset(inputs, labels))["loss"], rel=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = interpolation_path(merger, inputs, labels, n_points=2, reset_bn=False)
    assert kept["bn_reset"] is False
    assert kept["loss_before"][0] == pytest.approx(
        evaluate(model, TensorDataset(inputs, labels))["loss"], rel=1e-5)


def test_interpolation_bad_arguments(cca_merger, mlps, digits):
    _, test = digits
    x, y = test.tensors
    with pytest.raises(ValueError, match="reference"):
        interpolation_path(cca_merger, x, y, model=0)
    with pytest.raises(ValueError, match="out of range"):
        interpolation_path(cca_merger, x, y, model=5)
    with pytest.raises(ValueError, match="n_points"):
        interpolation_path(cca_merger, x, y, n_points=1)
    with pytest.raises(ValueError, match="labels"):
        interpolation_path(cca_merger, x)
    with pytest.raises(ValueError, match="y_eval"):
        interpolation_path(cca_merger, test, y)
    with pytest.raises(NotFittedError):
        interpolation_path(ModelMerger(mlps), x, y)
    with pytest.raises(ValueError, match="lacks"):
        plot_interpolation({"alphas": [0, 1]})
    with pytest.raises(TypeError, match="already computed"):
        plot_interpolation({"alphas": [0, 1]}, x)
    assert loss_barrier([0, 0.5, 1], [0.9, 0.5, 0.8], higher_is_better=True) == pytest.approx(0.35)
    assert loss_barrier([0, 0.5, 1], [1.0, 0.5, 1.0]) == 0.0


# ------------------------------------------------------- accuracy vs n models

RESULTS = [
    {"aligner": "CCA", "n_models": 2, "accuracy": 0.95, "seed": 0},
    {"aligner": "CCA", "n_models": 2, "accuracy": 0.93, "seed": 1},
    {"aligner": "CCA", "n_models": 4, "accuracy": 0.90, "seed": 0},
    {"aligner": "Permutation", "n_models": 4, "accuracy": 0.70, "seed": 0},
    {"aligner": "Permutation", "n_models": 2, "accuracy": 0.91, "seed": 0},
    {"aligner": "Permutation", "n_models": 2, "accuracy": 0.85, "seed": 1},
    {"aligner": "Permutation", "n_models": 2, "accuracy": 0.88, "seed": 2},
]


def test_summarize_results_groups_repeats():
    summary = summarize_results(RESULTS)
    assert list(summary) == ["CCA", "Permutation"]
    np.testing.assert_array_equal(summary["Permutation"]["n_models"], [2, 4])
    np.testing.assert_allclose(summary["Permutation"]["mean"], [0.88, 0.70])
    np.testing.assert_allclose(summary["Permutation"]["std"], [np.std([0.91, 0.85, 0.88], ddof=1), 0])
    np.testing.assert_array_equal(summary["CCA"]["count"], [2, 1])
    columns = {key: [row[key] for row in RESULTS] for key in ("aligner", "n_models", "accuracy")}
    by_columns = summarize_results(columns)
    for aligner in summary:
        for key in ("n_models", "mean", "std", "count"):
            np.testing.assert_allclose(by_columns[aligner][key], summary[aligner][key])


def test_accuracy_vs_models_plot_shows_means_and_std():
    fig = plot_accuracy_vs_models(RESULTS, baselines={"ensemble": 0.97})
    (ax,) = fig.axes
    summary = summarize_results(RESULTS)
    assert [c.get_label() for c in ax.containers] == ["CCA", "Permutation"]
    for container, (aligner, row) in zip(ax.containers, summary.items()):
        line, _, (bars,) = container.lines
        np.testing.assert_array_equal(line.get_xdata(), row["n_models"])
        np.testing.assert_allclose(line.get_ydata(), row["mean"])
        lengths = [segment[1, 1] - segment[0, 1] for segment in bars.get_segments()]
        np.testing.assert_allclose(lengths, 2 * row["std"])
    assert [line.get_ydata()[0] for line in ax.lines if line.get_label() == "ensemble"] == [0.97]
    _, ax2 = plt.subplots()
    assert plot_accuracy_vs_models(RESULTS, ax=ax2).axes == [ax2]


def test_accuracy_vs_models_bad_results():
    with pytest.raises(ValueError, match="empty"):
        plot_accuracy_vs_models([])
    with pytest.raises(ValueError, match="'n_models'"):
        plot_accuracy_vs_models([{"aligner": "CCA", "accuracy": 0.9}])
    with pytest.raises(ValueError, match="'loss'"):
        plot_accuracy_vs_models(RESULTS, metric="loss")
    with pytest.raises(ValueError, match="not finite"):
        summarize_results([{"aligner": "CCA", "n_models": 2, "accuracy": float("nan")}])
    with pytest.raises(TypeError, match="mapping"):
        summarize_results([("CCA", 2, 0.9)])
    with pytest.raises(ValueError, match="different lengths"):
        summarize_results({"aligner": ["CCA"], "n_models": [2, 3], "accuracy": [0.9]})


# ------------------------------------------------------------ optional extra


def test_plotting_without_matplotlib_says_to_install_the_extra():
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None\n"
        "import skmerge.diagnostics\n"
        "try:\n"
        "    import skmerge.plotting\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pip install skmerge[plot]" in result.stdout
