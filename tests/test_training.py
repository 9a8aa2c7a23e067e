"""Tests of skmerge.training: recipes, determinism, evaluation, checkpoints."""

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from skmerge.datasets import load_digits
from skmerge.models import get_model
from skmerge.training import (
    _augment,
    _lr_factor,
    ensemble_accuracy,
    evaluate,
    load_checkpoint,
    load_model,
    predict_logits,
    save_checkpoint,
    train_model,
    train_models,
)

DIGITS = dict(in_channels=1, image_size=8, num_classes=10)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run on one intra-op thread: these tiny models gain nothing from more,
    and OpenMP spin-waiting makes them very slow when other processes load
    the cores. Restored afterwards, so other test modules are unaffected."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


@pytest.fixture(scope="module")
def small(digits):
    """A 256-sample training subset, for quick determinism checks."""
    return Subset(digits[0], list(range(256)))


class ListDataset(Dataset):
    """A data set that is not tensor-backed (exercises the DataLoader path)."""

    def __init__(self, tensor_dataset):
        self.x, self.y = tensor_dataset.tensors

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_mlp_learns_digits_quickly(digits):
    train, test = digits
    torch.manual_seed(0)
    model = get_model("mlp", width=0.5, **DIGITS)
    # About 0.3 s on 2 idle cores (not asserted: shared CI machines vary).
    train_model(model, train, epochs=10, seed=0)
    assert evaluate(model, test)["accuracy"] > 0.9
    assert not model.training  # returned in eval mode


def test_small_convnet_learns_digits(digits):
    train, test = digits
    torch.manual_seed(0)
    model = get_model("vgg11", width=0.125, **DIGITS)
    train_model(model, train, epochs=6, seed=0)
    assert evaluate(model, test)["accuracy"] > 0.85


@pytest.mark.parametrize("name,kw", [
    ("mlp", dict(width=0.25, dropout=0.3)),
    ("resnet20", dict(width=0.25)),
])
def test_training_is_deterministic(small, name, kw):
    def run(seed):
        torch.manual_seed(123)
        model = get_model(name, **DIGITS, **kw)
        return train_model(model, small, epochs=1, batch_size=64, seed=seed)

    a, b, c = run(0), run(0), run(1)
    assert _same_state(a, b)
    assert not _same_state(a, c)


def test_global_rng_state_is_restored(small):
    model = get_model("mlp", width=0.25, dropout=0.5, **DIGITS)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    train_model(model, small, epochs=1, seed=3)
    torch.testing.assert_close(torch.rand(3), expected)


