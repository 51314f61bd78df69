"""Where a training step's GPU time goes: torch.profiler's top CUDA kernels for each implementation.

``PYTHONPATH=. python -m bench.profile_step --model A1-s8 --batch 4 --size 504 --impls eager,fused --out DIR``
writes ``profile-<model>-<impl>.txt`` (kernel table sorted by CUDA time) and prints the totals. CUDA only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench import impls
from bench.impls import LABELS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_step")
    ap.add_argument("--model", default="A1-s8")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=504)
    ap.add_argument("--impls", default="eager,fused")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("python -m bench.profile_step: error: needs a CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    from torch.profiler import ProfilerActivity, profile

    for impl in args.impls.split(","):
        model, fn = impls.build(impl, LABELS[args.model], device="cuda")
        x, y = impls.inputs(model, args.batch, args.size, "cuda")
        step = impls.make_step(model, fn, x, y, "cuda")
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
        (args.out / f"profile-{args.model}-{impl}.txt").write_text(table)
        total = sum(e.self_device_time_total for e in prof.key_averages()) / args.steps / 1e3
        print(f"{args.model} {impl} b{args.batch} {args.size}: {total:.1f} ms of kernels per step")
        print(table[:6000])
        del model, fn, step
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
