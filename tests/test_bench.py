"""The bench runner cannot rot: its GPU campaign shrunk to a CPU smoke run, end to end, in a subprocess.

One run (~1.5-2 min on 2 cores) shared by the tests below; the quick mode writes the same structure (same
runner, bigger configs), and its committed results file is checked for that structure too.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "mode", "config", "model", "kernels", "data", "summary", "goals", "sections", "results")


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    out = tmp_path_factory.mktemp("campaign") / "tmp"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(
        [sys.executable, "-m", "bench", "--gpu-campaign", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p.stdout


def _check_structure(res: dict, cpu: bool) -> None:
    for key in SECTIONS:
        assert key in res, key
    env = res["environment"]
    for key in ("device", "cpu_model", "torch", "triton", "commit", "python"):
        assert key in env, key
    fixed = res["model"]["fixed"]
    assert {"A1", "A1-s8"} <= {r["model"] for r in fixed}
    impls = {r["impl"] for r in fixed}
    assert {"eager", "fused", "checkpoint", "compile", "fused_compile", "fused_igemm"} <= impls
    for r in fixed:  # every row is a measurement or says why it is not
        assert r.get("timed") is not None or "error" in r or "skipped" in r, r
    assert "note" in res["model"] and ("peak" in res["model"]["note"])
    assert {"bn_relu", "conv"} <= set(res["kernels"])
    assert {"copy", "matmul_bf16"} <= set(res["ceilings"])
    assert isinstance(res["goals"], list) and res["goals"]
    if cpu:
        assert all(not r.get("timed") for r in res["kernels"]["conv"]["rows"])  # interpreter runs are never timed
        assert all(r.get("skipped") for r in fixed if r["impl"] == "fused_igemm")


def test_campaign_smoke_files(campaign):
    out, stdout = campaign
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8 and all(len(f.parts) <= 2 for f in files), files
    assert (out / "results.json").is_file() and (out / "campaign.log").is_file()
    assert any(f.suffix == ".png" for f in files), files
    assert "MODEL LEVEL" in stdout and "GOALS" in stdout


def test_campaign_smoke_json(campaign):
    out, _ = campaign
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "smoke"
    _check_structure(res, cpu=res["environment"]["device"] == "cpu")
    tests = res["tests"]
    if res["environment"]["device"] == "cpu":  # the gate says so explicitly; it is not a pass
        assert tests["passed"] is None and tests["no_gpu"] is True and "no GPU" in tests["summary"], tests
    else:  # on CUDA the gate must have run tests, and they passed
        assert tests["passed"] is True and tests["counts"]["passed"] > 0 and tests["ran"] > 0, tests
    # the smoke's correctness flags: every kernel row checked, every check true
    flags = [
        (k, v)
        for row in res["kernels"]["bn_relu"] + res["kernels"]["conv"]["rows"]
        for k, v in row.items()
        if k.endswith("_ok")
    ]
    assert {k for k, _ in flags} >= {"ours_ok", "eager_ok", "ours_fprop_ok", "ours_dgrad_ok", "ours_wgrad_ok"}, flags
    assert all(v is True for _, v in flags), [k for k, v in flags if v is not True]
    assert not [
        k for row in res["kernels"]["bn_relu"] + res["kernels"]["conv"]["rows"] for k in row if k.endswith("error")
    ]
    eager = [r for r in res["model"]["fixed"] if r["impl"] == "eager" and r["model"] == "A1"][0]
    assert eager.get("timed") and eager["saved_bytes"] > 0 and eager["peak_method"]
    fused = [r for r in res["model"]["fixed"] if r["impl"] == "fused" and r["model"] == "A1"][0]
    assert fused["saved_bytes"] < eager["saved_bytes"]
    assert res["summary"]["A1"]["fused/eager"]["saved_bytes"] < 1
    host = res["host"]  # bench.host in its own process: rows, or why not (an unsupported Triton: skipped)
    assert "error" not in host, host
    assert host.get("skipped") or any(r["impl"] == "fused" and r["triton_launches"] > 0 for r in host["models"])
    inference = res["inference"]  # bench.inference rows: measured, or saying why not
    assert inference and all("img_per_s" in r or "error" in r or "skipped" in r for r in inference), inference
    assert any(r.get("img_per_s", 0) > 0 and r["case"] == "A1" and r["impl"] == "eager" for r in inference)


@pytest.mark.parametrize(
    "rc, stdout, passed, why",
    [
        (0, "....\n4 passed, 2 skipped in 3.1s", True, None),
        (0, "sss\n3 skipped, 120 deselected in 2.0s", False, "skipped"),  # a CUDA machine where every gpu test skipped
        (5, "\n120 deselected in 1.9s", False, "exit 5"),  # nothing selected
        (1, "F.\n1 failed, 1 passed in 2.2s", False, "exit 1"),
        (1, "E\n1 error in 0.5s", False, "exit 1"),
    ],
)
def test_gpu_gate_needs_tests_that_ran_and_passed(rc, stdout, passed, why):
    from bench.runner import gate_result

    g = gate_result(rc, stdout)
    assert g["passed"] is passed, g
    assert (why is None and "why" not in g) or why in g["why"], g
    if passed:
        assert g["counts"] == {"passed": 4, "skipped": 2} and g["ran"] == 4


def test_gpu_gate_without_cuda_says_no_gpu():
    from bench.runner import run_tests

    res = run_tests(None, None, print, cuda=False)  # nothing runs: no section budget needed
    assert res["passed"] is None and res["no_gpu"] is True and res["summary"].startswith("no GPU"), res


def test_committed_quick_results_structure():
    files = sorted((ROOT / "bench" / "results").glob("cpu-*-quick.json"))
    if not files:
        pytest.skip("no committed quick-mode results yet")
    res = json.loads(files[-1].read_text())
    assert res["mode"] == "quick" and res["environment"]["device"] == "cpu"
    _check_structure(res, cpu=True)


def test_campaign_smoke_issue20_rows(campaign):
    """Every row issue 20 adds is in the smoke: model rows for the seven implementations at A1, A1-s8 with batch
    statistics and frozen BN, and A1-s8/16 (CUDA-only ones skipped with the reason), the BN passes apart checked
    against torch, the full-resolution largest batch (CUDA only: skipped with the reason) and the host section."""
    out, stdout = campaign
    res = json.loads((out / "results.json").read_text())
    cpu = res["environment"]["device"] == "cpu"
    fixed = res["model"]["fixed"]
    want = ("eager", "eager_graphed", "compile", "fused", "fused_graphed", "fused_compile", "fused_cudagraphs")
    for model in ("A1", "A1-s8", "A1-s8-frozen", "A1-s8-b16"):
        for impl in want:
            rows = [r for r in fixed if r["model"] == model and r["impl"] == impl]
            assert len(rows) == 1, (model, impl, rows)
            r = rows[0]
            assert r.get("timed") is not None or "error" in r or "skipped" in r, r
            if cpu and impl in ("eager_graphed", "fused_graphed", "fused_cudagraphs"):
                assert "needs CUDA" in r["skipped"], r
    frozen = {r["impl"]: r for r in fixed if r["model"] == "A1-s8-frozen" and r.get("timed") is not None}
    for r in frozen.values():
        assert r["bn"] == "frozen"
    if {"eager", "fused"} <= set(frozen):  # measured (a loaded machine may time the process out: then an error row)
        assert frozen["fused"]["saved_bytes"] < frozen["eager"]["saved_bytes"]
    parts = res["kernels"]["bn_parts"]
    assert parts and all(r.get("stats_ok") and r.get("apply_ok") and r.get("backward_ok") for r in parts if cpu), parts
    full = res["model"]["fullres"]
    assert {r["impl"] for r in full} == {"eager", "fused", "unit"}
    if cpu:
        assert all("needs CUDA" in r["skipped"] for r in full)
    assert "host" in res["sections"] and "host" in res
    assert any(g["goal"].startswith("#20 ") for g in res["goals"])
    assert "LARGEST BATCH AT FULL RESOLUTION" in stdout


def test_campaign_budget_fits_nine_minutes():
    """The GPU campaign's section budgets and total stay under the 9-minute window (with its start-up margin)."""
    from bench.runner import CONFIGS

    c = CONFIGS["campaign"]
    assert c["total_s"] <= 525 and sum(c["budgets"].values()) <= c["total_s"]
    assert set(c["order"]) <= set(c["budgets"]) and c["order"][-1] == "host"
    assert set(c["impls"]) == {
        "eager",
        "eager_graphed",
        "compile",
        "fused",
        "fused_graphed",
        "fused_compile",
        "fused_cudagraphs",
    }
    assert {("A1", 64, "batch"), ("A1-s8", 4, "batch"), ("A1-s8", 4, "frozen"), ("A1-s8", 16, "batch")} == {
        ("A1" if m["label"].startswith("ilsvrc") else "A1-s8", m["batch"], m["bn"]) for m in c["models"].values()
    }
    assert c["fullres"]["size"] == [1024, 2048] and set(c["fullres"]["impls"]) == {"eager", "fused", "unit"}
    compiled = {(i, n) for i, n in c["compile_order"]}
    assert compiled == {(i, n) for i in ("compile", "fused_compile", "fused_cudagraphs") for n in c["models"]}
