"""The ``skmerge`` command line: demo, train -> merge -> evaluate, errors, help, docs."""

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from skmerge import CCAAligner, ModelMerger, PermutationAligner, cli
from skmerge.datasets import available_datasets, load_digits
from skmerge.models import available_models, get_model
from skmerge.training import (
    ensemble_accuracy,
    evaluate,
    load_model,
    save_checkpoint,
    train_models,
)

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "docs" / "_generated"
DIGITS = dict(in_channels=1, image_size=8, num_classes=10)
# Every in-process run gets one thread: the tiny models gain nothing from more,
# and the recomputations below must use the same thread count to match bits.
FAST = ["--threads", "1", "--quiet"]
# A demo row: models, method, accuracy, merge time ("-" or "0.12 s").
DEMO_ROW = re.compile(r"^\s*(\d+)  (\S.*?)\s{2,}(\d+\.\d{4})\s{2,}(-|\d+\.\d{2} s)$")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread for the recomputations here, restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def run(capsys, *argv):
    """``main(argv)`` -> (exit status, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(text, first_column):
    """Rows of a CLI table (after its dashed rule) as lists of cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_column))
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def parse_demo(text):
    return [(int(m[1]), m[2], float(m[3]), m[4])
            for m in map(DEMO_ROW.match, text.splitlines()) if m]


# --------------------------------------------------------------------------
# demo


def test_demo_table_structure_and_values(capsys, digits):
    train, test = digits
    code, out, err = run(capsys, "demo", "--n-models", 3, "--epochs", 3, "--width", 0.25,
                         "--threads", 1)
    assert code == 0
    assert "training mlp 1/3" in err and "merging 3 models with cca" in err  # progress
    assert "training mlp" not in out
    rows = parse_demo(out)
    labels = [(n, label) for n, label, _, _ in rows]
    assert labels == [
        (1, "base model, seed 0"), (1, "base model, seed 1"), (1, "base model, seed 2"),
        (2, "ensemble"), (2, "merge, identity"), (2, "merge, permutation"), (2, "merge, cca"),
        (3, "ensemble"), (3, "merge, identity"), (3, "merge, permutation"), (3, "merge, cca"),
    ]
    for n, label, accuracy, seconds in rows:
        assert 0.0 <= accuracy <= 1.0
        assert (seconds == "-") == (not label.startswith("merge"))
        if seconds != "-":
            assert float(seconds[:-2]) >= 0.0
    assert "Base models: mean" in out and "Wall time" in out

    # An independent recomputation with the same recipe and thread count.
    models = train_models(lambda: get_model("mlp", hidden=(64, 64, 64), width=0.25, **DIGITS),
                          train, 3, seeds=[0, 1, 2], epochs=3)
    accuracies = dict(((n, label), a) for n, label, a, _ in rows)
    for seed, model in enumerate(models):
        expected = evaluate(model, test)["accuracy"]
        assert accuracies[(1, f"base model, seed {seed}")] == pytest.approx(expected, abs=5e-5)
    assert accuracies[(3, "ensemble")] == pytest.approx(ensemble_accuracy(models, test), abs=5e-5)
    merged = ModelMerger(models[:2], CCAAligner()).fit(train.tensors[0]).merged_model_
    assert accuracies[(2, "merge, cca")] == pytest.approx(evaluate(merged, test)["accuracy"],
                                                          abs=5e-5)


def test_demo_two_models_and_aligner_subset(capsys):
    code, out, _ = run(capsys, "demo", "--n-models", 2, "--epochs", 1, "--width", 0.25,
                       "--aligners", "cca,identity", *FAST)
    assert code == 0
    assert [label for _, label, _, _ in parse_demo(out)] == [
        "base model, seed 0", "base model, seed 1", "ensemble", "merge, cca", "merge, identity"]


def test_demo_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "accuracy.png"
    code, _, _ = run(capsys, "demo", "--n-models", 2, "--epochs", 1, "--width", 0.25,
                     "--plot", path, *FAST)
    assert code == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_threads_restored(capsys, trained):
    before = torch.get_num_threads()
    a = str(next(trained.glob("*.pt")))
    assert run(capsys, "evaluate", a, "--dataset", "digits", "--threads", 2)[0] == 0
    assert torch.get_num_threads() == before


