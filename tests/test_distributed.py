"""ModelMerger under torch.distributed: 2 gloo ranks on the loopback interface.

The test launches two worker processes (this file run as a script, one per
rank) that join a gloo process group on 127.0.0.1, each fit the same seeded
models on their own shard of the data and save what they got. The parent
compares that with one process fitting the full data (shard 0 ++ shard 1):
statistics to ~1e-10 relative, merged weights and the re-estimated BatchNorm
buffers to a tight tolerance, also when the ranks cut their shards into other
batches than the single process (the statistics and the BatchNorm sums do not
depend on batches).

Everything is bounded in time: ``init_process_group(timeout=...)``, a timeout
on every process wait (the workers are killed on expiry) and a pytest-timeout
marker on top.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _archs import MLP, VGGBN  # noqa: E402

from skmerge import CCAAligner, ModelMerger  # noqa: E402
from skmerge._distributed import all_reduce_statistics, is_distributed  # noqa: E402
from skmerge.stats import ReferenceCovariance  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
SHARDS = (100, 60)  # unequal on purpose: the counts must weigh the ranks
N_MODELS = 3
PROCESS_TIMEOUT = 120  # seconds, per launch
PG_TIMEOUT = timedelta(seconds=60)


# --------------------------------------------------------------------------
# What every rank (and the single process) computes
# --------------------------------------------------------------------------
def _models(arch, n=N_MODELS):
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        model = arch()
        if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
            # Non-trivial running statistics, as a trained model would have.
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, torch.nn.BatchNorm2d):
                        m.running_mean.normal_(0, 0.1)
                        m.running_var.uniform_(0.5, 2.0)
                        m.weight.uniform_(0.5, 1.5)
                        m.bias.normal_(0, 0.1)
        models.append(model)
    return models


def _data(arch, offset=0.0):
    generator = torch.Generator().manual_seed(1234)
    return torch.randn((sum(SHARDS), *arch.input_shape), generator=generator) + offset


def _shard(data, rank):
    start = sum(SHARDS[:rank])
    return data[start:start + SHARDS[rank]]


CASES = {
    # name: (architecture, input offset, reset_bn, (batch size of the ranks, of one process))
    "mlp": (MLP, 0.0, False, (SHARDS[0], SHARDS[0])),
    "mlp_offset": (MLP, 1e3, False, (SHARDS[0], SHARDS[0])),
    "vgg": (VGGBN, 0.0, False, (SHARDS[0], SHARDS[0])),
    "vgg_reset_bn": (VGGBN, 0.0, True, (SHARDS[0], SHARDS[0])),
    # ranks: batches of 32, 32, 32, 4 and 32, 28; one process: 3 batches of 50 and one of 10
    "vgg_reset_bn_other_batches": (VGGBN, 0.0, "exact", (32, 50)),
    # the default two-pass estimate: its first pass normalizes with each batch's statistics
    "vgg_two_pass_other_batches": (VGGBN, 0.0, True, (32, 50)),
    # RegMean's Gram matrices of the layer inputs are sums over every rank's shard
    "vgg_regmean": (VGGBN, 0.0, False, (SHARDS[0], SHARDS[0]), "regmean"),
}


def _fit_case(name, rank=None, device="cpu"):
    """Fit one case on the full data (``rank=None``) or on one rank's shard."""
    arch, offset, reset_bn, batch_sizes, *combine = CASES[name]
    data = _data(arch, offset)
    if rank is not None:
        data = _shard(data, rank)
    merger = ModelMerger(_models(arch), CCAAligner(), device=device, reset_bn=reset_bn,
                         batch_size=batch_sizes[rank is None], combine=(combine or ["uniform"])[0])
    merger.fit(data)
    return {
        "statistics": merger.statistics_,
        "state_dict": {k: v.clone() for k, v in merger.merged_model_.state_dict().items()},
    }


def _raw_views(seed, n, dims=(5, 3, 4), offset=1e6):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=generator, dtype=torch.float64) * (1 + k) + offset
            for k, d in enumerate(dims)]


def _worker(rank: int, port: int, out: Path, device: str = "cpu") -> None:
    """Body of one rank (run in a subprocess, see the ``__main__`` block).

    ``device="cuda"`` (used by tests/test_gpu.py) fits on the GPU, still with
    gloo, which all-reduces CUDA tensors too (both ranks share the one GPU,
    which NCCL would refuse).
    """
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=PG_TIMEOUT)
    try:
        assert is_distributed()
        if device != "cpu":
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            results = {name: _fit_case(name, rank, device) for name in CASES}
            for result in results.values():
                result["statistics"] = [s.to("cpu") for s in result["statistics"]]
                result["state_dict"] = {k: v.cpu() for k, v in result["state_dict"].items()}
            dist.barrier()
            torch.save(results, out / f"rank{rank}.pt")
            return
        results = {name: _fit_case(name, rank) for name in CASES}

        # all_reduce_statistics directly: huge offset, unequal shards, and one
        # space that only rank 0 observed (rank 1's statistics stay empty).
        views = _raw_views(rank, SHARDS[rank])
        observed = ReferenceCovariance(3, reference=1).update(views)
        partial = ReferenceCovariance(3, reference=1)
        if rank == 0:
            partial.update(views)
        before = observed.auto_comoments_[0].clone()
        results["raw"] = all_reduce_statistics([observed, partial])
        results["raw_input_untouched"] = torch.equal(before, observed.auto_comoments_[0])

        # A mismatch raises the same clear error on every rank (no hang).
        mismatch = [ReferenceCovariance(2).update(views[:2])] * (1 + rank)
        try:
            all_reduce_statistics(mismatch)
        except ValueError as error:
            results["mismatch_error"] = str(error)
        dist.barrier()
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _loopback_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    for name in ("lo", "lo0"):
        if name in names:
            env["GLOO_SOCKET_IFNAME"] = name  # gloo's pairs bind to loopback only
            break
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    # the ranks import skmerge from this checkout, not from wherever it is installed
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session started for this process only
    except (ProcessLookupError, PermissionError, AttributeError):
        proc.kill()


