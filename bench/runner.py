"""``python -m bench``: one runner for the speed and memory comparison of issue 12.

    python -m bench --quick                    # CPU, narrow models, < 5 min on 2 cores
    python -m bench                            # full mode: published widths, A1 at 224, A1-s8 at 504
    PYTHONPATH=. python -m bench --gpu-campaign --out DIR     # GPU window: tests, then everything, < 9 min
    python -m bench --gpu-campaign --smoke --out DIR          # the campaign shrunk to a CPU smoke (CI)

Sections (each with a time budget in quick/campaign mode; what does not fit is skipped and recorded):
  tests     (campaign) ``python -m pytest -q -m gpu tests/`` in a subprocess; failures, a run where nothing passed
            (exit 5, all skipped) and a timeout are flagged (notes, exit 1), not fatal; without CUDA: "no GPU"
  ceilings  measured copy bandwidth and matmul peak of the device
  model     per implementation and model, one fresh process each: training-step time (median after warm-up,
            synchronised), images/s, peak memory, saved-for-backward activation bytes
  sweep     (CPU) the same at more batch sizes, for the plots
  largest   (CUDA) largest batch that fits: doubling then bisection, one process per implementation
  fullres   (campaign, CUDA) the largest A1-s8 batch at full Cityscapes resolution (1024x2048, no crops) for
            eager, fused and recompute="unit"
  bn_relu   BN-ReLU forward/backward achieved bandwidth vs the copy bandwidth
  bn_parts  (campaign) the statistics pass, the apply pass and the backward of the fused BN-ReLU timed apart
  conv      each distinct conv shape of A1 / A1-s8, fprop / dgrad / wgrad, ours vs cuDNN vs torch.compile
  data      data pipelines' images/s per backend (bench.data_throughput)
  host      host cost of a fused vs eager training step through Triton's real launch path on a stand-in sm_90
            driver (bench.host, in a subprocess): Triton launches, aten ops, host syncs, host time per step and per BN
  inference eval images/s of eager, fused and torch.compile: A1 224 batch 64, Cityscapes 1024x2048 batch 1
            (bench.inference; CPU modes: width 1/16 at small sizes, a smoke)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

A1, S8 = "ilsvrc-cls_rna-a1_cls1000", "voc_rna-a1_cls21_s8"

# Section budgets in seconds (None: unlimited). Quick: < 5 min on 2 shared CPU cores. Campaign: < 9 min on an H100
# including interpreter start-up and the kernel tests; the sum stays under TOTAL with a margin.
CONFIGS = {
    "quick": dict(
        total_s=285,
        threads=2,
        models={
            "A1": dict(label=A1, width=0.0625, size=224, batch=2, sweep=[1, 4]),
            "A1-s8": dict(label=S8, width=0.0625, size=168, batch=1, sweep=[]),
        },
        impls=["eager", "fused", "fused_igemm", "checkpoint", "compile", "fused_compile"],
        compile_models=["A1"],
        warmup=2,
        iters=5,
        compile_last=True,
        host_iters=21,
        budgets=dict(ceilings=8, bn_relu=5, conv=12, model=75, sweep=60, compile=None, data=20, host=60, inference=25),
        inference=dict(smoke=True),
        data=dict(images=32, batch=8, epochs=1, workers=[2], reps=2, cases=["cls-train"]),
    ),
    "full": dict(
        total_s=None,
        threads=None,
        models={
            "A1": dict(label=A1, width=1.0, size=224, batch=64, sweep=[16, 32, 128]),
            "A1-s8": dict(label=S8, width=1.0, size=504, batch=4, sweep=[1, 2, 8]),
        },
        impls=["eager", "fused", "fused_igemm", "checkpoint", "compile", "fused_compile", "fused_cudagraphs"],
        compile_models=["A1", "A1-s8"],
        warmup=3,
        iters=10,
        budgets={},
        inference=dict(smoke=False),
        largest_cap=4096,
        conv_a1_batch=64,
        conv_s8_batch=4,
        # the published CPU numbers: 5 interleaved repetitions, 1 -> 2 workers, per-image CPU profile
        data=dict(
            images=256,
            batch=16,
            epochs=2,
            workers=[1, 2],
            reps=5,
            cases=["cls-train", "seg-train"],
            profile=True,
            alignment=True,
        ),
    ),
    "campaign": dict(
        total_s=525,
        threads=None,
        # issue 20: A1/64, A1-s8/4 with batch statistics and frozen BN (the seed's segmentation setting), A1-s8/16
        models={
            "A1": dict(label=A1, width=1.0, size=224, batch=64, bn="batch", sweep=[]),
            "A1-s8": dict(label=S8, width=1.0, size=504, batch=4, bn="batch", sweep=[]),
            "A1-s8-frozen": dict(label=S8, width=1.0, size=504, batch=4, bn="frozen", sweep=[]),
            "A1-s8-b16": dict(label=S8, width=1.0, size=504, batch=16, bn="batch", sweep=[]),
        },
        impls=["eager", "fused", "fused_graphed", "eager_graphed", "compile", "fused_compile", "fused_cudagraphs"],
        # the order the goals need them (a budget cut drops the tail): A1-s8/4 both BN modes, A1/64, then A1-s8/16
        model_order=["A1-s8-frozen", "A1-s8", "A1", "A1-s8-b16"],
        compile_models=["A1", "A1-s8-frozen", "A1-s8", "A1-s8-b16"],
        # one process per compiled row (a cold torch.compile of A1 took 30-100 s on the H100 2026-11-25)
        compile_order=[
            ("compile", "A1"),
            ("fused_cudagraphs", "A1-s8-frozen"),
            ("fused_compile", "A1"),
            ("compile", "A1-s8-frozen"),
            ("fused_cudagraphs", "A1"),
            ("fused_compile", "A1-s8-frozen"),
            ("compile", "A1-s8"),
            ("fused_cudagraphs", "A1-s8"),
            ("fused_compile", "A1-s8"),
            ("compile", "A1-s8-b16"),
            ("fused_cudagraphs", "A1-s8-b16"),
            ("fused_compile", "A1-s8-b16"),
        ],
        compile_row_s=110,
        warmup=3,
        iters=8,
        largest=False,
        # 2026-11-25 on an H100: the tests took 28-38 s (+ interpreter start); one model process ~13 s for one
        # configuration (start-up ~5 s); 525 s in all, under the 9-minute window with the runner's own start-up
        # tests: ~30 s for the kernel tests on 2026-11-25 plus ~25 s for the CUDA-graph tests (6 capture checks and
        # one --cuda-graphs trainer run)
        budgets=dict(
            tests=70,
            model=130,
            compile=100,
            fullres=70,
            ceilings=8,
            bn_relu=12,
            bn_parts=20,
            conv=30,
            data=10,
            host=30,
            inference=35,
        ),
        inference=dict(smoke=False, iters=10),
        host_iters=21,
        order=[
            "tests",
            "model",
            "inference",
            "compile",
            "fullres",
            "ceilings",
            "bn_relu",
            "bn_parts",
            "conv",
            "data",
            "host",
        ],
        fullres=dict(
            model="A1-s8-fullres",
            label=S8,
            width=1.0,
            size=[1024, 2048],
            bn="frozen",
            # starts from the 2026-11-25 H100 peaks at 504 px (eager ~0.7 GB per image, fused ~half)
            impls=["eager", "fused", "unit"],
            start={"eager": 8, "fused": 16, "unit": 16},
            cap=64,
        ),
        largest_cap=4096,
        conv_a1_batch=64,
        conv_s8_batch=4,
        # mixed decode measured and its labels checked against the pixels (alignment first: it is the must-have)
        data=dict(images=96, batch=16, epochs=1, workers=[8], reps=2, cases=["cls-train", "seg-train"], alignment=True),
    ),
    "smoke": dict(
        total_s=200,
        threads=2,
        models={
            "A1": dict(label=A1, width=0.0625, size=32, batch=2, bn="batch", sweep=[]),
            "A1-s8": dict(label=S8, width=0.0625, size=48, batch=1, bn="batch", sweep=[]),
            # the new configurations without checkpoint/igemm rows (the smoke's time is the suite's)
            "A1-s8-frozen": dict(
                label=S8,
                width=0.0625,
                size=48,
                batch=1,
                bn="frozen",
                sweep=[],
                impls=["eager", "fused", "eager_graphed", "fused_graphed"],
            ),
            "A1-s8-b16": dict(
                label=S8,
                width=0.0625,
                size=48,
                batch=2,
                bn="batch",
                sweep=[],
                impls=["eager", "fused", "eager_graphed", "fused_graphed"],
            ),
        },
        impls=[
            "eager",
            "fused",
            "fused_igemm",
            "checkpoint",
            "eager_graphed",
            "fused_graphed",
            "compile",
            "fused_compile",
            "fused_cudagraphs",
        ],
        compile_models=[],
        model_order=["A1", "A1-s8", "A1-s8-frozen", "A1-s8-b16"],
        warmup=1,
        iters=1,
        largest=False,
        budgets=dict(
            tests=40, ceilings=5, model=100, bn_relu=5, bn_parts=5, conv=10, data=15, fullres=5, host=30, inference=15
        ),
        inference=dict(smoke=True, iters=1),
        order=[
            "tests",
            "model",
            "inference",
            "compile",
            "fullres",
            "ceilings",
            "bn_relu",
            "bn_parts",
            "conv",
            "data",
            "host",
        ],
        fullres=dict(
            model="A1-s8-fullres",
            label=S8,
            width=0.0625,
            size=[64, 128],
            bn="frozen",
            impls=["eager", "fused", "unit"],
            start=1,
            cap=4,
        ),
        data=dict(images=16, batch=4, epochs=1, workers=[1], reps=1, cases=["cls-train"], alignment=True),
    ),
}


class Logger:
    def __init__(self, path: Path | None = None):
        self.path = path
        self.fh = open(path, "a") if path else None

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        if self.fh:
            self.fh.write(msg + "\n")
            self.fh.flush()


def gate_result(returncode: int | None, stdout: str) -> dict:
    """The GPU-test gate's verdict from pytest's exit status and summary line: ``passed`` only when pytest exited 0
    *and* at least one test passed. Exit 5 (nothing selected) and a run whose every test skipped are failures of
    the gate (on a CUDA machine they mean the compiled kernels were never checked), not passes."""
    import re

    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else ""
    counts = {
        k.rstrip("s") if k.startswith("error") else k: int(n)
        for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", summary)
    }
    ran = sum(counts.get(k, 0) for k in ("passed", "failed", "error", "xfailed", "xpassed"))
    passed = returncode == 0 and counts.get("passed", 0) > 0
    why = None
    if returncode == 5:
        why = "pytest selected no test (exit 5)"
    elif returncode == 0 and not passed:
        why = "no test ran (every selected test skipped)"
    elif returncode not in (0, None):
        why = f"pytest exit {returncode}"
    return dict(
        returncode=returncode, passed=passed, counts=counts, ran=ran, summary=summary, **({"why": why} if why else {})
    )


def run_tests(section, out_dir: Path | None, log, cuda: bool | None = None) -> dict:
    """``python -m pytest -q -m gpu tests/`` in a subprocess; output goes to the log. Without CUDA nothing runs:
    the result says "no GPU" (``passed`` None), never a pass."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/"]
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        return dict(
            cmd=" ".join(cmd[1:]),
            returncode=None,
            passed=None,
            no_gpu=True,
            ran=0,
            seconds=0.0,
            summary="no GPU: the compiled-kernel tests (pytest -m gpu) need CUDA; not run",
        )
    log("  $ " + " ".join(cmd[1:]))
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
    )
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(5, section.timeout()), env=env)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        log(out[-3000:])
        return dict(
            cmd=" ".join(cmd[1:]),
            returncode=None,
            passed=None,
            timed_out=True,
            seconds=round(time.perf_counter() - t, 1),
            summary=f"timed out after {section.budget_s:.0f} s",
        )
    for ln in p.stdout.strip().splitlines()[-60:]:
        log("  | " + ln)
    if p.stderr.strip():
        for ln in p.stderr.strip().splitlines()[-20:]:
            log("  ! " + ln)
    res = gate_result(p.returncode, p.stdout)
    if res.get("why"):
        res["summary"] = f"{res['summary']} ({res['why']})"
    return dict(cmd=" ".join(cmd[1:]), seconds=round(time.perf_counter() - t, 1), **res)


