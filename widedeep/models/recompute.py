"""Per-unit activation-memory modes of a ResNet-38 and a planner that fits a byte budget.

Each pre-activation unit runs in one of three modes during training:

- ``"stored"``: plain torch ops; autograd keeps every BN output, ReLU output and dropout mask.
- ``"fused"``: the BN-ReLU-conv recompute kernels (:mod:`kernels`): each stage keeps only its BN's input
  (and a 1-byte dropout mask); relu(bn(x)) is recomputed in backward.
- ``"unit"``: only the unit's input is kept; backward re-runs the whole unit (on the fused kernels, so the
  re-run itself keeps little) before differentiating it. It costs one more forward of the unit's convs.

The unit re-run replays the forward exactly: the RNG state is restored (same dropout masks), autocast is
replayed by :func:`torch.utils.checkpoint.checkpoint`, and BN running statistics are put back after the
re-run so that they are updated once per step, as without recomputation. Batch statistics are recomputed
from the same input, so they are the forward's; with synchronised BN the re-run all-reduces again, in the
same order on every rank (backward order).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint

from kernels.profiling import saved_tensor_bytes

MODES = ("stored", "fused", "unit")


@contextlib.contextmanager
def running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Run a block, then restore the BN running statistics it changed (a re-run must not update them twice)."""
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def recompute_unit(unit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``unit(x)`` keeping only ``x`` for backward; the unit is re-run in backward (see the module docstring)."""
    calls = [0]

    def run(t: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 1:  # the forward itself
            return unit(t)
        with running_stats_kept(unit):  # the re-run in backward
            return unit(t)

    return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False, preserve_rng_state=True)


def normalise_plan(units: Sequence[nn.Module], plan: str | Sequence[str] | Mapping[str, str] | None,
                   names: Sequence[str]) -> list[str]:
    """One mode per unit from ``plan``: a mode for all units, a list (forward order) or {unit name: mode}."""
    if plan is None:
        return ["stored"] * len(units)
    if isinstance(plan, str):
        plan = [plan] * len(units)
    elif isinstance(plan, Mapping):
        unknown = set(plan) - set(names)
        if unknown:
            raise ValueError(f"set_recompute: unknown unit(s) {sorted(unknown)}; units are {', '.join(names)}")
        plan = [plan.get(n, "stored") for n in names]
    plan = list(plan)
    if len(plan) != len(units):
        raise ValueError(f"set_recompute: {len(plan)} modes for {len(units)} units")
    bad = [m for m in plan if m not in MODES]
    if bad:
        raise ValueError(f"set_recompute: modes must be one of {MODES}, got {bad[0]!r}")
    return plan


@dataclass(frozen=True)
class UnitCost:
    """Measured per-unit costs for the planner: saved bytes per mode and the re-run's extra FLOPs."""

    name: str
    saved: Mapping[str, int]  # mode -> bytes kept for backward (the unit input included)
    extra_flops: Mapping[str, float]  # mode -> extra forward FLOPs in backward (stored 0, fused ~0, unit = convs)


def conv_flops(unit: nn.Module, x: torch.Tensor) -> float:
    """Forward multiply-adds x 2 of the unit's convolutions for input ``x`` (shape only; meta tensors work)."""
    total = 0.0
    hooks = []

    def hook(mod, args, out):
        nonlocal total
        k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
        total += 2.0 * out.numel() * k

    for m in unit.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(hook))
    backend = getattr(unit, "backend", None)
    try:
        unit.backend = None  # the plain path calls the conv modules (the fused one calls F.conv2d)
        with torch.no_grad(), running_stats_kept(unit):
            unit(x)
    finally:
        unit.backend = backend
        for h in hooks:
            h.remove()
    return total


def plan_for_budget(costs: Sequence[UnitCost], budget: int, *, prefer: str = "fused", fixed: int = 0) -> list[str]:
    """The plan with the least extra compute whose saved bytes (``fixed`` bytes outside the units, e.g. stem
    and head, plus the units') fit ``budget``.

    Starts from ``prefer`` everywhere (``"fused"``: the cheap default; ``"stored"``: plain torch), then moves
    to ``"unit"`` the units that free the most bytes per extra FLOP until the total fits. If even all-``"unit"``
    does not fit, returns all-``"unit"`` (the smallest plan). Greedy on a ratio: exact when the per-unit
    ratios are what decides, as they are for these nets (one choice per unit, costs add up).
    """
    plan = [prefer] * len(costs)
    total = fixed + sum(c.saved[prefer] for c in costs)
    gains = sorted(range(len(costs)), key=lambda i: -(costs[i].saved[prefer] - costs[i].saved["unit"])
                   / max(1.0, costs[i].extra_flops["unit"] - costs[i].extra_flops[prefer]))
    for i in gains:
        if total <= budget:
            break
        total -= costs[i].saved[prefer] - costs[i].saved["unit"]
        plan[i] = "unit"
    return plan


def measure_unit_costs(model: nn.Module, x: torch.Tensor, backend: str = "auto") -> list[UnitCost]:
    """Per-unit saved bytes in each mode (a real forward of each unit on its input from ``model(x)``) and
    the extra forward FLOPs each mode costs in backward. BN running statistics are left as they were."""
    units = [(n, m) for n, m in model.named_children() if hasattr(m, "recompute") and hasattr(m, "backend")]
    inputs: dict[str, torch.Tensor] = {}
    hooks = [u.register_forward_pre_hook(lambda mod, args, n=n: inputs.__setitem__(n, args[0].detach()))
             for n, u in units]
    state = [(u.backend, u.recompute) for _, u in units]
    costs = []
    try:
        with running_stats_kept(model), torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        params = list(model.parameters())
        for name, u in units:
            t = inputs[name].requires_grad_()
            saved = {}
            with running_stats_kept(u):
                for mode in MODES:
                    u.backend, u.recompute = (None if mode == "stored" else backend), False
                    run = (lambda: recompute_unit(u, t)) if mode == "unit" else (lambda: u(t))
                    saved[mode] = saved_tensor_bytes(run, params)
            flops = conv_flops(u, t)
            costs.append(UnitCost(name, saved, {"stored": 0.0, "fused": 0.0, "unit": flops}))
    finally:
        for h in hooks:
            h.remove()
        for (_, u), (b, r) in zip(units, state):
            u.backend, u.recompute = b, r
    return costs