def run_ranks(commands, timeout=PROCESS_TIMEOUT, attempts=2):
    """Run one command per rank (``commands(port)``); return their outputs.

    Kills every process on timeout; retries once with a new port if the
    rendezvous port was taken in the meantime.
    """
    for attempt in range(attempts):
        port = _free_port()
        # Own sessions, so that a timeout kills torchrun's workers too.
        procs = [subprocess.Popen(cmd, env=_loopback_env(), cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
                 for cmd in commands(port)]
        outputs = []
        try:
            for proc in procs:
                outputs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for proc in procs:
                _kill(proc)
            logs = [proc.communicate()[0] for proc in procs]
            pytest.fail(f"distributed run exceeded {timeout} s:\n" + "\n----\n".join(logs))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    _kill(proc)
                    proc.wait()
        if all(proc.returncode == 0 for proc in procs):
            return outputs
        joined = "\n----\n".join(outputs)
        if attempt + 1 < attempts and "address already in use" in joined.lower():
            continue
        pytest.fail(f"a rank failed (exit codes {[p.returncode for p in procs]}):\n{joined}")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    run_ranks(lambda port: [[sys.executable, __file__, str(rank), str(port), str(out)]
                            for rank in range(WORLD)])
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    return {name: _fit_case(name) for name in CASES}


# --------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------
def _relative_error(a, b):
    scale = max(float(b.abs().max()), 1e-300)
    return float((a - b).abs().max()) / scale


def _assert_statistics_equal(got, expected, rtol=1e-10):
    assert got.n_samples_ == expected.n_samples_
    assert isinstance(got.n_samples_, int)
    for name in ("means_", "auto_comoments_", "cross_comoments_"):
        for a, b in zip(getattr(got, name), getattr(expected, name)):
            assert a.dtype == torch.float64
            assert a.shape == b.shape
            assert _relative_error(a, b) <= rtol, name


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(CASES))
def test_statistics_equal_single_process(distributed, single, name):
    expected = single[name]["statistics"]
    assert sum(s.n_samples_ for s in expected) > 0
    # Other batches: each batch's float32 products round differently (precision="single").
    ranks_batch, single_batch = CASES[name][3]
    rtol = 1e-10 if ranks_batch == single_batch else 5e-6
    for rank in range(WORLD):
        got = distributed[rank][name]["statistics"]
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            _assert_statistics_equal(g, e, rtol)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(CASES))
def test_merged_weights_equal_single_process(distributed, single, name):
    expected = single[name]["state_dict"]
    ranks = [distributed[rank][name]["state_dict"] for rank in range(WORLD)]
    # Every rank built the identical model, bit for bit.
    for key in expected:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # Observed: 0, or ~1e-8 with the 1e3 input offset; with other batches the
    # statistics' float32 products round differently: ~6e-6.
    tolerance = 1e-6 if CASES[name][3][0] == CASES[name][3][1] else 2e-5
    for key, value in expected.items():
        got = ranks[0][key]
        if name == "vgg_two_pass_other_batches" and "running_" in key:
            continue  # see test_two_pass_batchnorm_statistics_depend_little_on_the_batches
        assert got.dtype == value.dtype and got.shape == value.shape, key
        if value.is_floating_point():
            torch.testing.assert_close(got, value, rtol=tolerance, atol=tolerance, msg=key)
        else:
            assert torch.equal(got, value), key


@pytest.mark.timeout(300)
def test_two_pass_batchnorm_statistics_depend_little_on_the_batches(distributed, single):
    """The default two passes: the first normalizes with each batch's statistics, as training does."""
    expected = single["vgg_two_pass_other_batches"]["state_dict"]
    got = distributed[0]["vgg_two_pass_other_batches"]["state_dict"]
    for key in [k for k in expected if "running_" in k]:
        scale = float(expected[key].abs().max())
        assert float((got[key] - expected[key]).abs().max()) <= 5e-3 * scale, key


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["vgg_reset_bn", "vgg_reset_bn_other_batches"])
def test_batchnorm_reestimation_reduced(distributed, single, name):
    expected = single[name]["state_dict"]
    got = distributed[0][name]["state_dict"]
    keys = [k for k in expected if "running_" in k or "num_batches_tracked" in k]
    assert len(keys) == 9
    for key in keys:
        # Exact population statistics: float32 rounding of the activations and
        # weights only, observed below 3e-6 (up to 1% with train-mode batches).
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    # The BN buffers were re-estimated (not the averaged ones of reset_bn=False).
    no_reset = single["vgg"]["state_dict"]
    assert not torch.allclose(expected["features.1.running_mean"], no_reset["features.1.running_mean"])