def _spec(cfg, name, m, impl, batch, cuda, saved=True):
    return dict(
        impl=impl,
        model=name,
        label=m["label"],
        width=m["width"],
        size=m["size"],
        batch=batch,
        bn=m.get("bn", "batch"),
        warmup=cfg["warmup"],
        iters=cfg["iters"],
        saved=saved,
        threads=cfg.get("threads"),
        device="cuda" if cuda else "cpu",
        smoke=False,
    )


def _cuda_only_row(impl: str, name: str, m: dict, sec) -> dict | None:
    """A skipped row (with the reason) for an implementation that needs CUDA, on a CPU run; else None."""
    from bench.impls import CUDA_ONLY

    if impl not in CUDA_ONLY:
        return None
    sec.skip(f"{name} {impl}", f"needs CUDA: {CUDA_ONLY[impl]}")
    return dict(
        impl=impl, model=name, batch=m["batch"], bn=m.get("bn", "batch"), skipped=f"needs CUDA: {CUDA_ONLY[impl]}"
    )


def model_section(cfg, budget, res, log, cuda: bool, smoke: bool) -> None:
    from bench.model_level import _log_row, largest_batch, run_worker

    fixed, sweep, largest = res["model"]["fixed"], res["model"]["sweep"], res["model"]["largest"]

    def spec(name, m, impl, batch, saved=True):
        return _spec(cfg, name, m, impl, batch, cuda, saved)

    from bench.impls import COMPILED, CUDA_ONLY

    plain = [i for i in cfg["impls"] if i not in COMPILED]
    names = cfg.get("model_order") or list(cfg["models"])
    with budget.section("model", cfg["budgets"].get("model")) as sec:
        if cfg.get("model_order"):  # campaign: one process per implementation, its configurations in order
            from bench.model_level import run_worker_multi

            runnable = [i for i in plain if cuda or (i != "fused_igemm" and i not in CUDA_ONLY)]
            for impl in plain:
                mine = [n for n in names if impl in cfg["models"][n].get("impls", plain)]
                if not cuda and impl == "fused_igemm":
                    for name in mine:
                        why = "needs CUDA (Triton interpreter on CPU: smoke in the conv section)"
                        fixed.append(dict(impl=impl, model=name, batch=cfg["models"][name]["batch"], skipped=why))
                        sec.skip(f"{name} {impl}", why)
                    continue
                if not cuda and impl in CUDA_ONLY:
                    fixed.extend(_cuda_only_row(impl, name, cfg["models"][name], sec) for name in mine)
                    continue
                if not sec.has(8):
                    for name in mine:
                        sec.skip(f"{name} {impl}")
                        fixed.append(
                            dict(
                                impl=impl,
                                model=name,
                                batch=cfg["models"][name]["batch"],
                                skipped="section time budget spent",
                            )
                        )
                    continue
                # what is left, shared by the processes still to run
                share = sec.timeout() / (len(runnable) - runnable.index(impl))
                rows = run_worker_multi(
                    [
                        spec(
                            n,
                            cfg["models"][n],
                            impl,
                            cfg["models"][n]["batch"],
                            saved=impl not in ("eager_graphed", "fused_graphed"),
                        )
                        for n in mine
                    ],
                    share,
                    log,
                )
                for j, row in enumerate(rows):
                    if not cuda and j and "peak_bytes" in row:
                        row["note"] = (
                            "CPU peak RSS is a process high-water mark: this process measured "
                            f"{j} configuration(s) before this one"
                        )
                    fixed.append(row)
                    _log_row(row, log)
            names = []  # measured above
        for name in names:
            m = cfg["models"][name]
            for impl in plain:
                if not cuda and (row := _cuda_only_row(impl, name, m, sec)) is not None:
                    fixed.append(row)
                    continue
                if impl == "fused_igemm" and not cuda:
                    fixed.append(
                        dict(
                            impl=impl,
                            model=name,
                            batch=m["batch"],
                            skipped=(
                                "needs CUDA: in the Triton interpreter one step of a width-1/16 A1 at 32 px "
                                "takes ~150 s; "
                                "its kernels are smoke-tested in the conv section"
                            ),
                        )
                    )
                    sec.skip(f"{name} fused_igemm", "needs CUDA (Triton interpreter on CPU: smoke in the conv section)")
                    continue
                if not sec.has(5):
                    sec.skip(f"{name} {impl} b{m['batch']}")
                    fixed.append(dict(impl=impl, model=name, batch=m["batch"], skipped="section time budget spent"))
                    continue
                row = run_worker(spec(name, m, impl, m["batch"]), sec.timeout(1800), log)
                fixed.append(row)
                _log_row(row, log)
    if not cuda:
        with budget.section("sweep", cfg["budgets"].get("sweep")) as sec:
            for name, m in cfg["models"].items():
                for b in m.get("sweep", []):
                    for impl in plain:
                        if impl == "fused_igemm":
                            continue
                        if not sec.has(5):
                            sec.skip(f"{name} {impl} b{b}")
                            continue
                        row = run_worker(spec(name, m, impl, b, saved=False), sec.timeout(1800), log)
                        sweep.append(row)
                        _log_row(row, log)
        res["notes"].append(
            "largest batch: CUDA only (on CPU the limit is host RAM and swapping, not a meaningful number)"
        )
    if not cfg.get("compile_last") and not cfg.get("order"):
        compile_section(cfg, budget, res, log, cuda)
    if not cuda or not cfg.get("largest", True):
        return
    with budget.section("largest", cfg["budgets"].get("largest")) as sec:
        first = ("eager", "fused", "checkpoint")  # the goal's ratio (fused/eager) first
        order = [(n, i) for n in cfg["models"] for i in first] + [
            (n, i) for n in cfg["models"] for i in cfg["impls"] if i not in first
        ]
        order.sort(key=lambda t: (t[1] not in first, list(cfg["models"]).index(t[0])))
        for k, (name, impl) in enumerate(order):
            m = cfg["models"][name]
            if not sec.has(25):
                sec.skip(f"{name} {impl} largest batch")
                continue
            share = sec.timeout() / max(1, min(2, len(order) - k))  # the first ones get a fair share
            sub = type(sec)(budget, f"largest:{name}:{impl}", share)
            base = dict(impl=impl, model=name, label=m["label"], width=m["width"], size=m["size"], device="cuda")
            row = largest_batch(base, sub, start=max(1, m["batch"] // 2), cap=cfg.get("largest_cap", 4096), log=log)
            budget.sections.pop(f"largest:{name}:{impl}", None)
            largest.append(row)


def compile_section(cfg, budget, res, log, cuda: bool) -> None:
    """torch.compile of eager and of fused, one fresh process each (compile time is reported as first_step_s)."""
    from bench.model_level import _log_row, run_worker

    fixed = res["model"]["fixed"]
    from bench.impls import COMPILED

    compiled = [i for i in cfg["impls"] if i in COMPILED]
    order = cfg.get("compile_order") or [(impl, name) for name in cfg["models"] for impl in compiled]
    with budget.section("compile", cfg["budgets"].get("compile")) as sec:
        for impl, name in order:
            m = cfg["models"][name]
            if impl not in compiled:
                continue
            if not cuda and (row := _cuda_only_row(impl, name, m, sec)) is not None:
                fixed.append(row)
                continue
            if name not in cfg["compile_models"]:
                why = "not in this mode's compile_models (torch.compile takes minutes per model on CPU)"
                fixed.append(dict(impl=impl, model=name, batch=m["batch"], skipped=why))
                sec.skip(f"{name} {impl}", why)
                continue
            if not sec.has(10):
                sec.skip(f"{name} {impl} b{m['batch']}")
                fixed.append(dict(impl=impl, model=name, batch=m["batch"], skipped="section time budget spent"))
                continue
            row = run_worker(
                _spec(cfg, name, m, impl, m["batch"], cuda), sec.timeout(cfg.get("compile_row_s", 1800)), log
            )
            fixed.append(row)
            _log_row(row, log)


def fullres_section(cfg, budget, res, log, cuda: bool) -> None:
    """The largest A1-s8 training batch at full Cityscapes resolution (1024x2048, no crops): eager, fused and
    recompute="unit", each searched in its own process (doubling from ``start``, then bisection)."""
    from bench.model_level import largest_batch

    f = cfg["fullres"]
    rows = res["model"].setdefault("fullres", [])
    with budget.section("fullres", cfg["budgets"].get("fullres")) as sec:
        for k, impl in enumerate(f["impls"]):
            base = dict(
                impl=impl,
                model=f["model"],
                label=f["label"],
                width=f["width"],
                size=f["size"],
                bn=f["bn"],
                device="cuda",
            )
            if not cuda:
                why = "needs CUDA: the limit on a CPU is host RAM and swap, not a meaningful number"
                sec.skip(f"{f['model']} {impl} largest batch", why)
                rows.append(dict(impl=impl, model=f["model"], size=f["size"], bn=f["bn"], skipped=why))
                continue
            share = sec.timeout() / (len(f["impls"]) - k)
            sub = type(sec)(budget, f"fullres:{impl}", share)
            start = f["start"][impl] if isinstance(f["start"], dict) else f["start"]
            row = largest_batch(base, sub, start=start, cap=f["cap"], log=log, backstop=15)
            budget.sections.pop(f"fullres:{impl}", None)
            rows.append(row)


def kernel_sections(cfg, budget, res, log, cuda: bool, smoke: bool) -> None:
    from bench import kernel_level as kl

    with budget.section("ceilings", cfg["budgets"].get("ceilings")):
        res["ceilings"] = kl.ceilings(quick=not cuda or smoke)
        log("  " + json.dumps(res["ceilings"]))
    copy = res.get("ceilings", {}).get("copy", {}).get("GBps")
    with budget.section("bn_relu", cfg["budgets"].get("bn_relu")) as sec:
        res["kernels"]["bn_relu"] = kl.bn_relu_bandwidth(sec, copy, smoke or not cuda, log)
    if "bn_parts" in cfg["budgets"]:
        with budget.section("bn_parts", cfg["budgets"].get("bn_parts")) as sec:
            res["kernels"]["bn_parts"] = kl.bn_parts(sec, copy, smoke or not cuda, log)
    peak = res.get("ceilings", {}).get("matmul_bf16", {}).get("TFLOPs") if cuda else None
    with budget.section("conv", cfg["budgets"].get("conv")) as sec:
        res["kernels"]["conv"] = kl.conv_section(sec, dict(cfg, smoke=smoke), peak, log)


def data_section(cfg, budget, res, log, cuda: bool) -> None:
    """Data pipelines (bench.data_throughput): interleaved repeated runs of both backends (and DALI mixed decode on
    CUDA), DALI/torch ratios, worker scaling, optionally the per-image CPU profile and the label alignment check."""
    with budget.section("data", cfg["budgets"].get("data")) as sec:
        from bench.data_throughput import CASES, alignment, measure, profile, scaling
        from data_pipes.dali_backend import available as dali_available

        d = cfg["data"]
        dali = dali_available()
        if not dali:
            res["notes"].append("data: DALI not importable: torch/Pillow backend only (no DALI cpu/mixed rows)")
        with tempfile.TemporaryDirectory() as tmp:
            if d.get("alignment") and dali and sec.has(8):  # on CUDA: DALI's mixed decode, else its CPU operators
                try:
                    res["data_alignment"] = alignment("cuda" if cuda else "cpu", Path(tmp))
                except Exception as e:  # noqa: BLE001 - a broken pipeline is a result
                    res["data_alignment"] = dict(ok=False, error=f"{type(e).__name__}: {e}"[:300])
                log(f"  data alignment: {res['data_alignment']}")
            rows, ratios = measure(
                d["cases"],
                d["workers"],
                reps=d["reps"],
                images=d["images"],
                batch=d["batch"],
                epochs=d["epochs"],
                tmp=Path(tmp),
                main_threads=d.get("main_threads"),
                section=sec,
                log=log,
            )
            res["data"].extend(rows)
            res["data_ratios"], res["data_scaling"] = ratios, scaling(rows)
            for r in ratios:
                res["notes"].append(
                    f"data: DALI {r['device']} / torch images/s, {r['case']}, {r['workers']} workers: "
                    f"{r['ratio']}x (median of {r['reps']} interleaved pairs, range {r['min']}-"
                    f"{r['max']})"
                )
                log("  " + res["notes"][-1])
            if d.get("profile"):
                res["data_profile"] = []
                for case in d["cases"]:
                    if not sec.has(30):
                        sec.skip(f"data profile {case}")
                        continue
                    res["data_profile"].append(profile(case, Path(tmp) / CASES[case][0], batch=d["batch"]))
                    log(f"  data profile (CPU ms/image, 1 thread): {res['data_profile'][-1]}")


def host_section(cfg, budget, res, log, smoke: bool) -> None:
    """bench.host in its own process (it needs TRITON_INTERPRET=0 before ``kernels`` is imported); its JSON goes
    into ``res["host"]`` (environment dropped: the run's own is recorded once)."""
    with budget.section("host", cfg["budgets"].get("host")) as sec:
        if not sec.has(5):
            sec.skip("host")
            return
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "host.json"
            # smoke: one model, 3 steps; quick and campaign: both models, 21 steps (each side, interleaved)
            cmd = [sys.executable, "-m", "bench.host", "--out", str(out)] + (
                ["--smoke"] if smoke else ["--iters", str(cfg.get("host_iters", 31))]
            )
            log("  $ " + " ".join(cmd[1:]))
            env = dict(
                os.environ,
                PYTHONPATH=str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
            )
            try:
                p = subprocess.run(
                    cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(5, sec.timeout()), env=env
                )
            except subprocess.TimeoutExpired:
                sec.skip("host", f"timed out after {sec.budget_s:.0f} s")
                res["host"] = dict(error=f"timed out after {sec.budget_s:.0f} s")
                return
            for ln in p.stdout.strip().splitlines():
                log("  | " + ln)
            if p.returncode != 0 or not out.is_file():
                res["host"] = dict(error=f"exit {p.returncode}: " + (p.stderr.strip().splitlines() or [""])[-1][:300])
                log(f"  host section failed: {res['host']['error']}")
                return
            host = json.loads(out.read_text())
        host.pop("environment", None)
        res["host"] = host
        if host.get("skipped"):
            sec.skip("host", host["skipped"])
        else:
            fails = [c["target"] for c in host.get("checks", []) if c["result"] == "FAIL"]
            res["notes"].append(
                f"host (bench.host, CPU thread time, stand-in sm_90 driver): "
                f"{len(host['checks']) - len(fails)} targets pass, {len(fails)} fail"
                + (f" ({'; '.join(fails)})" if fails else "")
            )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    ap.add_argument("--quick", action="store_true", help="CPU quick mode: narrow models, small sizes, < 5 min")
    ap.add_argument("--gpu-campaign", action="store_true", help="tests first, then everything, budgeted to < 9 min")
    ap.add_argument("--smoke", action="store_true", help="with --gpu-campaign: shrink it to a CPU smoke run")
    ap.add_argument(
        "--out",
        type=Path,
        help="campaign: the folder for everything (results.json, log, plots); "
        "other modes: the JSON path (default bench/results/<device>-<date>.json)",
    )
    ap.add_argument("--sections", help="comma list to run only some of: model,kernels,host,data,inference")
    ap.add_argument(
        "--budget-scale",
        type=float,
        default=1.0,
        help="multiply every time budget (e.g. 2 on a machine shared with other jobs); recorded",
    )
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--update-readme", action="store_true", help="rewrite the latest-results block of bench/README.md")
    args = ap.parse_args(argv)
    if args.smoke and not args.gpu_campaign:
        ap.error("--smoke shrinks the campaign: use it with --gpu-campaign")
    if args.gpu_campaign and not args.out:
        ap.error("--gpu-campaign needs --out DIR")

    import torch

    import kernels  # noqa: F401  (TRITON_INTERPRET before any kernel definition without CUDA)
    from bench._env import device_slug, environment, write_results
    from bench.budget import Budget
    from bench.report import goals, markdown_block, plot, summary, text_report, update_readme

    cuda = torch.cuda.is_available()
    mode = ("smoke" if args.smoke else "campaign") if args.gpu_campaign else ("quick" if args.quick else "full")
    cfg = dict(CONFIGS[mode])
    if args.budget_scale != 1.0:
        k = args.budget_scale
        cfg["total_s"] = cfg["total_s"] and cfg["total_s"] * k
        cfg["budgets"] = {n: (b and b * k) for n, b in cfg["budgets"].items()}
    cfg["budget_scale"] = args.budget_scale
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    date = _dt.date.today().isoformat()
    slug = device_slug()
    if args.gpu_campaign:
        out_dir = args.out
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, log_path, stem = out_dir / "results.json", out_dir / "campaign.log", "plot"
    else:
        json_path = args.out or RESULTS / f"{slug}-{date}{'-quick' if mode == 'quick' else ''}.json"
        out_dir, log_path, stem = json_path.parent, None, json_path.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    log = Logger(log_path)
    if mode == "campaign" and not cuda:
        log("WARNING: --gpu-campaign without CUDA: running the full campaign on CPU (use --smoke for a CPU check)")
    if mode == "full" and not cuda:
        log("WARNING: full mode on CPU builds the published widths at 224/504: expect a long run (try --quick)")
    budget = Budget(cfg["total_s"], log)
    env = environment()
    log(
        f"python -m bench: mode {mode}, device {env['device']} ({env.get('cpu_model')}), torch {env['torch']}, "
        f"triton {env['triton']}, commit {env['commit'][:10]}{' (dirty)' if env['dirty'] else ''}"
    )
    if not cuda:
        log("CPU run: fp32, NCHW; the Triton kernels only run interpreted here (correctness smoke, never timed).")
    res: dict = dict(
        mode=mode,
        device_slug=slug,
        date=date,
        config={k: v for k, v in cfg.items()},
        model=dict(fixed=[], sweep=[], largest=[]),
        kernels={},
        data=[],
        notes=[],
        sections={},
    )
    res["model"]["note"] = (
        "bf16 autocast, channels_last, SGD step included; peak = torch.cuda.max_memory_allocated"
        if cuda
        else "fp32, NCHW, SGD step included; peak = peak RSS delta of a fresh "
        "subprocess (ru_maxrss minus its value after imports and a runtime warm-up)"
    ) + "; saved = saved-for-backward bytes (kernels.profiling.saved_tensor_bytes)"
    budget.sections = res["sections"]
    if not cuda:
        res["notes"].append(
            "torch.compile on CPU runs with torch._inductor.config.layout_optimization = False: "
            "with Inductor's channels_last layouts oneDNN's convolution_backward segfaults in the "
            "compiled backward (torch 2.13 CPU, width-1/16 A1 at 224)"
        )
    wanted = set((args.sections or "model,kernels,host,data,inference").split(","))
    unknown = wanted - {"model", "kernels", "host", "data", "inference"}
    if unknown:
        ap.error(f"--sections: unknown {', '.join(sorted(unknown))}; expected a comma list of model,kernels,host,data")
    status = 0
    try:
        if args.gpu_campaign:
            with budget.section("tests", cfg["budgets"].get("tests")) as sec:
                res["tests"] = run_tests(sec, out_dir, log, cuda)
            log(f"  tests: {res['tests']['summary']}")
            if res["tests"].get("passed") is False or res["tests"].get("timed_out"):
                # a GPU window is rare (2026-11-25: one failing tolerance test cost a whole call): measure anyway,
                # flag every result, exit 1
                log("WARNING: compiled kernel tests failed (see above); measuring anyway, results flagged")
                res["notes"].append("compiled kernel tests FAILED in this run: " + res["tests"].get("summary", ""))
                status = 1
        if not res.get("stopped") and cfg.get("order"):
            # the campaign: the configured order (model level first: subprocesses with timeouts, the headline
            # numbers; host last: its stand-in Triton driver must not precede a GPU section)
            group = {
                "model": "model",
                "compile": "model",
                "fullres": "model",
                "ceilings": "kernels",
                "bn_relu": "kernels",
                "bn_parts": "kernels",
                "conv": "kernels",
                "data": "data",
                "host": "host",
                "inference": "inference",
            }
            if not args.sections:
                wanted.add("host")
            done_kernels = False
            for name in cfg["order"]:
                if name == "tests" or group.get(name) not in wanted:
                    continue
                if name == "model":
                    model_section(cfg, budget, res, log, cuda, mode == "smoke")
                elif name == "compile":
                    compile_section(cfg, budget, res, log, cuda)
                elif name == "fullres":
                    fullres_section(cfg, budget, res, log, cuda)
                elif group[name] == "kernels" and not done_kernels:
                    kernel_sections(cfg, budget, res, log, cuda, mode in ("smoke", "quick"))
                    done_kernels = True
                elif name == "data":
                    data_section(cfg, budget, res, log, cuda)
                elif name == "host":
                    host_section(cfg, budget, res, log, mode == "smoke")
                elif name == "inference":  # eval images/s: eager, fused, torch.compile (bench.inference)
                    from bench.inference import section as inference_section

                    inference_section(cfg, budget, res, log, cuda)
        elif not res.get("stopped"):
            # model level first: its measurements run in subprocesses with timeouts, and hold the headline numbers
            if "model" in wanted:
                model_section(cfg, budget, res, log, cuda, mode == "smoke")
            if "inference" in wanted:  # eval images/s: eager, fused, torch.compile (bench.inference)
                from bench.inference import section as inference_section

                inference_section(cfg, budget, res, log, cuda)
            if "kernels" in wanted:
                kernel_sections(cfg, budget, res, log, cuda, mode in ("smoke", "quick"))
            if "host" in wanted:
                host_section(cfg, budget, res, log, mode == "smoke")
            if "data" in wanted:
                data_section(cfg, budget, res, log, cuda)
            if "model" in wanted and cfg.get("compile_last"):  # quick: compile takes whatever time is left
                compile_section(cfg, budget, res, log, cuda)
    except KeyboardInterrupt:
        res["stopped"] = "interrupted"
        status = 130
    res["wall_s"] = round(budget.elapsed(), 1)
    res["summary"] = summary(res)
    res["environment"] = env
    res["goals"] = goals(res)
    plots: list[str] = []
    if not args.no_plots:
        plots, why = plot(res, out_dir, stem)
        if why:
            res["notes"].append(why)
    res["plots"] = [Path(p).name for p in plots]
    log("")
    log(text_report(res))
    fields = {k: v for k, v in res.items() if k not in ("environment",)}
    write_results(json_path, res["model"]["fixed"], **{k: v for k, v in fields.items() if k != "results"})
    log(f"\nwrote {json_path}" + "".join(f"\nwrote {p}" for p in plots) + f"\ntotal {res['wall_s']} s")
    if args.update_readme:
        readme = ROOT / "bench" / "README.md"
        rel = json_path.resolve().relative_to(ROOT) if json_path.resolve().is_relative_to(ROOT) else json_path
        update_readme(readme, markdown_block(res, str(rel), plots, readme.parent))
        log(f"updated {readme}")
    return status
