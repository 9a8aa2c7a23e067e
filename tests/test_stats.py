"""Tests of skmerge.stats: streaming (co)variances."""

import copy
import pickle

import numpy as np
import pytest
import torch

from skmerge.stats import CrossCovariance, ReferenceCovariance

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _data(seed=0, n=257, p=5, q=3, offset=0.0):
    rng = np.random.default_rng(seed)
    X = offset + rng.normal(size=(n, p)) @ rng.normal(size=(p, p))
    Y = X[:, :q] @ rng.normal(size=(q, q)) + rng.normal(size=(n, q))
    return X, Y


def _np_cov(X, Y):
    """Reference covariances from numpy: (xx, yy, xy)."""
    p = X.shape[1]
    full = np.cov(X.T, Y.T)
    return full[:p, :p], full[p:, p:], full[:p, p:]


def _uneven_batches(n, seed=0):
    """Cut points of uneven batches, including a batch of 1 and an empty batch."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(2, n - 1), size=12, replace=False))
    return [0, 1, 1, *cuts, n]


def _assert_matches_numpy(stats, X, Y, rtol=1e-10, atol=1e-10):
    xx, yy, xy = _np_cov(X, Y)
    assert stats.n_samples_ == X.shape[0]
    np.testing.assert_allclose(stats.mean_x_.cpu().numpy(), X.mean(0), rtol=rtol, atol=atol)
    np.testing.assert_allclose(stats.mean_y_.cpu().numpy(), Y.mean(0), rtol=rtol, atol=atol)
    np.testing.assert_allclose(stats.covariance_xx().cpu().numpy(), xx, rtol=rtol, atol=atol)
    np.testing.assert_allclose(stats.covariance_yy().cpu().numpy(), yy, rtol=rtol, atol=atol)
    np.testing.assert_allclose(stats.covariance_xy().cpu().numpy(), xy, rtol=rtol, atol=atol)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_one_shot_matches_numpy(as_tensor):
    X, Y = _data()
    data = (torch.from_numpy(X), torch.from_numpy(Y)) if as_tensor else (X, Y)
    stats = CrossCovariance().update(*data)
    _assert_matches_numpy(stats, X, Y)
    for name in ("mean_x_", "comoment_xx_", "comoment_yy_", "comoment_xy_"):
        assert getattr(stats, name).dtype == torch.float64
    assert (stats.n_features_x, stats.n_features_y) == (5, 3)
    assert stats.comoment_xy_.shape == (5, 3)
    # ddof: the comoments divided by n - ddof
    np.testing.assert_allclose(
        stats.covariance_xy(ddof=0).numpy(), stats.comoment_xy_.numpy() / X.shape[0]
    )


def test_uneven_batches_match_one_shot():
    X, Y = _data(n=300)
    cuts = _uneven_batches(len(X))
    stats = CrossCovariance()
    for start, stop in zip(cuts[:-1], cuts[1:]):
        returned = stats.update(X[start:stop], Y[start:stop])
        assert returned is stats
    _assert_matches_numpy(stats, X, Y)


def test_float32_input_is_upcast_before_centering():
    X, Y = _data(offset=1e4)
    X32, Y32 = X.astype(np.float32), Y.astype(np.float32)
    stats = CrossCovariance()
    for start in range(0, len(X), 50):
        stats.update(torch.from_numpy(X32[start:start + 50]), Y32[start:start + 50])
    assert stats.comoment_xx_.dtype == torch.float64
    # Exact for the float32 values themselves (their own rounding is the input's).
    _assert_matches_numpy(stats, X32.astype(np.float64), Y32.astype(np.float64), rtol=1e-9, atol=1e-9)


def test_merge_of_shards_equals_one_shot():
    X, Y = _data(n=400)
    shards = [(0, 7), (7, 190), (190, 400)]
    parts = [CrossCovariance().update(X[a:b], Y[a:b]) for a, b in shards]
    before = [p.comoment_xy_.clone() for p in parts]
    merged = parts[0].merge(parts[1]) + parts[2]
    _assert_matches_numpy(merged, X, Y)
    # inputs unchanged, output is a new object
    for p, b, (start, stop) in zip(parts, before, shards):
        assert p.n_samples_ == stop - start
        assert torch.equal(p.comoment_xy_, b)
    assert all(merged is not p for p in parts)
    # merging with an empty object is the identity
    same = CrossCovariance() + merged
    _assert_matches_numpy(same, X, Y)


def test_large_offset_naive_formula_fails_chan_passes():
    """Mean 1e4, std 1: E[xx'] - mu mu' loses ~8 digits in float64; Chan does not."""
    rng = np.random.default_rng(0)
    n, p = 4000, 6
    X = 1e4 + rng.normal(size=(n, p))
    Y = 1e4 + rng.normal(size=(n, 2))
    # Ground truth in extended precision, two-pass.
    Xl = X.astype(np.longdouble)
    centered = Xl - Xl.mean(0)
    truth = (centered.T @ centered / (n - 1)).astype(np.float64)

    stats = CrossCovariance()
    sum_x, sum_xx = np.zeros(p), np.zeros((p, p))
    for start in range(0, n, 97):
        batch = X[start:start + 97]
        stats.update(batch, Y[start:start + 97])
        sum_x += batch.sum(0)
        sum_xx += batch.T @ batch
    naive = (sum_xx - np.outer(sum_x, sum_x) / n) / (n - 1)

    naive_error = np.abs(naive - truth).max()
    chan_error = np.abs(stats.covariance_xx().numpy() - truth).max()
    assert naive_error > 1e-9, naive_error  # the textbook formula fails (~1e-7)
    assert chan_error < 1e-11, chan_error  # ours is at rounding level (~1e-13)
    np.testing.assert_allclose(stats.covariance_xx().numpy(), np.cov(X.T), rtol=0, atol=1e-11)


def test_pickle_round_trip():
    X, Y = _data()
    stats = CrossCovariance().update(X, Y)
    loaded = pickle.loads(pickle.dumps(stats))
    assert loaded.n_samples_ == stats.n_samples_
    assert loaded.device == torch.device("cpu")
    for name in ("mean_x_", "mean_y_", "comoment_xx_", "comoment_yy_", "comoment_xy_"):
        assert torch.equal(getattr(loaded, name), getattr(stats, name))
    # and it keeps streaming
    loaded.update(X, Y)
    assert loaded.n_samples_ == 2 * len(X)
    empty = pickle.loads(pickle.dumps(CrossCovariance()))
    assert empty.n_samples_ == 0 and empty.mean_x_ is None


def test_to_device_and_copy():
    X, Y = _data()
    stats = CrossCovariance().update(X, Y)
    assert stats.to("cpu") is stats
    assert stats.device == torch.device("cpu")
    snapshot = copy.copy(stats)
    stats.update(X, Y)
    assert snapshot.n_samples_ == len(X)  # copies are independent snapshots
    _assert_matches_numpy(snapshot, X, Y)


def test_reference_covariance_pair_agrees_with_cross_covariance():
    rng = np.random.default_rng(1)
    n = 211
    dims = (4, 6, 3)
    views = [rng.normal(size=(n, d)) + 5.0 for d in dims]
    ref = ReferenceCovariance(n_views=3, reference=1)
    for start in range(0, n, 40):
        ref.update([v[start:start + 40] for v in views])
    assert ref.n_samples_ == n
    assert ref.n_features_ == list(dims)
    for k in range(3):
        pair = ref.pair(k)
        direct = CrossCovariance().update(views[k], views[1])
        assert isinstance(pair, CrossCovariance)
        assert pair.n_samples_ == n
        for name in ("mean_x_", "mean_y_"):
            torch.testing.assert_close(getattr(pair, name), getattr(direct, name))
        for name in ("covariance_xx", "covariance_yy", "covariance_xy"):
            torch.testing.assert_close(getattr(pair, name)(), getattr(direct, name)())
    # the pair shares the parent's tensors (no copy)
    assert ref.pair(2).comoment_xy_ is ref.cross_comoments_[2]
    assert ref.pair(1).comoment_xy_ is ref.auto_comoments_[1]  # reference vs itself
    # star-shaped storage: nothing bigger than d_k x d_ref / d_k x d_k
    for (i, j), tensor in ref._moments.items():
        assert tensor.shape == (dims[i], dims[j]) and j in (i, 1)
    assert len(ref._moments) == 3 + 2  # 3 auto + 2 cross, not 3 * 3 blocks


def test_reference_covariance_merge_snapshot_and_pickle():
    rng = np.random.default_rng(2)
    views = [rng.normal(size=(100, d)) for d in (3, 3)]
    a = ReferenceCovariance(2).update([v[:30] for v in views])
    b = ReferenceCovariance(2).update([v[30:] for v in views])
    merged = a + b
    whole = ReferenceCovariance(2).update(views)
    torch.testing.assert_close(merged.cross_covariance(1), whole.cross_covariance(1))
    torch.testing.assert_close(merged.covariance(0), whole.covariance(0))
    pair = merged.pair(1)
    merged.update(views)  # later updates do not change an earlier pair
    assert pair.n_samples_ == 100 and merged.n_samples_ == 200
    loaded = pickle.loads(pickle.dumps(merged))
    torch.testing.assert_close(loaded.pair(1).covariance_xy(), merged.pair(1).covariance_xy())
    with pytest.raises(ValueError, match="different n_views/reference"):
        ReferenceCovariance(2, reference=1) + a


@pytest.mark.parametrize(
    "X, Y, match",
    [
        (np.zeros(5), np.zeros((5, 2)), "X must be 2-D"),
        (np.zeros((5, 2, 1)), np.zeros((5, 2)), "X must be 2-D"),
        (np.zeros((5, 2)), np.zeros((4, 2)), "Inconsistent numbers of samples"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), np.zeros((2, 1)), "X contains NaN or infinity"),
        (np.zeros((2, 1)), np.array([[np.inf], [1.0]]), "Y contains NaN or infinity"),
        (np.array([["a"], ["b"]]), np.zeros((2, 1)), "X must be numeric"),
        (np.zeros((2, 1), dtype=complex), np.zeros((2, 1)), "complex"),
    ],
)
def test_bad_inputs(X, Y, match):
    with pytest.raises(ValueError, match=match):
        CrossCovariance().update(X, Y)


def test_inconsistent_features_and_devices():
    stats = CrossCovariance().update(np.zeros((3, 2)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="X has 3 features, but earlier batches had 2"):
        stats.update(np.zeros((3, 3)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="Y has 2 features, but earlier batches had 1"):
        stats.update(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="is on device meta"):
        stats.update(torch.zeros((3, 2), device="meta"), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="feature counts"):
        stats + CrossCovariance().update(np.zeros((3, 4)), np.zeros((3, 1)))
    with pytest.raises(TypeError, match="Cannot merge"):
        stats + ReferenceCovariance(2)
    with pytest.raises(ValueError, match="needs more than 1 samples"):
        CrossCovariance().update(np.zeros((1, 2)), np.zeros((1, 1))).covariance_xx()
    with pytest.raises(ValueError, match="no data yet"):
        CrossCovariance().covariance_xy()
    ref = ReferenceCovariance(2)
    with pytest.raises(ValueError, match="Expected 2 views, got 3"):
        ref.update([np.zeros((3, 2))] * 3)
    with pytest.raises(ValueError, match=r"views\[1\] contains NaN"):
        ref.update([np.zeros((3, 2)), np.full((3, 2), np.nan)])
    with pytest.raises(ValueError, match="sequence"):
        ref.update(np.zeros((2, 3, 2)))
    with pytest.raises(ValueError, match="reference must be an index"):
        ReferenceCovariance(2, reference=2)
    with pytest.raises(ValueError, match="n_views must be a positive integer"):
        ReferenceCovariance(0)
    with pytest.raises(IndexError, match="view index"):
        ReferenceCovariance(2).update([np.zeros((3, 1))] * 2).pair(5)


@pytest.mark.gpu
@requires_cuda
def test_cuda_statistics_stay_on_device_and_pickle_to_cpu():
    X, Y = _data()
    device = torch.device("cuda")
    stats = CrossCovariance()
    for start in range(0, len(X), 64):
        stats.update(
            torch.from_numpy(X[start:start + 64]).float().to(device),
            Y[start:start + 64],  # numpy batches are moved to the statistics' device
        )
    assert stats.device.type == "cuda"
    assert stats.comoment_xy_.device.type == "cuda"
    _assert_matches_numpy(stats, X.astype(np.float32).astype(np.float64), Y, rtol=1e-6, atol=1e-6)
    loaded = pickle.loads(pickle.dumps(stats))
    assert loaded.device == torch.device("cpu")
    torch.testing.assert_close(loaded.to(device).covariance_xy(), stats.covariance_xy())
    ref = ReferenceCovariance(2).update([torch.from_numpy(X).to(device)] * 2)
    assert ref.pair(1).device.type == "cuda"


def test_single_precision_products_agree_with_double():
    # Large offsets and many batches: the float64 means and accumulation keep
    # single-precision products as accurate as one batch's float32 rounding.
    rng = np.random.default_rng(3)
    X = (1e3 + rng.normal(size=(3000, 6)) @ rng.normal(size=(6, 6))).astype(np.float32)
    Y = (-5e2 + rng.normal(size=(3000, 4))).astype(np.float32)
    Y[:, :2] += X[:, :2]
    double, single = CrossCovariance(), CrossCovariance(precision="single")
    for start in range(0, 3000, 100):
        double.update(torch.from_numpy(X[start:start + 100]), torch.from_numpy(Y[start:start + 100]))
        single.update(torch.from_numpy(X[start:start + 100]), torch.from_numpy(Y[start:start + 100]))
    exact = np.cov(X.astype(np.float64).T, Y.astype(np.float64).T)
    torch.testing.assert_close(double.covariance_xy().numpy(), exact[:6, 6:], rtol=1e-12, atol=1e-12)
    scale = np.abs(exact).max()
    for stats in (single,):
        assert stats.covariance_xy().dtype == torch.float64
        np.testing.assert_allclose(stats.covariance_xx().numpy(), exact[:6, :6], rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(stats.covariance_xy().numpy(), exact[:6, 6:], rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(stats.mean_x_.numpy(), X.astype(np.float64).mean(0), rtol=1e-12)
    # The error is float32 rounding, not zero: the option does change the arithmetic.
    assert not torch.equal(single.covariance_xx(), double.covariance_xx())


def test_single_precision_falls_back_to_double_when_products_overflow():
    # Values near 1e20 fit in float32 (up to 3.4e38), their products do not.
    rng = np.random.default_rng(0)
    X = (1e20 * rng.normal(size=(200, 5))).astype(np.float32)
    Y = (X[:, :3] * 2 + 1e19 * rng.normal(size=(200, 3))).astype(np.float32)
    single = CrossCovariance(precision="single").update(torch.from_numpy(X), torch.from_numpy(Y))
    exact = np.cov(X.astype(np.float64).T, Y.astype(np.float64).T)
    for got, want in ((single.covariance_xx(), exact[:5, :5]), (single.covariance_xy(), exact[:5, 5:])):
        assert torch.isfinite(got).all()
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6 * np.abs(exact).max())
    # Beyond float64's range too: an error that says what to do.
    huge = torch.full((4, 2), 1e200, dtype=torch.float64) * torch.tensor([[1.0], [-1.0], [2.0], [0.5]],
                                                                          dtype=torch.float64)
    with pytest.raises(ValueError, match="overflow even in float64; rescale"):
        CrossCovariance().update(huge, huge)


def test_sparse_and_meta_inputs_are_named():
    import scipy.sparse

    dense = np.ones((4, 2))
    with pytest.raises(TypeError, match="Y is sparse.*toarray"):
        CrossCovariance().update(dense, scipy.sparse.csr_matrix(dense))
    with pytest.raises(TypeError, match="X is sparse.*to_dense"):
        CrossCovariance().update(torch.ones(4, 2).to_sparse(), dense)
    with pytest.raises(ValueError, match="X is on the meta device"):
        CrossCovariance().update(torch.ones(4, 2, device="meta"), torch.ones(4, 2, device="meta"))


def test_precision_is_validated_kept_by_pairs_and_pickles():
    with pytest.raises(ValueError, match="precision must be"):
        CrossCovariance(precision="half")
    with pytest.raises(ValueError, match="precision must be"):
        ReferenceCovariance(2, precision="float32")
    rng = np.random.default_rng(0)
    stats = ReferenceCovariance(2, precision="single").update([rng.normal(size=(20, 3))] * 2)
    assert stats.pair(1).precision == "single"
    assert pickle.loads(pickle.dumps(stats)).precision == "single"
    # Objects pickled before the option existed load as double precision.
    state = stats.__getstate__()
    del state["precision"]
    old = object.__new__(ReferenceCovariance)
    old.__setstate__(state)
    assert old.precision == "double"


@pytest.mark.parametrize("precision", ["double", "single"])
def test_views_given_one_at_a_time_equal_one_update(precision):
    # The merger runs the models one after the other: the reference's view
    # first, then each other view; only the views a pending pair needs are kept.
    rng = np.random.default_rng(5)
    together = ReferenceCovariance(3, reference=1, precision=precision)
    apart = ReferenceCovariance(3, reference=1, precision=precision)
    for _ in range(4):
        views = [(rng.normal(size=(40, d)) + 5).astype(np.float32) for d in (4, 3, 5)]
        together.update(views)
        batch = apart._batch()
        batch.add(1, views[1])
        for k in (0, 2):
            batch.add(k, views[k])
            assert list(batch._kept) == ([1] if k == 0 else [])
        batch.commit()
    assert apart.n_samples_ == together.n_samples_ == 160
    for k in range(3):
        assert torch.equal(apart.means_[k], together.means_[k])
        torch.testing.assert_close(apart.covariance(k), together.covariance(k), rtol=0, atol=1e-12)
        torch.testing.assert_close(apart.cross_covariance(k), together.cross_covariance(k), rtol=0, atol=1e-12)


def test_views_given_one_at_a_time_are_validated():
    rng = np.random.default_rng(0)
    stats = ReferenceCovariance(2).update([rng.normal(size=(10, 3)), rng.normal(size=(10, 2))])
    batch = stats._batch()
    batch.add(0, rng.normal(size=(10, 3)))
    with pytest.raises(ValueError, match="already given"):
        batch.add(0, rng.normal(size=(10, 3)))
    with pytest.raises(ValueError, match="Inconsistent numbers of samples"):
        batch.add(1, rng.normal(size=(9, 2)))
    with pytest.raises(ValueError, match="earlier batches had 2"):
        batch.add(1, rng.normal(size=(10, 4)))
    with pytest.raises(ValueError, match=r"Views \[1\] of this batch were never given"):
        batch.commit()
    with pytest.raises(ValueError, match="NaN or infinity"):
        batch.add(1, np.full((10, 2), np.nan))
    assert stats.n_samples_ == 10  # nothing of the failed batch was added


@pytest.mark.parametrize("precision", ["double", "single"])
def test_grouped_views_give_the_statistics_of_their_rows(precision):
    # Convolution inputs reach the statistics as (images, positions, channels)
    # views of NCHW tensors (features not the fastest axis, possibly a slice of
    # the channels): they are centered into one feature-major block and give
    # the statistics of their rows.
    rng = np.random.default_rng(2)
    dtype = torch.float32 if precision == "single" else torch.float64
    tolerance = 1e-5 if precision == "single" else 1e-12
    for groups, size, d in [(6, 40, 5), (6, 3, 8), (1, 50, 4)]:
        nchw = torch.from_numpy(rng.normal(size=(groups, d + 3, size)) + 2).to(dtype)
        x = nchw[:, 1 : d + 1].transpose(1, 2)  # a channel slice, strided like a conv view
        y = torch.from_numpy(rng.normal(size=(groups, size, d))).to(dtype)
        y[..., :2] += x[..., :2]
        flat = ReferenceCovariance(2).update([x.reshape(-1, d).double(), y.reshape(-1, d).double()])
        grouped = ReferenceCovariance(2, precision=precision)
        batch = grouped._batch()
        batch.add(0, x)
        batch.add(1, y)
        batch.commit()
        assert grouped.n_samples_ == groups * size
        for k in range(2):
            torch.testing.assert_close(grouped.means_[k], flat.means_[k], rtol=0, atol=tolerance)
            torch.testing.assert_close(grouped.covariance(k), flat.covariance(k), rtol=0, atol=tolerance)
            torch.testing.assert_close(grouped.cross_covariance(k), flat.cross_covariance(k), rtol=0, atol=tolerance)


def test_single_precision_grouped_means_survive_float32_overflow_and_catch_nan():
    # Per-group float32 partial sums overflow for values near float32's
    # maximum: the mean falls back to a float64 sum instead of becoming inf.
    x = torch.full((3, 2, 4), 3e38, dtype=torch.float32).transpose(1, 2)
    stats = ReferenceCovariance(2, precision="single")
    batch = stats._batch()
    batch.add(0, x)
    batch.add(1, torch.ones(3, 4, 2))
    batch.commit()
    np.testing.assert_allclose(stats.means_[0].numpy(), [3e38, 3e38], rtol=1e-6)
    bad = x.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinity"):
        stats._batch().add(0, bad)


def test_grouped_views_must_group_their_samples_alike():
    batch = ReferenceCovariance(2)._batch()
    batch.add(0, torch.zeros(4, 6, 3))
    with pytest.raises(ValueError, match="groups its samples as"):
        batch.add(1, torch.zeros(6, 4, 3))
