"""Time and peak memory of a Model A1 training step on a GPU: unfused vs fused kernels vs checkpointing.

    PYTHONPATH=. python -m bench.gpu_step --out $OUT/gpu_step.json

For each mode the largest batch that fits (searched over --batches) is reported, and all modes are also timed
at a common batch. bf16 autocast, 224x224, channels_last, SGD step included. Medians over --iters steps after
warm-up, synchronised; peak = torch.cuda.max_memory_allocated().
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench._env import write_results
from widedeep.models import create_model

MODES = ("unfused", "fused", "checkpoint")


def build(mode: str, label: str):
    model = create_model(label, fused=(mode == "fused")).cuda().to(memory_format=torch.channels_last).train()
    model.set_grad_checkpointing(mode == "checkpoint")
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def step(model, opt, x, y):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run(mode: str, label: str, batch: int, size: int, iters: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, opt = build(mode, label)
    x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    for _ in range(3):
        step(model, opt, x, y)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step(model, opt, x, y)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return dict(
        mode=mode,
        label=label,
        batch=batch,
        size=size,
        dtype="bf16 autocast",
        layout="channels_last",
        median_ms=round(med * 1e3, 2),
        img_per_s=round(batch / med, 1),
        peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2),
    )


def largest_batch(mode: str, label: str, size: int, batches: list[int]) -> int | None:
    best = None
    for b in batches:
        try:
            run(mode, label, b, size, iters=1)
            best = b
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_step")
    ap.add_argument("--label", default="ilsvrc-cls_rna-a1_cls1000")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--common-batch", type=int, default=32)
    ap.add_argument("--batches", default="32,48,64,96,128,160,192,256")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    results = []
    for mode in MODES:
        results.append(run(mode, args.label, args.common_batch, args.size, args.iters))
        print(json.dumps(results[-1]), flush=True)
    for mode in MODES:
        b = largest_batch(mode, args.label, args.size, batches)
        if b:
            results.append(dict(run(mode, args.label, b, args.size, args.iters), largest_batch=True))
            print(json.dumps(results[-1]), flush=True)
    if args.out:
        write_results(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