def test_train_models_seeds_and_lists(small):
    def factory():
        return get_model("mlp", width=0.25, **DIGITS)

    state = torch.get_rng_state()
    models = train_models(factory, small, 2, epochs=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert not _same_state(*models)
    again = train_models(factory, small, 2, epochs=1, seeds=[0, 1])
    assert all(_same_state(m, n) for m, n in zip(models, again))
    # An int seed s means s, s + 1, ...
    shifted = train_models(factory, small, 1, epochs=1, seeds=1)
    assert _same_state(shifted[0], models[1])
    halves = [Subset(small, range(128)), Subset(small, range(128, 256))]
    per_split = train_models(factory, halves, 2, epochs=1)
    assert len(per_split) == 2
    with pytest.raises(ValueError, match="datasets"):
        train_models(factory, halves, 3, epochs=1)
    with pytest.raises(ValueError, match="seeds"):
        train_models(factory, small, 2, epochs=1, seeds=[1])


def test_generic_dataset_path_matches_tensor_path(small):
    x, y = small.dataset.tensors
    tensor_ds = TensorDataset(x[:256], y[:256])
    runs = []
    for ds in (tensor_ds, ListDataset(tensor_ds)):
        torch.manual_seed(0)
        runs.append(train_model(get_model("mlp", width=0.25, **DIGITS), ds,
                                epochs=1, batch_size=64, seed=0))
    # Both paths draw the same permutation from the same generator.
    assert _same_state(*runs)


def test_optimizer_options(small):
    model = get_model("mlp", width=0.25, **DIGITS)
    train_model(model, small, epochs=1, optimizer="sgd", lr=0.01, schedule="constant")
    train_model(model, small, epochs=1, optimizer="adamw")
    train_model(model, small, epochs=1,
                optimizer=lambda params: torch.optim.RMSprop(params, lr=1e-3))
    with pytest.raises(ValueError, match="optimizer"):
        train_model(model, small, epochs=1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="schedule"):
        train_model(model, small, epochs=1, schedule="step")
    with pytest.raises(ValueError, match="augment"):
        train_model(model, small, epochs=1, augment="mixup")
    with pytest.raises(RuntimeError, match="diverged"):
        train_model(model, small, epochs=1, optimizer="sgd", lr=1e30)


@pytest.mark.parametrize("name,kwargs,expected", [
    ("mlp", {}, (torch.optim.Adam, 0.0)),
    ("vgg11", {"width": 0.125}, (torch.optim.SGD, 5e-4)),
    ("vit", {"patch_size": 4, "dim": 16, "depth": 1}, (torch.optim.AdamW, 0.05)),
])
def test_default_recipes_follow_the_model_family(name, kwargs, expected):
    """Conv nets train with SGD, MLPs with Adam, models with LayerNorm and no BatchNorm with AdamW."""
    from skmerge import training

    model = get_model(name, **kwargs, **DIGITS)
    seen = []
    original = training._make_optimizer

    def spy(*args, **kw):
        seen.append(original(*args, **kw))
        return seen[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "_make_optimizer", spy)
        train_model(model, TensorDataset(torch.randn(8, 1, 8, 8), torch.arange(8) % 10), epochs=1)
    (opt,) = seen
    assert type(opt) is expected[0] and opt.defaults["weight_decay"] == expected[1]


def test_lr_schedules():
    f = _lr_factor("warmup_cosine", 100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(54) == pytest.approx(0.5, abs=0.02) and f(99) < 0.01
    g = _lr_factor("cosine", 10)
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5)
    assert _lr_factor("constant", 10)(7) == 1.0


def test_augmentation():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    out = _augment(x, "crop_flip", g1)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _augment(x, "crop_flip", g2))
    flipped = _augment(x, "flip", torch.Generator().manual_seed(1))
    for a, b in zip(flipped, x):
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
    with pytest.raises(ValueError, match="image batches"):
        _augment(x.reshape(2, -1), "crop", g1)
    # A crop is a shifted window of the zero-padded image (padding 1 for 8x8).
    cropped = _augment(x, "crop", torch.Generator().manual_seed(2))
    padded = F.pad(x, (1, 1, 1, 1))
    for a, p in zip(cropped, padded):
        assert any(torch.equal(a, p[:, i:i + 8, j:j + 8]) for i in range(3) for j in range(3))


def test_verbose_progress_bar(small, capsys):
    model = get_model("mlp", width=0.25, **DIGITS)
    train_model(model, small, epochs=2, verbose=True, eval_dataset=small, augment="crop")
    err = capsys.readouterr().err
    assert "loss" in err and "acc" in err and "test_acc" in err


# --------------------------------------------------------------------------
# evaluation


@pytest.fixture(scope="module")
def two_models(small):
    torch.manual_seed(0)
    return [train_model(get_model("mlp", width=0.25, **DIGITS), small, epochs=2, seed=s)
            for s in (0, 1)]


def test_evaluation_restores_every_submodule_flag(two_models, digits):
    model = copy.deepcopy(two_models[0]).train()
    frozen = [m for m in model.modules() if m is not model][0]
    frozen.eval()
    evaluate(model, digits[1])
    assert model.training and not frozen.training
    assert all(m.training for m in model.modules() if m is not frozen)


