"""Every kernel variant the CUDA launchers can choose compiles for sm_90 and sm_80, on CPU, with no GPU or driver.

Runs ``python -m kernels.aot`` in a subprocess with ``TRITON_INTERPRET=0`` (this process interprets the kernels,
and an interpreted function cannot be compiled; a subprocess also contains a native crash) and a throwaway Triton
cache. Fails on any compile error, register spill (``ptxas -v``), shared memory over the target's limit, or an
sm_90 bf16/fp16/TF32 conv kernel without ``wgmma`` (sm_80: ``mma.sync``). Prints the table and writes it to
bench/results/aot-compile.md. Takes 6-13 minutes on 2 cores. The other tests here take seconds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "aot-compile.md"

triton = pytest.importorskip("triton")


def _version():
    import re

    return tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2])


def test_every_variant_compiles_for_sm90_and_sm80(tmp_path):
    if _version() < (3, 3):
        pytest.skip(
            f"kernels.aot needs Triton >= 3.3 (ASTSource with name-keyed constexprs); this is {triton.__version__}"
        )
    out_json = tmp_path / "aot.json"
    env = {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "TRITON_CACHE_DIR": str(tmp_path / "cache"),
        "TRITON_DUMP_PTXAS_LOG": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    jobs = max(1, min(2, os.cpu_count() or 1))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kernels.aot",
            "--arch",
            "90,80",
            "--jobs",
            str(jobs),
            "--json",
            str(out_json),
            "--md",
            str(RESULT),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    print(proc.stdout)
    assert out_json.exists(), f"kernels.aot crashed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    rows = json.loads(out_json.read_text())
    kernels_seen = {r["kernel"] for r in rows}
    assert {"conv_fprop", "conv_dgrad", "conv_wgrad"} <= kernels_seen
    assert {r["arch"] for r in rows} == {90, 80}
    failed = [
        f"sm_{r['arch']} {r['kernel']} {r['dtypes']} {r['config']}: {'; '.join(r['problems'])}"
        for r in rows
        if r["problems"]
    ]
    assert not failed, f"{len(failed)} of {len(rows)} variants failed:\n" + "\n".join(failed)
    for r in rows:  # the checks the table reports were really made
        assert r["regs"] is not None and r["spills"] == 0 and r["shared"] is not None
    sm90_16 = [r for r in rows if r["arch"] == 90 and r["kernel"].startswith("conv_") and "op=fp32" not in r["dtypes"]]
    assert sm90_16 and all("wgmma" in r["mma"] for r in sm90_16)
    # one software-pipelined K loop per conv (kernels.aot.mma_loops): one loop holds the MMAs, one cp.async wait in it
    for r in sm90_16:
        assert r["loops"].count("mma,") == 1, r
        if " 1x1 " not in r["config"]:  # (both operands by TMA: at most the BN vectors' cp.async wait)
            assert r["loops"].split("mma, ")[1].startswith("1 cp.async.wait"), r
    assert any("(sm_90)" in r["config"] for r in sm90_16), "the Hopper tiles were not compiled"
    tma = [r for r in sm90_16 if " tma" in r["config"]]  # the weight through a TMA descriptor: one mbarrier wait
    assert tma and all("1 cp.async.wait, 1 mbarrier.wait" in r["loops"] for r in tma if " 1x1 " not in r["config"])
    assert all(
        ("2 mbarrier.wait" if r["config"].startswith("bn") else "4 mma, 1 mbarrier.wait") in r["loops"]
        for r in tma
        if " 1x1 " in r["config"]
    )  # x by TMA too (plain: both copies on one barrier)
    assert proc.returncode == 0, proc.stderr[-4000:]


_NESTED = """
$L__BB0_1:
	cp.async.wait_group 1;
$L__BB0_2:
	cp.async.wait_group 1;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1}, %rd1, %rd2, 1, 1, 1, 1, 1;
	wgmma.wait_group.sync.aligned 1;
	@%p1 bra 	$L__BB0_2;
	bar.sync 0;
	@%p2 bra 	$L__BB0_1;
