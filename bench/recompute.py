"""Activation memory against step time for the per-unit memory modes of a ResNet-38, on any device.

    python -m bench.recompute [--label voc_rna-a1_cls21_s8] [--size 224] [--batch 1] \
        [--out bench/results/recompute-cpu.json] [--plot bench/results/recompute-cpu.png]

Implementations, each on the same weights and input in one process: eager (plain torch), eager with
``torch.utils.checkpoint`` on every unit (timm's ``set_grad_checkpointing``), fused (BN-ReLU recomputed),
unit (each unit re-run in backward on the fused kernels), and the planner's plans for byte budgets between
fused and unit (:func:`widedeep.models.recompute.plan_for_budget`). Saved bytes are exact (tensors autograd
keeps, each storage once, parameters excluded); step time is forward + backward (median of ``--steps`` after a
warm-up), reported as a ratio to eager from the same run. torch.compile's activation memory budget is not
measured here (compiling the full net on a 2-core CPU takes longer than this whole benchmark).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench._env import write_results
from kernels.profiling import saved_tensor_bytes
from widedeep.models import create_model
from widedeep.models.recompute import measure_unit_costs, plan_for_budget


def _step_seconds(model, x, steps: int) -> float:
    def step():
        model.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()

    def sync():
        if x.is_cuda:
            torch.cuda.synchronize()

    step()  # warm-up of this configuration
    sync()  # else the first timed step also waits for the warm-up's queued kernels
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.recompute", description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="voc_rna-a1_cls21_s8")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--budgets", default="0.45,0.40,0.35,0.32", help="planner budgets, fractions of eager bytes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    backend = "auto" if dev.type == "cuda" else "torch"
    model = create_model(args.label, width=args.width).to(dev).train()
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    params = list(model.parameters())

    def measure(name: str, **extra) -> dict:
        saved = saved_tensor_bytes(lambda: model(x), params)
        return dict(
            impl=name, saved_MiB=round(saved / 2**20, 2), step_s=round(_step_seconds(model, x, args.steps), 4), **extra
        )

    _step_seconds(model, x, 2)  # process warm-up (allocator, oneDNN primitives): else the first row pays for it
    rows = [measure("eager")]
    model.set_grad_checkpointing(True)
    rows.append(measure("checkpoint per unit"))
    model.set_grad_checkpointing(False)
    model.set_fused(backend)
    rows.append(measure("fused"))
    model.set_recompute("unit")
    rows.append(measure("unit"))
    model.set_recompute(None)
    costs = measure_unit_costs(model, x, backend=backend)
    fixed = int(rows[2]["saved_MiB"] * 2**20) - sum(c.saved["fused"] for c in costs)
    eager_bytes = rows[0]["saved_MiB"] * 2**20
    for frac in (float(f) for f in args.budgets.split(",")):
        plan = plan_for_budget(costs, int(frac * eager_bytes), fixed=fixed)
        model.set_recompute(plan)
        extra = sum(c.extra_flops[p] for c, p in zip(costs, plan))
        rows.append(measure(f"plan {frac:.2f}x", units_rerun=plan.count("unit"), extra_GFLOP=round(extra / 1e9, 2)))
    for r in rows:
        r["saved_ratio"] = round(r["saved_MiB"] / rows[0]["saved_MiB"], 4)
        r["step_ratio"] = round(r["step_s"] / rows[0]["step_s"], 3)
    print(
        f"{args.label} width {args.width} {args.batch}x3x{args.size}x{args.size} on {dev} "
        f"(saved bytes exact; step = forward+backward, median of {args.steps})"
    )
    print(f"{'implementation':22s} {'saved MiB':>10s} {'x eager':>8s} {'step s':>8s} {'x eager':>8s}")
    for r in rows:
        print(
            f"{r['impl']:22s} {r['saved_MiB']:10.1f} {r['saved_ratio']:8.3f} {r['step_s']:8.3f} {r['step_ratio']:8.3f}"
        )
    if args.out:
        write_results(
            args.out,
            rows,
            label=args.label,
            width=args.width,
            size=args.size,
            batch=args.batch,
            note="saved bytes exact; step time forward+backward, ratio to eager in the same run",
        )
        print(f"wrote {args.out}")
    if args.plot:
        _plot(rows, args.plot, f"{args.label} {args.batch}x{args.size}px on {dev}")
    return 0


def _plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    plans = [r for r in rows if r["impl"].startswith("plan") or r["impl"] in ("fused", "unit")]
    plans.sort(key=lambda r: r["saved_ratio"])
    ax.plot([r["saved_ratio"] for r in plans], [r["step_ratio"] for r in plans], "o-", label="widedeep plans")
    for r in rows:
        if not r["impl"].startswith("plan"):
            ax.annotate(r["impl"], (r["saved_ratio"], r["step_ratio"]), textcoords="offset points", xytext=(4, 4))
    ck = next(r for r in rows if r["impl"] == "checkpoint per unit")
    ax.plot([ck["saved_ratio"]], [ck["step_ratio"]], "s", label="torch.utils.checkpoint per unit")
    ax.plot([1.0], [1.0], "k^", label="eager")
    ax.set_xlabel("saved activation bytes (x eager)")
    ax.set_ylabel("forward+backward time (x eager)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
