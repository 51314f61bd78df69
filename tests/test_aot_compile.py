"""Every kernel variant the CUDA launchers can choose compiles for sm_90 and sm_80, on CPU, with no GPU or driver.

Runs ``python -m kernels.aot`` in a subprocess with ``TRITON_INTERPRET=0`` (this process interprets the kernels,
and an interpreted function cannot be compiled; a subprocess also contains a native crash) and a throwaway Triton
cache. Fails on any compile error, register spill (``ptxas -v``), shared memory over the target's limit, or an
sm_90 bf16/fp16/TF32 conv kernel without ``wgmma`` (sm_80: ``mma.sync``). Prints the table and writes it to
bench/results/aot-compile.md. Takes about 3-4 minutes on 2 cores.
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
        pytest.skip(f"kernels.aot needs Triton >= 3.3 (ASTSource with name-keyed constexprs); this is {triton.__version__}")
    out_json = tmp_path / "aot.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache"),
           "TRITON_DUMP_PTXAS_LOG": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    jobs = max(1, min(2, os.cpu_count() or 1))
    proc = subprocess.run([sys.executable, "-m", "kernels.aot", "--arch", "90,80", "--jobs", str(jobs),
                           "--json", str(out_json), "--md", str(RESULT)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    print(proc.stdout)
    assert out_json.exists(), f"kernels.aot crashed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    rows = json.loads(out_json.read_text())
    kernels_seen = {r["kernel"] for r in rows}
    assert {"conv_fprop", "conv_dgrad", "conv_wgrad"} <= kernels_seen
    assert {r["arch"] for r in rows} == {90, 80}
    failed = [f"sm_{r['arch']} {r['kernel']} {r['dtypes']} {r['config']}: {'; '.join(r['problems'])}"
              for r in rows if r["problems"]]
    assert not failed, f"{len(failed)} of {len(rows)} variants failed:\n" + "\n".join(failed)
    for r in rows:  # the checks the table reports were really made
        assert r["regs"] is not None and r["spills"] == 0 and r["shared"] is not None
    sm90_16 = [r for r in rows if r["arch"] == 90 and r["kernel"].startswith("conv_") and "op=fp32" not in r["dtypes"]]
    assert sm90_16 and all("wgmma" in r["mma"] for r in sm90_16)
    assert proc.returncode == 0, proc.stderr[-4000:]
