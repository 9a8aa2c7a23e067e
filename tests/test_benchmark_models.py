"""The committed base models of the benchmarks (benchmarks/models/) load with skmerge.

Guards the checkpoints against changes of skmerge.models (parameter names,
shapes) and of the checkpoint format: every file listed in the manifest must
rebuild, in float32, into the architecture that its metadata and the manifest
name, with exactly the stored float16 values. No data is needed; the test
accuracies are re-measured by ``python benchmarks/base_models.py --verify``.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from skmerge.training import load_model

MODELS = Path(__file__).resolve().parents[1] / "benchmarks" / "models"
MANIFEST = MODELS / "MANIFEST.json"

pytestmark = pytest.mark.skipif(not MANIFEST.exists(), reason="no committed base models")


def _manifest() -> dict:
    return json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {"families": {}}


RECORDS = [(family, int(seed), record) for family, fam in _manifest()["families"].items()
           for seed, record in fam["seeds"].items()]


@pytest.mark.parametrize("family,seed,record", RECORDS,
                         ids=[f"{f}-seed{s}" for f, s, _ in RECORDS])
def test_checkpoint_rebuilds_in_float32(family, seed, record):
    path = MODELS / record["file"]
    assert path == MODELS / family / f"seed{seed}.pt"
    assert path.stat().st_size == record["bytes"]
    stored = torch.load(path, weights_only=True)["state_dict"]
    assert any(v.dtype == torch.float16 for v in stored.values())
    assert all(v.dtype == torch.float16 for v in stored.values() if v.is_floating_point())

    model, meta = load_model(path)
    fam = _manifest()["families"][family]
    assert (meta["family"], meta["seed"]) == (family, seed)
    assert meta["architecture"] == fam["architecture"]
    assert meta["recipe"] == fam["recipe"]
    assert meta["test_accuracy"] == record["test_accuracy"]
    assert abs(record["test_accuracy"] - record["test_accuracy_float32"]) <= 0.001 + 1e-9
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == fam["parameters"]
    state = model.state_dict()
    assert state.keys() == stored.keys()
    for key, value in state.items():
        if stored[key].is_floating_point():
            assert value.dtype == torch.float32
            assert torch.equal(value.half(), stored[key]), key
        else:
            assert torch.equal(value, stored[key]), key
    with torch.no_grad():
        logits = model(torch.zeros(2, 1, 28, 28))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_heldout_split_is_a_fixed_subset_of_the_training_set():
    split = json.loads((MODELS / "split.json").read_text())
    idx = np.asarray(split["heldout_indices"])
    assert len(idx) == split["n_heldout"] == _manifest()["data"]["n_heldout"]
    assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < split["n_total"] == 60000
    assert _manifest()["data"]["n_train"] == 60000 - len(idx)
