"""Per-shape forward+backward time of the BN-ReLU-conv block on a GPU, four implementations.

    PYTHONPATH=. python -m bench.conv_shapes --out $OUT/conv_shapes.json

Shapes: every distinct conv of Model A1 at 224 (batch 64 per GPU, the seed's 256 over 4 GPUs) and of
A1-s8 at 504 (batch 4 per GPU, the seed's 16 over 4), bf16, channels_last. Implementations:
eager (BatchNorm2d + ReLU + cuDNN conv), bnrelu_cudnn (Triton BN-ReLU recompute + cuDNN),
igemm (Triton implicit GEMM with the BN-ReLU prologue), compile (torch.compile of the eager block).
Times are triton.testing.do_bench medians (ms, L2 cleared); TFLOP/s counts fprop + dgrad + wgrad.

``--table kernels/conv_choice.json`` also writes the per-layer choice table (kernels/conv_choice.py: "triton" where
igemm beats bnrelu_cudnn on this device, merged with the other devices' entries already in the file).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from bench._env import write_results
from widedeep.models import create_model

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def conv_shapes(label: str, size: int, batch: int, width: float = 1.0) -> list[dict]:
    """Distinct (C, K, kernel, stride, dilation, padding, H, W) of a model's pre-activated convs, via meta tensors."""
    with torch.device("meta"):
        model = create_model(label, width=width).train()
    seen, out = set(), []

    def hook(mod, args):
        x = args[0]
        key = (
            x.shape[1],
            mod.out_channels,
            mod.kernel_size[0],
            mod.stride[0],
            mod.dilation[0],
            mod.padding[0],
            x.shape[2],
            x.shape[3],
        )
        if key not in seen:
            seen.add(key)
            out.append(dict(zip(("C", "K", "k", "stride", "dil", "pad", "H", "W"), key), N=batch, model=label))

    for unit in model.units():
        for _name, m in unit.named_children():
            if isinstance(m, nn.Conv2d):
                m.register_forward_pre_hook(hook)
    model(torch.empty(batch, 3, size, size, device="meta"))
    return out


def bench_shape(s: dict) -> dict:
    import triton.testing

    dev, dt = "cuda", torch.bfloat16
    bn = nn.BatchNorm2d(s["C"]).to(dev)
    conv = nn.Conv2d(s["C"], s["K"], s["k"], s["stride"], s["pad"], s["dil"], bias=False).to(dev)
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(s["N"], s["C"], s["H"], s["W"], device=dev).to(dt).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()

    def eager():
        with torch.autocast("cuda", dtype=dt):
            return conv(F.relu(bn(x)))

    compiled = torch.compile(eager)
    impls = {
        "eager": eager,
        "bnrelu_cudnn": lambda: _amp(lambda: kernels.bn_relu_conv(x, bn, [conv], backend="triton")[0]),
        "igemm": lambda: _amp(lambda: kernels.bn_relu_conv(x, bn, [conv], backend="triton", conv="triton")[0]),
        "compile": compiled,
    }
    y = eager()
    dy = torch.randn_like(y)
    P, Q = y.shape[-2:]
    flops = 3 * 2 * s["N"] * P * Q * s["K"] * s["C"] * s["k"] ** 2
    row = dict(s, P=P, Q=Q, dtype="bf16", layout="channels_last", gflop=round(flops / 1e9, 2))
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    for impl, fn in impls.items():

        def step():
            fn().backward(dy)

        try:
            for _ in range(3):
                step()
            ms = triton.testing.do_bench(step, grad_to_none=[x, bn.weight, bn.bias, conv.weight], return_mode="median")
            row[f"{impl}_ms"] = round(ms, 4)
            row[f"{impl}_tflops"] = round(flops / ms / 1e9, 1)
            if peak:
                row[f"{impl}_pct_peak"] = round(100 * flops / ms / 1e9 / peak, 1)
        except Exception as e:  # report, do not hide: a failing implementation is a result too
            row[f"{impl}_error"] = f"{type(e).__name__}: {e}"[:300]
    return row


def _amp(fn):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return fn()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.conv_shapes")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--table", type=Path, help="write the per-layer conv choice table here (needs --out)")
    args = ap.parse_args(argv)
    if args.table and not args.out:
        ap.error("--table needs --out (the table is made from the results file)")
    shapes = conv_shapes("ilsvrc-cls_rna-a1_cls1000", 224, 64) + conv_shapes("voc_rna-a1_cls21_s8", 504, 4)
    rows = []
    for s in shapes:
        rows.append(bench_shape(s))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        write_results(args.out, rows)
    if args.table:
        from kernels import conv_choice

        return conv_choice.main(["--from", str(args.out), "--out", str(args.table), "--merge"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