@pytest.mark.timeout(300)
def test_all_reduce_statistics_direct(distributed):
    full_views = [torch.cat(parts) for parts in zip(*(_raw_views(r, SHARDS[r]) for r in range(WORLD)))]
    full = ReferenceCovariance(3, reference=1).update(full_views)
    only_rank0 = ReferenceCovariance(3, reference=1).update(_raw_views(0, SHARDS[0]))
    for rank in range(WORLD):
        observed, partial = distributed[rank]["raw"]
        _assert_statistics_equal(observed, full, rtol=1e-10)
        _assert_statistics_equal(partial, only_rank0, rtol=1e-10)
        assert distributed[rank]["raw_input_untouched"]
        assert "different numbers of spaces" in distributed[rank]["mismatch_error"]
    # With offset 1e6 the covariances are still right in absolute terms.
    expected_cov = torch.cov(full_views[2].T)
    got_cov = distributed[0]["raw"][0].covariance(2)
    assert _relative_error(got_cov, expected_cov) < 1e-8


def test_single_process_is_a_no_op():
    assert not is_distributed()
    stats = [ReferenceCovariance(2).update([torch.randn(4, 2), torch.randn(4, 3)])]
    assert all_reduce_statistics(stats) is stats


def test_nccl_reduces_cpu_tensors_through_cuda(monkeypatch):
    import skmerge._distributed as module

    monkeypatch.setattr(module.torch.cuda, "current_device", lambda: 0)
    for backend, expected in [("nccl", "cuda"), ("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu")]:
        monkeypatch.setattr(module.dist, "get_backend", lambda group=None, _b=backend: _b)
        assert module._comm_device(torch.zeros(1)).type == expected, backend


# --------------------------------------------------------------------------
# The documented example, launched with torchrun
# --------------------------------------------------------------------------
EXAMPLE = REPO / "examples" / "distributed_merge.py"


@pytest.mark.slow  # three interpreters (torchrun's agent and 2 ranks): 10-40 s on 2 busy cores
@pytest.mark.timeout(300)
@pytest.mark.skipif(not EXAMPLE.exists(), reason="examples/ not present")
def test_example_with_torchrun_equals_single_process(tmp_path, monkeypatch):
    import runpy

    args = ["--models-dir", str(tmp_path / "models"), "--n-models", "2", "--epochs", "1",
            "--device", "cpu"]
    # torchrun: 2 ranks of 599 samples, one batch each; rank 0 trains the models first.
    outputs = run_ranks(lambda port: [[
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={port}", str(EXAMPLE),
        *args, "--batch-size", "599", "--out", str(tmp_path / "dist.pt")]])
    assert "merged (2 process(es), 599 samples on rank 0)" in outputs[0]

    # The same script as one plain process on all 1,198 samples (two batches of 599).
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), *args, "--batch-size", "599",
                                      "--out", str(tmp_path / "single.pt")])
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    single = torch.load(tmp_path / "single.pt")
    dist_state = torch.load(tmp_path / "dist.pt")
    assert single.keys() == dist_state.keys()
    for key, value in single.items():
        torch.testing.assert_close(dist_state[key], value, rtol=1e-6, atol=1e-6, msg=key)


# --------------------------------------------------------------------------
# Memory of the statistics
# --------------------------------------------------------------------------
def reference_covariance_bytes(n_models: int, d: int) -> int:
    """float64 bytes of one space's ReferenceCovariance: n auto + (n-1) cross d x d, n means."""
    return 8 * ((2 * n_models - 1) * d * d + n_models * d)


def test_reference_covariance_memory_16_views_d512():
    n_models, d = 16, 512
    views = [torch.randn(2, d) for _ in range(n_models)]
    stats = ReferenceCovariance(n_models).update(views)
    tensors = list(stats._means) + list(stats._moments.values())
    assert all(t.dtype == torch.float64 for t in tensors)
    used = sum(t.numel() * t.element_size() for t in tensors)
    assert used == reference_covariance_bytes(n_models, d)  # 31 * 512^2 * 8 B = 65 MB
    # Never the joint (n_models * d)^2 matrix: that would be 16x larger.
    assert used < 8 * (n_models * d) ** 2 / 8
    # The documented wide case: d = 4096, 16 models -> 4.16 GB (3.88 GiB) per space.
    assert reference_covariance_bytes(16, 4096) == 4_161_273_856


if __name__ == "__main__":  # one rank: python test_distributed.py RANK PORT OUT_DIR [DEVICE]
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), *sys.argv[4:5])
