"""Activation memory of one training step, fused vs unfused, measured without a GPU.

Counts the bytes of tensors autograd saves for backward (each storage once, parameters excluded) in
one forward of a training step: unfused, fused (BN-ReLU recomputed) and ``recompute="unit"``. Usage::

    python -m bench.memory [--batch 2] [--size 224] [--out bench/results/memory-cpu.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench._env import write_results
from kernels.profiling import saved_tensor_bytes
from widedeep.models import create_model

LABELS = ("ilsvrc-cls_rna-a1_cls1000", "voc_rna-a1_cls21_s8")


def measure(label: str, batch: int, size: int) -> dict:
    model = create_model(label).train()
    x = torch.randn(batch, 3, size, size)
    rows = {}
    for mode, setup in (
        ("unfused", lambda: model.set_fused(False)),
        ("fused", lambda: model.set_fused(True)),
        ("unit", lambda: model.set_recompute("unit")),
    ):
        setup()
        t = time.perf_counter()
        rows[mode] = saved_tensor_bytes(lambda: model(x).float().sum(), model.parameters())
        rows[mode + "_seconds"] = round(time.perf_counter() - t, 2)
    return dict(
        label=label,
        batch=batch,
        size=size,
        dtype="float32",
        layout="NCHW",
        unfused_MiB=round(rows["unfused"] / 2**20, 1),
        fused_MiB=round(rows["fused"] / 2**20, 1),
        unit_MiB=round(rows["unit"] / 2**20, 1),
        ratio=round(rows["fused"] / rows["unfused"], 4),
        unit_ratio=round(rows["unit"] / rows["unfused"], 4),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    results = []
    print(f"saved-for-backward activation bytes, batch {args.batch}, {args.size}x{args.size}, fp32, NCHW")
    for label in LABELS:
        r = measure(label, args.batch, args.size)
        results.append(r)
        print(
            f"{label:28s} unfused {r['unfused_MiB']:9.1f} MiB  fused {r['fused_MiB']:9.1f} MiB ({r['ratio']:.3f}x)  "
            f"unit {r['unit_MiB']:9.1f} MiB ({r['unit_ratio']:.3f}x)"
        )
    if args.out:
        write_results(args.out, results)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
