"""bench.host (issue 20, item 1): host cost through Triton's real launch path on a stand-in sm_90 driver.

One smoke run in a subprocess (A1-s8 at width 1/64, 3 steps per mode: ~12 s with a warm Triton cache, ~20 s cold
on 2 cores)
shared by the checks below, plus in-process checks of the counters and the version gate.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("host") / "host.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(
        [sys.executable, "-m", "bench.host", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    if res.get("skipped"):
        pytest.skip(res["skipped"])
    return res, p.stdout


def test_smoke_counts_launches_and_ops(smoke):
    res, stdout = smoke
    rows = {(r["mode"], r["impl"]): r for r in res["models"]}
    modes = ("batch", "frozen", "sync") if ("sync", "fused") in rows else ("batch", "frozen")  # sync: needs gloo
    assert set(rows) == {(m, i) for m in modes for i in ("eager", "fused")}
    for (mode, impl), r in rows.items():
        assert r["model"] == "A1-s8" and r["bn_count"] == 37
        assert r["host_ms"] > 0 and r["aten_kernels"] > 0
        assert r["triton_launches"] == sum(r["launches_by_kernel"].values())
        if impl == "eager":
            assert r["triton_launches"] == 0  # eager never reaches Triton
        else:
            # every BN-ReLU reaches the stand-in driver at least once forward and once backward (a launcher that
            # stopped taking the patched tensors for CUDA ones would make none: bench.host raises then)
            assert r["triton_launches"] >= 2 * r["bn_count"], r["launches_by_kernel"]
            assert r["host_syncs"] == 0, r["syncs_by_op"]  # the fused step is sync-free (capture-safe)
            assert r["launches_per_bn"] == pytest.approx(r["triton_launches"] / r["bn_count"], abs=0.01)
        # sync BN gathers the statistics forward and reduces the gradient sums backward: a collective each per BN
        assert r["collectives"] == (2 * r["bn_count"] if (mode, impl) == ("sync", "fused") else 0), r[
            "collectives_by_op"
        ]
    # frozen BN skips the statistics pass: never more launches than with batch statistics
    assert rows["frozen", "fused"]["triton_launches"] < rows["batch", "fused"]["triton_launches"]
    for r in res["bn_relu"]:
        assert r["eager_us"] > 0 and r["fused_us"] > 0 and r["triton_launches"] >= 2
    tl = res["triton_launch"]
    assert 0 < tl["compiled_run_us"] < tl["jit_run_us"]  # the binder/specialisation costs something
    assert "Triton launches" in stdout and "targets:" in stdout


def test_smoke_floor_probe_makes_the_fused_launches(smoke):
    """The floor probe (a hand-written Function: the fused BN-ReLU-conv's allocations, launches and convolutions
    only) makes exactly the fused call's Triton launches, so its time is a fair floor for the fused path."""
    res, stdout = smoke
    f = res.get("floor")
    if f is None:
        pytest.skip(next((n for n in res["notes"] if n.startswith("floor probe")), "no floor probe"))
    assert sum(f["launches_fused"].values()) == 5
    assert f["launches_floor"] == f["launches_fused"]
    assert f["eager_us"] > 0 and f["fused_us"] > 0 and f["floor_us"] > 0
    assert f["floor_ratio"] == pytest.approx(f["floor_us"] / f["eager_us"], abs=2e-3)
    assert "floor probe (BN-ReLU-conv)" in stdout


def test_smoke_checks_agree_with_values(smoke):
    res, _ = smoke
    t = res["targets"]
    # per fused row: host (not for sync), launches, sync-free; per BN-ReLU mode: the ratio
    n_sync = sum(r["mode"] == "sync" and r["impl"] == "fused" for r in res["models"])
    assert len(res["checks"]) == 3 * 2 + 2 * n_sync + 2
    for r in res["models"]:
        if r["impl"] != "fused":
            continue
        eager = next(e for e in res["models"] if e["impl"] == "eager" and e["mode"] == r["mode"])
        assert r["host_ratio"] == pytest.approx(r["host_ms"] / eager["host_ms"], rel=1e-2)
        if r["mode"] == "sync":
            assert r["check_host"] == "-"  # gloo's CPU collectives: no host-time target
        else:
            assert (r["check_host"] == "PASS") == (r["host_ms"] / eager["host_ms"] <= t["step_ratio"])
        limit = t["launches_per_bn"][r["mode"]] * r["bn_count"]
        assert r["launch_target"] == limit
        assert (r["check_launches"] == "PASS") == (r["triton_launches"] <= limit)
    for r in res["bn_relu"]:
        assert (r["check"] == "PASS") == (r["fused_us"] / r["eager_us"] <= t["bn_ratio"])
    env = res["environment"]
    assert env["triton"].rsplit(".", 1)[0] in res["supported_triton"]


def test_aten_counter_skips_views_and_counts_syncs():
    from bench.host import AtenCounter

    x = torch.randn(4, 4)
    ac = AtenCounter()
    with ac.active():
        y = x.view(16)
        z = (y + 1).relu()
        z.unsqueeze(0).expand(2, 16)
        s = z.sum()
        s.item()
        bool(s > 0)
        z.tolist()
        torch.empty(3)
    assert dict(ac.kernels) == {"add": 1, "relu": 1, "sum": 1, "gt": 1}, ac.kernels
    assert ac.allocs == 1 and not ac.collectives
    assert ac.syncs["_local_scalar_dense"] == 2 and ac.syncs["Tensor.tolist"] == 1, ac.syncs
    assert torch.Tensor.tolist.__name__ == "tolist"  # the Python-level patches are undone


def test_cuda_lookalike_is_undone():
    from bench.host import cuda_lookalike

    x = torch.zeros(2)
    had_raw = hasattr(torch._C, "_cuda_getCurrentRawStream")
    props = torch.cuda.get_device_properties
    with cuda_lookalike():
        assert x.is_cuda and x.device.type == "cpu"  # launchers see CUDA; the data stays on the CPU
        assert torch.cuda.get_device_properties(x.device).multi_processor_count == 132
        assert torch.cuda.current_stream().cuda_stream == 0 and torch._C._cuda_getCurrentRawStream(0) == 0
    assert not x.is_cuda and "is_cuda" not in torch.Tensor.__dict__
    assert torch.cuda.get_device_properties is props
    assert hasattr(torch._C, "_cuda_getCurrentRawStream") == had_raw


def test_unsupported_triton_version_skips(monkeypatch):
    triton = pytest.importorskip("triton")
    from bench import stub_driver

    monkeypatch.setattr(triton, "__version__", "3.4.0")
    why = stub_driver.unsupported()
    assert why and "3.4.0" in why and "3.6" in why and "3.9" in why
    with pytest.raises(RuntimeError, match="not supported"):
        stub_driver.install()
    monkeypatch.setattr(triton, "__version__", "3.9.1")
    assert stub_driver.unsupported() is None


def test_bad_flag_is_one_line_error():
    p = subprocess.run(
        [sys.executable, "-m", "bench.host", "--models", "A2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert p.returncode == 2 and "--models: unknown A2" in p.stderr and "Traceback" not in p.stderr