# --------------------------------------------------------------------------
# train -> merge -> evaluate


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two small MLP checkpoints written by `skmerge train`."""
    out = tmp_path_factory.mktemp("runs")
    code = cli.main(["train", "--model", "mlp", "--hidden", "32,32", "--dataset", "digits",
                     "--n-models", "2", "--epochs", "3", "--seed", "5", "--out", str(out),
                     *FAST])
    assert code == 0
    return out


def test_train_writes_loadable_checkpoints(trained, digits):
    paths = sorted(trained.glob("*.pt"))
    assert [p.name for p in paths] == ["mlp_seed5.pt", "mlp_seed6.pt"]
    for path, seed in zip(paths, (5, 6)):
        payload = torch.load(path, weights_only=True)
        meta = payload["metadata"]
        assert meta["architecture"]["name"] == "mlp"
        assert tuple(meta["architecture"]["kwargs"]["hidden"]) == (32, 32)
        assert (meta["dataset"], meta["seed"], meta["epochs"]) == ("digits", seed, 3)
        model, _ = load_model(path)
        assert meta["test_accuracy"] == pytest.approx(evaluate(model, digits[1])["accuracy"])


def test_train_prints_accuracies(capsys, tmp_path, digits):
    code, out, _ = run(capsys, "train", "--model", "mlp", "--hidden", "16", "--dataset",
                       "digits", "--n-models", 2, "--epochs", 2, "--split", "disjoint",
                       "--out", tmp_path, *FAST)
    assert code == 0
    rows = table_rows(out, "checkpoint")
    assert len(rows) == 2
    for path, seed, n_train, accuracy, loss in rows:
        model, meta = load_model(path)
        assert float(accuracy) == pytest.approx(evaluate(model, digits[1])["accuracy"], abs=5e-5)
        assert int(n_train) == meta["n_train"] < len(digits[0])  # disjoint classes
        assert len(meta["classes"]) == 5


def test_merge_then_evaluate(capsys, trained, tmp_path, digits):
    train, test = digits
    a, b = sorted(map(str, trained.glob("*.pt")))
    out_path = tmp_path / "merged.pt"
    code, out, _ = run(capsys, "merge", a, b, "--dataset", "digits", "--out", out_path, *FAST)
    assert code == 0, out
    payload = torch.load(out_path, weights_only=True)
    meta = payload["metadata"]
    assert meta["merged_from"] == [a, b]
    assert (meta["aligner"], meta["reference"], meta["n_align"]) == ("cca", 0, len(train))
    merged, _ = load_model(out_path)
    rows = {r[0]: r[1:] for r in table_rows(out, "model")}
    assert set(rows) == {a, b, "ensemble of 2", "merged (cca)"}
    expected = ModelMerger([load_model(a)[0], load_model(b)[0]]).fit(train.tensors[0])
    assert float(rows["merged (cca)"][0]) == pytest.approx(expected.score(test), abs=5e-5)
    assert float(rows["merged (cca)"][0]) == pytest.approx(evaluate(merged, test)["accuracy"],
                                                           abs=5e-5)
    assert "merge time" in out and str(out_path) in out

    code, out, _ = run(capsys, "evaluate", a, b, out_path, "--dataset", "digits", *FAST)
    assert code == 0
    rows = {r[0]: r[1:] for r in table_rows(out, "model")}
    assert set(rows) == {a, b, str(out_path), "ensemble of 3"}
    models = [load_model(p)[0] for p in (a, b, out_path)]
    scores = evaluate(models[0], test)
    assert float(rows[a][0]) == pytest.approx(scores["accuracy"], abs=5e-5)
    assert float(rows[a][1]) == pytest.approx(scores["loss"], abs=5e-5)
    assert float(rows["ensemble of 3"][0]) == pytest.approx(ensemble_accuracy(models, test),
                                                            abs=5e-5)


def test_merge_options(capsys, trained, tmp_path):
    a, b = sorted(map(str, trained.glob("*.pt")))
    out_path = tmp_path / "perm.pt"
    code, out, _ = run(capsys, "merge", a, b, "--dataset", "digits", "--aligner", "permutation",
                       "--reference", 1, "--weights", "1,3", "--n-align", 300, "--out",
                       out_path, *FAST)
    assert code == 0
    meta = torch.load(out_path, weights_only=True)["metadata"]
    assert (meta["aligner"], meta["reference"], meta["n_align"]) == ("permutation", 1, 300)
    assert meta["weights"] == pytest.approx([0.25, 0.75])
    code, _, _ = run(capsys, "merge", a, b, "--dataset", "digits", "--regularization", "0.1",
                     "--out", tmp_path / "cca.pt", *FAST)
    assert code == 0
    meta = torch.load(tmp_path / "cca.pt", weights_only=True)["metadata"]
    assert meta["aligner_params"] == {"regularization": 0.1, "solver": "auto"}


def test_merge_taps_are_passed_to_the_merger_and_recorded(capsys, trained, tmp_path, monkeypatch):
    from skmerge import ModelMerger
    from skmerge.cli import MERGE_DEFAULT_TAPS, MERGE_TAPS
    from skmerge.graph._walk import DEFAULT_TAPS, TAPS

    assert MERGE_TAPS == TAPS and MERGE_DEFAULT_TAPS == DEFAULT_TAPS
    seen, find = [], ModelMerger._spaces

    def spy(self, *args):
        seen.append(self.taps)
        return find(self, *args)

    monkeypatch.setattr(ModelMerger, "_spaces", spy)
    a, b = sorted(map(str, trained.glob("*.pt")))
    code, _, _ = run(capsys, "merge", a, b, "--dataset", "digits", "--n-align", 300, "--taps", "consumers",
                     "--out", tmp_path / "consumers.pt", *FAST)
    assert code == 0
    assert torch.load(tmp_path / "consumers.pt", weights_only=True)["metadata"]["taps"] == "consumers"
    assert seen == ["consumers"]
    code, _, err = run(capsys, "merge", a, b, "--dataset", "digits", "--taps", "inputs",
                       "--out", tmp_path / "x.pt", *FAST)
    assert code == 2 and "invalid choice: 'inputs'" in err and not (tmp_path / "x.pt").exists()


def test_merge_with_space_aligners(capsys, trained, tmp_path):
    a, b = sorted(map(str, trained.glob("*.pt")))
    code, _, _ = run(capsys, "merge", a, b, "--dataset", "digits", "--n-align", 300,
                     "--space-aligner", "*=permutation", "--out", tmp_path / "mixed.pt", *FAST)
    assert code == 0
    code, _, _ = run(capsys, "merge", a, b, "--dataset", "digits", "--n-align", 300,
                     "--aligner", "permutation", "--out", tmp_path / "perm.pt", *FAST)
    assert code == 0
    mixed = torch.load(tmp_path / "mixed.pt", weights_only=True)
    plain = torch.load(tmp_path / "perm.pt", weights_only=True)
    assert mixed["metadata"]["space_aligners"] == [["*", "permutation"]]
    assert mixed["metadata"]["aligner"] == "cca"
    assert all(torch.equal(v, plain["state_dict"][k]) for k, v in mixed["state_dict"].items())
    code, _, err = run(capsys, "merge", a, b, "--dataset", "digits", "--space-aligner", "*conv*=permutation",
                       "--out", tmp_path / "x.pt", *FAST)
    assert code == 2 and "'*conv*' matches none of the" in err and "Traceback" not in err
    assert not (tmp_path / "x.pt").exists()
    code, _, err = run(capsys, "merge", a, b, "--dataset", "digits", "--space-aligner", "*=magic",
                       "--out", tmp_path / "x.pt", *FAST)
    assert code == 2 and "unknown aligner 'magic'" in err


def test_bare_state_dicts_need_model(capsys, trained, tmp_path):
    bare = []
    for path in sorted(trained.glob("*.pt")):
        target = tmp_path / path.name
        torch.save(load_model(path)[0].state_dict(), target)
        bare.append(target)
    code, _, err = run(capsys, "merge", *bare, "--dataset", "digits", "--out",
                       tmp_path / "m.pt", *FAST)
    assert code == 2 and "--model" in err
    code, _, _ = run(capsys, "merge", *bare, "--dataset", "digits", "--model", "mlp",
                     "--hidden", "32,32", "--out", tmp_path / "m.pt", *FAST)
    assert code == 0
    assert load_model(tmp_path / "m.pt")[0].classifier.in_features == 32


# --------------------------------------------------------------------------
# errors: exit status 2, one line on stderr, no traceback


@pytest.fixture(scope="module")
def odd_checkpoints(tmp_path_factory):
    """Checkpoints that must not merge with the trained ones, and broken files."""
    root = tmp_path_factory.mktemp("odd")
    torch.manual_seed(0)
    save_checkpoint(get_model("mlp", hidden=(16, 16), **DIGITS), root / "narrow.pt")
    save_checkpoint(get_model("vgg11", width=0.25, **DIGITS), root / "vgg.pt")
    save_checkpoint(get_model("mlp", hidden=(32, 32), **DIGITS), root / "unknown_arch.pt",
                    architecture={"name": "transformer9000", "kwargs": {}})
    save_checkpoint(get_model("mlp", hidden=(32, 32), in_channels=3, image_size=32,
                              num_classes=10), root / "cifar_mlp.pt")
    (root / "garbage.pt").write_bytes(b"this is not a checkpoint")
    (root / "empty").mkdir()
    # Metadata asking for 10^6 x 10^6 hidden layers: 4 TB of float32 weights.
    save_checkpoint(get_model("mlp", hidden=(32, 32), **DIGITS), root / "huge_hidden.pt",
                    architecture={"name": "mlp", "kwargs": dict(hidden=[10**6, 10**6], **DIGITS)})
    return root


ERROR_CASES = {
    "missing checkpoint": (["merge", "{a}", "{odd}/nope.pt", "--dataset", "digits",
                            "--out", "{tmp}/m.pt"], "not found"),
    "folder as checkpoint": (["evaluate", "{odd}/empty", "--dataset", "digits"], "not a file"),
    "garbage checkpoint": (["evaluate", "{odd}/garbage.pt", "--dataset", "digits"],
                           "not a checkpoint"),
    "different shapes": (["merge", "{a}", "{odd}/narrow.pt", "--dataset", "digits",
                          "--out", "{tmp}/m.pt"], "has shape (16, 64)"),
    "different architectures": (["merge", "{a}", "{odd}/vgg.pt", "--dataset", "digits",
                                 "--out", "{tmp}/m.pt"], "different architectures"),
    "unknown architecture": (["evaluate", "{odd}/unknown_arch.pt", "--dataset", "digits"],
                             "transformer9000"),
    "model for other data": (["evaluate", "{odd}/cifar_mlp.pt", "--dataset", "digits"],
                             "cannot read digits images"),
    "unknown model option": (["train", "--model", "mlp2", "--dataset", "digits",
                              "--out", "{tmp}"], "available models: mlp"),
    "unknown dataset": (["evaluate", "{a}", "--dataset", "mnist"], "available datasets"),
    "missing dataset files": (["evaluate", "{a}", "--dataset", "fashion-mnist",
                               "--data-root", "{odd}/empty"], "apt-get install"),
    "one checkpoint": (["merge", "{a}", "--dataset", "digits", "--out", "{tmp}/m.pt"],
                       "at least 2"),
    "reference out of range": (["merge", "{a}", "{b}", "--dataset", "digits", "--reference", "2",
                                "--out", "{tmp}/m.pt"], "out of range"),
    "regularization value": (["merge", "{a}", "{b}", "--dataset", "digits",
                              "--regularization", "1.5", "--out", "{tmp}/m.pt"], "[0, 1]"),
    "regularization without cca": (["merge", "{a}", "{b}", "--dataset", "digits", "--aligner",
                                    "identity", "--regularization", "0.1", "--out",
                                    "{tmp}/m.pt"], "cca"),
    "too many alignment samples": (["merge", "{a}", "{b}", "--dataset", "digits", "--n-align",
                                    "100000", "--out", "{tmp}/m.pt"], "--n-align"),
    "learned coefficients with repair": (["merge", "{a}", "{b}", "--dataset", "digits",
                                          "--learn-coefficients", "2", "--repair", "--out",
                                          "{tmp}/m.pt"], "cannot be combined"),
    "learned coefficients epochs": (["merge", "{a}", "{b}", "--dataset", "digits",
                                     "--learn-coefficients", "0", "--out", "{tmp}/m.pt"],
                                    "--learn-coefficients"),
    "weights count": (["merge", "{a}", "{b}", "--dataset", "digits", "--weights", "1,2,3",
                       "--out", "{tmp}/m.pt"], "--weights"),
    "out is a folder": (["merge", "{a}", "{b}", "--dataset", "digits", "--out", "{tmp}"],
                        "is a folder"),
    "width without model": (["evaluate", "{a}", "--dataset", "digits", "--width", "2"],
                            "--model"),
    "too few demo models": (["demo", "--n-models", "1"], "at least 2"),
    "unknown aligner": (["demo", "--aligners", "cca,zipit"], "comma-separated"),
    "bad integer": (["demo", "--epochs", "ten"], "integer"),
    "no command": ([], "missing command"),
    "unknown command": (["mergee"], "invalid choice"),
    "missing required option": (["merge", "{a}", "{b}", "--dataset", "digits"], "--out"),
    "meta device": (["evaluate", "{a}", "--dataset", "digits", "--device", "meta"],
                    "meta device"),
    "unknown device": (["evaluate", "{a}", "--dataset", "digits", "--device", "gpu"],
                       "not a torch device"),
    "out is an input": (["merge", "{a}", "{b}", "--dataset", "digits", "--out", "{b}"],
                        "is one of the input checkpoints"),
    "negative weights": (["merge", "{a}", "{b}", "--dataset", "digits", "--weights", "-1,2",
                          "--out", "{tmp}/m.pt"], "weights must be non-negative"),
    "negative width": (["train", "--model", "mlp", "--dataset", "digits", "--width", "-1e3",
                        "--out", "{tmp}"], "must be a positive number"),
    "huge width": (["train", "--model", "mlp", "--dataset", "digits", "--width", "1e9",
                    "--out", "{tmp}"], "parameters"),
    "huge hidden sizes in metadata": (["evaluate", "{odd}/huge_hidden.pt", "--dataset", "digits"],
                                      "parameters"),
    "train out below a file": (["train", "--model", "mlp", "--dataset", "digits",
                                "--out", "{a}/runs"], "not a folder"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors(case, capsys, trained, odd_checkpoints, tmp_path):
    argv, expected = ERROR_CASES[case]
    a, b = sorted(map(str, trained.glob("*.pt")))
    argv = [x.format(a=a, b=b, odd=odd_checkpoints, tmp=tmp_path) for x in argv]
    code, out, err = run(capsys, *argv, *(FAST if argv else []))
    assert code == 2
    assert out == ""
    assert err.startswith("skmerge: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert expected in err


def test_out_is_checked_before_any_work(capsys, trained, tmp_path, monkeypatch):
    import skmerge.training

    started = []
    monkeypatch.setattr(skmerge.training, "train_models", lambda *a, **k: started.append(1))
    monkeypatch.setattr(ModelMerger, "fit", lambda *a, **k: started.append(1))
    a, b = sorted(map(str, trained.glob("*.pt")))
    before = Path(b).read_bytes()
    for out in (b, str(Path(b).parent / "." / Path(b).name)):
        code, _, err = run(capsys, "merge", a, b, "--dataset", "digits", "--out", out, *FAST)
        assert code == 2 and "is one of the input checkpoints" in err
    assert Path(b).read_bytes() == before
    code, _, err = run(capsys, "train", "--model", "mlp", "--dataset", "digits", "--out",
                       Path(a) / "runs", *FAST)
    assert code == 2 and "not a folder" in err
    code, _, err = run(capsys, "train", "--model", "mlp", "--dataset", "digits", "--out",
                       a, *FAST)
    assert code == 2 and "not a folder" in err
    assert not started


def test_checkpoints_follow_the_umask(capsys, trained, tmp_path):
    a, b = sorted(map(str, trained.glob("*.pt")))
    previous = os.umask(0o027)
    try:
        code, _, _ = run(capsys, "merge", a, b, "--dataset", "digits", "--n-align", 200,
                         "--out", tmp_path / "m.pt", *FAST)
    finally:
        os.umask(previous)
    assert code == 0
    assert (tmp_path / "m.pt").stat().st_mode & 0o777 == 0o640
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(capsys):
    code, out, err = run(capsys, "demo", "--device", "cuda", *FAST)
    assert code == 2 and out == "" and "CUDA is not available" in err


def test_plot_without_matplotlib(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code, out, err = run(capsys, "demo", "--plot", "x.png", *FAST)
    assert code == 2 and out == ""
    assert "skmerge[plot]" in err and err.count("\n") == 1


def test_debug_shows_traceback(capsys):
    with pytest.raises(cli.CLIError, match="checkpoint not found"):
        cli.main(["--debug", "evaluate", "missing.pt", "--dataset", "digits"])


# --------------------------------------------------------------------------
# help, entry point, registries


@pytest.mark.parametrize("command", [None, "demo", "train", "merge", "evaluate"])
def test_help(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    code, out, err = run(capsys, *argv)
    assert code == 0 and err == ""
    assert out.startswith(f"usage: skmerge{'' if command is None else ' ' + command}")
    assert "examples:" in out


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("skmerge ")


def test_entry_point(trained):
    """`python -m skmerge.cli` runs main and exits with its status; `skmerge` is main."""
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "skmerge"]
    assert script.value == "skmerge.cli:main"
    a = str(next(trained.glob("*.pt")))
    done = subprocess.run([sys.executable, "-m", "skmerge.cli", "evaluate", a, a + ".missing",
                           "--dataset", "digits"], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"skmerge: error: checkpoint not found: {a}.missing\n"


def test_names_match_registries():
    assert list(cli.MODELS) == available_models()
    assert list(cli.DATASETS) == available_datasets()


# --------------------------------------------------------------------------
# generated documentation


def test_generated_help_is_current(capsys, monkeypatch):
    """docs/_generated/cli_*.txt match today's --help (regenerate with
    `python benchmarks/demo_output.py --help-only`)."""
    if sys.version_info >= (3, 13):
        pytest.skip("argparse lays out --help differently from Python 3.13 on")
    monkeypatch.setenv("COLUMNS", "80")
    for command in (None, "demo", "train", "merge", "evaluate"):
        name = "cli_help.txt" if command is None else f"cli_help_{command}.txt"
        argv = ["--help"] if command is None else [command, "--help"]
        _, out, _ = run(capsys, *argv)
        prompt = "$ skmerge " + " ".join(argv)
        assert (GENERATED / name).read_text() == f"{prompt}\n{out}", (
            f"docs/_generated/{name} is stale: run python benchmarks/demo_output.py --help-only")


def test_generated_demo_output_has_the_table():
    text = (GENERATED / "demo.txt").read_text()
    assert text.startswith("$ skmerge demo\n")
    rows = parse_demo(text)
    assert [label for n, label, _, _ in rows if n == 4] == [
        "ensemble", "merge, identity", "merge, permutation", "merge, cca"]
    assert sum(label.startswith("base model") for _, label, _, _ in rows) == 4


def test_getting_started_example_runs():
    """The Python example of docs/user_guide/getting_started.rst runs as written."""
    text = (ROOT / "docs" / "user_guide" / "getting_started.rst").read_text()
    block = re.search(r"\.\. code-block:: python\n\n((?:   .*\n|\n)+)", text)
    code = "\n".join(line[3:] for line in block.group(1).splitlines())
    namespace = {}
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(compile(code, "getting_started.rst", "exec"), namespace)
    assert 0.0 <= namespace["accuracy"] <= 1.0
    # The page quotes the printed line; training is bit-reproducible for one
    # torch version and thread count (this module runs on one thread).
    claimed = re.search(r"It prints ``(.*?)``", text).group(1)
    if torch.__version__.startswith("2.13."):
        assert buffer.getvalue().strip() == claimed


def test_every_command_line_aligner_name_builds_its_aligner():
    from skmerge import OptimalTransportAligner, ProcrustesAligner
    from skmerge._demo import ALIGNERS, make_aligner

    built = {name: make_aligner(name) for name in ALIGNERS}
    assert isinstance(built["procrustes"], ProcrustesAligner)
    assert isinstance(built["ot"], OptimalTransportAligner)
    assert all(hasattr(aligner, "fit_from_stats") for aligner in built.values())
    with pytest.raises(ValueError, match="cca aligner only"):
        make_aligner("ot", regularization=0.1)


def test_merge_reference_free_with_repair(capsys, trained, tmp_path, digits):
    from skmerge import PermutationAligner
    from skmerge.reference_free import ReferenceFreeMerger

    train, test = digits
    a, b = sorted(map(str, trained.glob("*.pt")))
    out_path = tmp_path / "free.pt"
    code, out, _ = run(capsys, "merge", a, b, "--dataset", "digits", "--aligner", "permutation",
                       "--reference-free", "--repair", "--out", out_path, *FAST)
    assert code == 0, out
    meta = torch.load(out_path, weights_only=True)["metadata"]
    assert (meta["reference_free"], meta["repair"]) == (True, True)
    rows = {r[0]: r[1:] for r in table_rows(out, "model")}
    label = "merged (permutation, reference-free, REPAIR)"
    assert label in rows
    expected = ReferenceFreeMerger([load_model(a)[0], load_model(b)[0]], PermutationAligner(),
                                   repair=True).fit(train.tensors[0])
    assert float(rows[label][0]) == pytest.approx(expected.score(test), abs=5e-5)
    merged, _ = load_model(out_path)
    assert float(rows[label][0]) == pytest.approx(evaluate(merged, test)["accuracy"], abs=5e-5)


def test_merge_with_learned_coefficients(capsys, trained, tmp_path, digits):
    train, test = digits
    a, b = sorted(map(str, trained.glob("*.pt")))
    out_path = tmp_path / "learned.pt"
    code, out, _ = run(capsys, "merge", a, b, "--dataset", "digits", "--aligner", "permutation",
                       "--learn-coefficients", 2, "--n-align", 400, "--out", out_path, *FAST)
    assert code == 0, out
    meta = torch.load(out_path, weights_only=True)["metadata"]
    assert meta["coefficient_epochs"] == 2
    coefficients = meta["learned_coefficients"]
    merged, _ = load_model(out_path)
    rows = {r[0]: r[1:] for r in table_rows(out, "model")}
    label = "merged (permutation, learned coefficients)"
    assert float(rows[label][0]) == pytest.approx(evaluate(merged, test)["accuracy"], abs=5e-5)
    # The saved weights are the learned mixture of the aligned models (the
    # alignment on the same 400 images, recomputed with the Python API).
    rows_used = np.sort(np.random.default_rng(0).choice(len(train), 400, replace=False))
    aligned = ModelMerger([load_model(a)[0], load_model(b)[0]], PermutationAligner()).fit(
        train.tensors[0][torch.from_numpy(rows_used)]).aligned_state_dicts()
    state = merged.state_dict()
    assert set(coefficients) == {name for name, _ in merged.named_parameters()}
    for name, values in coefficients.items():
        assert len(values) == 2 and sum(values) == pytest.approx(1.0) and min(values) >= 0
        mixture = sum(c * s[name] for c, s in zip(values, aligned))
        torch.testing.assert_close(state[name], mixture.to(state[name].dtype), rtol=1e-5, atol=1e-6)
    assert any(abs(values[0] - 0.5) > 1e-3 for values in coefficients.values())  # learning moved them