def test_evaluate_matches_manual(two_models, digits):
    test = digits[1]
    model = two_models[0]
    model.train()
    result = evaluate(model, test, batch_size=100)
    assert model.training  # mode restored
    x, y = test.tensors
    with torch.no_grad():
        logits = model.eval()(x)
    assert result["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert set(result) == {"accuracy", "loss"}
    assert evaluate(model, ListDataset(test))["accuracy"] == pytest.approx(result["accuracy"])


def test_predict_logits_inputs(two_models, digits):
    model, test = two_models[0], digits[1]
    x = test.tensors[0]
    ref = predict_logits(model, test, batch_size=64)
    assert ref.shape == (len(x), 10) and ref.dtype == torch.float32
    torch.testing.assert_close(predict_logits(model, x), ref)
    torch.testing.assert_close(predict_logits(model, x.numpy()), ref)
    state = torch.get_rng_state()
    torch.testing.assert_close(predict_logits(model, ListDataset(test)), ref)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(predict_logits(model, Subset(test, [3, 1])), ref[[3, 1]])
    nested = Subset(Subset(test, [5, 3, 1]), [2, 0])
    torch.testing.assert_close(predict_logits(model, nested), ref[[1, 5]])


def test_ensemble_accuracy_matches_manual(two_models, digits):
    test = digits[1]
    x, y = test.tensors
    with torch.no_grad():
        probs = sum(m(x).softmax(1) for m in two_models) / 2
    expected = (probs.argmax(1) == y).float().mean().item()
    assert ensemble_accuracy(two_models, test) == pytest.approx(expected)
    single = ensemble_accuracy(two_models[:1], test)
    assert single == pytest.approx(evaluate(two_models[0], test)["accuracy"])
    with pytest.raises(ValueError):
        ensemble_accuracy([], test)
    with pytest.raises(ValueError, match="label"):
        evaluate(two_models[0], x)


# --------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip_weights_only(tmp_path, two_models):
    model = two_models[0]
    path = save_checkpoint(model, tmp_path / "sub" / "m.pt", seed=0, epochs=2,
                           accuracy=np.float32(0.5), hidden=(4, 2), note=None,
                           extra={"dataset": "digits", "classes": [1, 2]},
                           mean=np.array([0.1, 0.2]))
    raw = torch.load(path, weights_only=True)  # no pickle of arbitrary objects
    assert raw["format"] == "skmerge.checkpoint"
    meta = raw["metadata"]
    assert meta["architecture"] == {"name": "mlp", "kwargs": dict(width=0.25, **DIGITS)}
    assert meta["hidden"] == (4, 2) and isinstance(meta["accuracy"], float)
    assert meta["extra"] == {"dataset": "digits", "classes": [1, 2]}
    torch.testing.assert_close(meta["mean"], torch.tensor([0.1, 0.2], dtype=torch.float64))
    state, meta2 = load_checkpoint(path)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert meta2["seed"] == 0 and meta2["note"] is None
    fresh = get_model("mlp", width=0.25, **DIGITS)
    loaded, _ = load_checkpoint(path, fresh)
    assert loaded is fresh and _same_state(fresh, model)
    rebuilt, meta3 = load_model(path)
    assert _same_state(rebuilt, model) and not rebuilt.training
    assert meta3["epochs"] == 2
    assert not list(tmp_path.glob("sub/*.tmp"))  # atomic write leaves nothing


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_mode_follows_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = save_checkpoint(nn.Linear(3, 2), tmp_path / "m.pt")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_interrupted_checkpoint_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = save_checkpoint(nn.Linear(3, 2), tmp_path / "m.pt", note="old")
    before = path.read_bytes()

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(nn.Linear(3, 2), path, note="new")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_checkpoint_plain_state_dicts_and_errors(tmp_path):
    model = nn.Linear(3, 2)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    state, meta = load_checkpoint(tmp_path / "plain.pt")
    assert meta == {} and torch.equal(state["weight"], model.weight)
    save_checkpoint(model.state_dict(), tmp_path / "sd.pt", name="linear")
    state, meta = load_checkpoint(tmp_path / "sd.pt")
    assert meta == {"name": "linear"} and torch.equal(state["bias"], model.bias)
    with pytest.raises(ValueError, match="architecture"):
        load_model(tmp_path / "sd.pt")
    with pytest.raises(TypeError, match="metadata"):
        save_checkpoint(model, tmp_path / "bad.pt", fn=lambda: 0)
    assert not (tmp_path / "bad.pt").exists()
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="neither"):
        load_checkpoint(tmp_path / "list.pt")