"""


def test_mma_loop_count_tells_nested_from_flat():
    """The PTX loop analysis behind the single-K-loop check: a tap loop around a channel loop is 2 loops holding
    the MMA, the flat loop 1; waits are counted per loop body."""
    from kernels.aot import mma_loops

    nested = mma_loops(_NESTED)
    assert len(nested) == 2 and sorted(lp["cp.async.wait"] for lp in nested) == [1, 2]
    flat = mma_loops(_NESTED.replace("\t@%p2 bra \t$L__BB0_1;\n", ""))
    assert len(flat) == 1 and flat[0]["cp.async.wait"] == 1 and flat[0]["wgmma.wait"] == 1 and flat[0]["mma"] == 1
    assert mma_loops("$L__BB0_1:\n\tcp.async.wait_group 0;\n\t@%p1 bra \t$L__BB0_1;\n") == []  # no MMA: no K loop


def test_only_filter_compiles_a_subset(tmp_path):
    """``--only 'conv_dgrad x=bf16 op=bf16 bn 64x64x32' --limit 1``: one conv variant, sm_90, with its loop report
    (seconds, not the full check)."""
    if _version() < (3, 3):
        pytest.skip("kernels.aot needs Triton >= 3.3")
    out_json = tmp_path / "aot.json"
    env = {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "TRITON_CACHE_DIR": str(tmp_path / "cache"),
        "TRITON_DUMP_PTXAS_LOG": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kernels.aot",
            "--arch",
            "90",
            "--jobs",
            "1",
            "--only",
            "conv_dgrad x=bf16 op=bf16 bn 64x64x32",
            "--limit",
            "1",
            "--json",
            str(out_json),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out_json.read_text())
    assert [r["kernel"] for r in rows] == ["conv_dgrad"] and rows[0]["arch"] == 90
    assert rows[0]["loops"].startswith("2 mma, 1 cp.async.wait") and not rows[0]["problems"]
    bad = subprocess.run(
        [sys.executable, "-m", "kernels.aot", "--only", "no_such_kernel"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2 and "no variant matches --only" in bad.stderr


_TMA_PROBE = """
import dataclasses, json
from kernels import conv
from kernels.aot import compile_variant
tma = [v for v in conv.aot_variants() if v.tma and v.dtypes == "x=bf16 op=bf16"]
v = [v for v in tma if v.config.startswith("bn 128x128x64")][0]
d = [v for v in tma if v.config.startswith("bn 1x1 128x128x64")][0]
ok, dense = compile_variant(v, 90), compile_variant(d, 90)
fake = compile_variant(dataclasses.replace(v, constexprs={**v.constexprs, "W_DESC": False}), 90)  # claims TMA, has none
print(json.dumps([ok, dense, fake]))
"""


def test_tma_variant_uses_bulk_tensor_copies(tmp_path):
    """The sm_90 fprop variant with the weight through a tensor descriptor compiles with TMA copies (the check
    finds ``cp.async.bulk.tensor`` and one mbarrier wait in the K loop, no spill), the 1x1 one with two (x by TMA
    too); the weight variant compiled
    without the descriptor while still marked ``tma`` fails the check (seconds: two compiles)."""
    if _version() < (3, 3):
        pytest.skip("kernels.aot needs Triton >= 3.3")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "TRITON_CACHE_DIR": str(tmp_path / "cache"),
        "TRITON_DUMP_PTXAS_LOG": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _TMA_PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ok, dense, fake = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not ok["problems"] and ok["spills"] == 0 and "wgmma" in ok["mma"], ok
    assert ok["loops"].startswith("4 mma, 1 cp.async.wait, 1 mbarrier.wait"), ok
    # 1x1 stride 1: the activation by TMA too (two mbarrier waits; the cp.async left is the BN vectors')
    assert not dense["problems"] and dense["spills"] == 0 and "2 mbarrier.wait" in dense["loops"], dense
    assert any("cp.async.bulk.tensor" in p for p in fake["problems"]), fake
    assert any("mbarrier waits per iteration" in p for p in fake["problems"]), fake
