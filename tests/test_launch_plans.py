"""Launch plans (:mod:`kernels.launch`) launch exactly what Triton's own path would, through Triton's real launch
path on a stand-in sm_90 driver (:mod:`bench.stub_driver`: compiles for real, no GPU, the C launch checked against
the argument layout of the installed Triton version).

Alternating shapes, dtypes, layouts, alignment and BN modes, the BN-activation step must launch the same compiled
kernels (the loaded function handle: one per specialisation) with the same grids whether the launches take the
direct path (plans) or ``kernel[grid](...)`` every time; and a direct launch must really be taken (not silently
falling back). Runs in a child process: the stand-in driver must be installed before ``kernels`` is imported
with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys
from bench import stub_driver, host
counter = stub_driver.LaunchCounter()
stub_driver.CHECK_LAYOUT = True  # every C launch checked against the installed Triton's argument layout
stub_driver.install(counter)
import torch
import kernels
from kernels import launch

def x_of(shape, dtype, channels_last, misaligned):
    n = 1
    for s in shape:
        n *= s
    base = torch.randn(n + 1, dtype=torch.float32).to(dtype)
    t = (base[1:] if misaligned else base[:n]).view(shape)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)  # fresh: aligned
    return t.requires_grad_(True)

CASES = [  # (shape, dtype, channels_last, misaligned, frozen)
    ((2, 64, 4, 4), torch.float32, True, False, False),
    ((2, 24, 5, 3), torch.bfloat16, False, False, False),
    ((2, 64, 4, 4), torch.float32, True, False, True),
    ((2, 24, 5, 3), torch.float32, False, False, False),
    ((2, 24, 5, 3), torch.float32, False, True, False),
    ((2, 64, 4, 4), torch.bfloat16, True, False, False),
    ((2, 24, 5, 3), torch.bfloat16, False, False, True),
    ((2, 64, 4, 4), torch.float32, True, False, False),
    ((2, 24, 5, 3), torch.float32, False, True, False),
    ((1, 17, 2, 2), torch.float16, False, False, False),
]

def step(case):
    shape, dtype, cl, mis, frozen = case
    x = x_of(shape, dtype, cl, mis)
    assert (x.data_ptr() % 16 != 0) == mis, case
    bn = torch.nn.BatchNorm2d(shape[1])
    bn.train(not frozen)
    y = kernels.bn_relu(x, bn)
    y.backward(torch.ones_like(y))

out = {}
with host.cuda_lookalike():
    for mode in ("ordinary", "direct", "direct"):
        launch.DIRECT = mode == "direct"
        counter.trace = []
        for case in CASES:
            step(case)
        out.setdefault(mode, []).append([[counter.names[f], f, list(g)] for f, g in counter.trace])
    # how often the direct entry was really used: count launches that bypass JITFunction.run
    from triton.runtime.jit import JITFunction
    runs = [0]
    orig = JITFunction.run
    def run(self, *a, **k):
        runs[0] += 1
        return orig(self, *a, **k)
    JITFunction.run = run
    counter.trace = []
    for case in CASES:
        step(case)
    JITFunction.run = orig
    out["jit_runs_after_warmup"] = runs[0]
    out["launches_after_warmup"] = len(counter.trace)
import triton
out["triton"] = triton.__version__
print("RESULT " + json.dumps(out))
"""


def test_plans_launch_what_triton_would():
    from bench.stub_driver import unsupported

    why = unsupported()
    if why:
        pytest.skip(why)
    env = dict(
        os.environ,
        TRITON_INTERPRET="0",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    )
    p = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    res = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    ordinary, direct = res["ordinary"][0], res["direct"]
    assert ordinary, "no launch recorded"
    # the same kernels (function handles: one per compiled specialisation) and grids, in the same order
    assert direct[0] == ordinary and direct[1] == ordinary
    handles = {f for _, f, _ in ordinary}
    assert len(handles) >= 8, handles  # the cases really select different specialisations
    # after warm-up every launch is direct: no JITFunction.run at all
    assert res["launches_after_warmup"] == len(ordinary)
    assert res["jit_runs_after_warmup"] == 0
    print(f"triton {res['triton']}: {len(ordinary)} launches, {len(handles)} specialisations")
