"""Inference throughput: eval-mode images/s of eager, fused and ``torch.compile`` (of the eager model).

    python -m bench.inference --smoke                      # CPU smoke: width 1/16, small inputs (seconds)
    python -m bench.inference --out bench/results/inference-cpu.json [--width W]
    (GPU: the ``inference`` section of ``python -m bench --gpu-campaign``)

Cases: ``A1`` = ``ilsvrc-cls_rna-a1_cls1000`` at 224x224, batch 64 (the training benchmark's shape), and
``cityscapes`` = ``cityscapes_rna-a1_cls19_s8`` at the seed's Cityscapes test protocol, the full 1024x2048 image,
batch 1. CUDA: bf16 autocast, channels_last; CPU: fp32, NCHW. Timed: ``iters`` forwards under ``torch.no_grad``
after ``warmup`` (synchronised on CUDA), median per-forward time; compile time is the first call's
(``first_s``). Each implementation of each case runs in a fresh process (``--worker JSON``), so one crash, OOM
or timeout is one row with ``error``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "BENCH_INFERENCE "
IMPLS = ("eager", "fused", "compile")
CASES = {
    "A1": dict(label="ilsvrc-cls_rna-a1_cls1000", size=(224, 224), batch=64),
    "cityscapes": dict(label="cityscapes_rna-a1_cls19_s8", size=(1024, 2048), batch=1),
}
SMOKE_CASES = {  # the same two models at CPU-smoke sizes (width 1/16)
    "A1": dict(label="ilsvrc-cls_rna-a1_cls1000", size=(64, 64), batch=4),
    "cityscapes": dict(label="cityscapes_rna-a1_cls19_s8", size=(64, 128), batch=1),
}


def measure(spec: dict) -> dict:
    """One row: spec keys case, label, size, batch, impl, width, warmup, iters, device, threads."""
    import torch

    import kernels  # noqa: F401  (TRITON_INTERPRET before any kernel definition without CUDA)
    from widedeep.models import create_model

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dev = torch.device(spec["device"])
    cuda = dev.type == "cuda"
    impl = spec["impl"]
    model = create_model(spec["label"], width=spec["width"], fused=impl == "fused").eval().to(dev)
    x = torch.randn(spec["batch"], 3, *spec["size"], device=dev)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    net = model
    if impl == "compile":
        opts = {} if cuda else {"options": {"layout_optimization": False}}  # CPU: see README (oneDNN crash)
        net = torch.compile(model, **opts)

    def step():
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            net(x)
        if cuda:
            torch.cuda.synchronize()

    t = time.perf_counter()
    step()
    first_s = time.perf_counter() - t
    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["iters"]):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    ms = statistics.median(times) * 1e3
    return dict(
        case=spec["case"],
        impl=impl,
        label=spec["label"],
        width=spec["width"],
        batch=spec["batch"],
        size=list(spec["size"]),
        device=spec["device"],
        dtype="bf16 autocast" if cuda else "fp32",
        ms=round(ms, 3),
        img_per_s=round(spec["batch"] * 1e3 / ms, 2),
        first_s=round(first_s, 2),
        iters=spec["iters"],
    )


def run_worker(spec: dict, timeout: float) -> dict:
    base = dict(case=spec["case"], impl=spec["impl"], batch=spec["batch"], size=list(spec["size"]))
    if timeout < 3:
        return dict(base, skipped="no time left in the section budget")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        p = subprocess.run(
            [sys.executable, "-m", "bench.inference", "--worker", json.dumps(spec)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return dict(base, error=f"timed out after {timeout:.0f} s (section budget)", timeout=True)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(PREFIX):
            return json.loads(line[len(PREFIX) :])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return dict(base, error=f"worker exit {p.returncode}: {tail}", oom="out of memory" in (p.stderr or "").lower())


def specs(smoke: bool, cuda: bool, width: float | None = None, iters: int | None = None) -> list[dict]:
    cases = SMOKE_CASES if smoke else CASES
    w = width if width is not None else (0.0625 if smoke else 1.0)
    out = []
    for impl in IMPLS:  # every case's eager and fused first: the compile rows take the time that is left
        for case, c in cases.items():
            out.append(
                dict(
                    case=case,
                    impl=impl,
                    label=c["label"],
                    size=tuple(c["size"]),
                    batch=c["batch"],
                    width=w,
                    warmup=1 if smoke else 3,
                    iters=iters or (2 if smoke else 10),
                    device="cuda" if cuda else "cpu",
                    threads=None if cuda else 2,
                )
            )
    return out


def log_row(row: dict, log=print) -> None:
    what = f"  {row['case']:10s} {row['impl']:8s} b{row['batch']:<3d} {row['size'][0]}x{row['size'][1]}"
    if "img_per_s" in row:
        log(f"{what} {row['ms']:9.1f} ms {row['img_per_s']:9.1f} img/s  (first call {row['first_s']} s)")
    else:
        log(f"{what} {row.get('error') or row.get('skipped')}")


def section(cfg: dict, budget, res: dict, log, cuda: bool) -> None:
    """The ``inference`` section of :mod:`bench.runner` (``cfg["inference"]``: smoke (bool), iters)."""
    inf = cfg.get("inference", {})
    rows = res.setdefault("inference", [])
    with budget.section("inference", cfg["budgets"].get("inference")) as sec:
        for spec in specs(inf.get("smoke", not cuda), cuda, inf.get("width"), inf.get("iters")):
            if not sec.has(8):
                sec.skip(f"{spec['case']} {spec['impl']}")
                rows.append(dict(case=spec["case"], impl=spec["impl"], skipped="section time budget spent"))
                continue
            row = run_worker(spec, sec.timeout())
            rows.append(row)
            log_row(row, log)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="width 1/16 at small inputs (CPU smoke)")
    ap.add_argument("--width", type=float, help="channel multiplier (default 1, smoke 1/16)")
    ap.add_argument("--iters", type=int, help="timed forwards per row")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma list of eager,fused,compile")
    ap.add_argument("--out", type=Path, help="JSON file for the rows")
    args = ap.parse_args(argv)
    if args.worker:
        print(PREFIX + json.dumps(measure(json.loads(args.worker))), flush=True)
        return 0
    import torch

    cuda = torch.cuda.is_available()
    impls = args.impls.split(",")
    rows = []
    for spec in specs(args.smoke, cuda, args.width, args.iters):
        if spec["impl"] in impls:
            rows.append(run_worker(spec, 3600))
            log_row(rows[-1])
    if args.out:
        from bench._env import environment

        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(rows=rows, environment=environment()), indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0 if all("img_per_s" in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
