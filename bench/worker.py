"""One measurement in a fresh process: ``python -m bench.worker '<json spec>'`` prints ``BENCH_RESULT {json}``.

A fresh process per measurement gives each a clean state (allocator, compile caches in memory, peak counters)
and, on CPU, its own peak RSS. Spec keys: impl, label, width, size (int or [H, W]), batch, bn ("batch" /
"frozen"), warmup, iters, saved (bool), threads, device ("cuda"/"cpu"), smoke (bool: run, do not time).
``{"configs": [spec, ...]}`` (CUDA) measures several configurations of one implementation in one process, one
after another with the model freed, the cache emptied and the peak counter reset between them, and prints one
``BENCH_RESULT`` line per configuration as soon as it is done (a timeout keeps the rows already printed).

Peak memory: CUDA ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` (tensors only);
CPU ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end minus the same value measured in this process after
the imports and a tiny warm-up of the runtime, before the model is built (so: parameters, gradients, optimizer
state, activations, workspaces and allocator slack of the step; a high-water mark of the process, never lowered).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
import traceback

from bench.impls import COMPILED

PREFIX = "BENCH_RESULT "
TIMED_STEPS = 3  # per batch size tried by the largest-batch search (its rows are the sweep plots' points)


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _warm_runtime(device: str) -> None:
    """A tiny conv/BN forward+backward and an SGD step before the baseline, so one-off runtime set-up (thread
    pools, oneDNN/cuDNN handles) is not charged to the first implementation measured."""
    import torch

    x = torch.randn(2, 8, 8, 8, device=device, requires_grad=True)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).to(device)
    bn = torch.nn.BatchNorm2d(8).to(device)
    opt = torch.optim.SGD(list(conv.parameters()) + list(bn.parameters()), lr=0.1, momentum=0.9)
    conv(torch.relu(bn(x))).sum().backward()
    opt.step()


def measure(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    import kernels  # noqa: F401  (sets TRITON_INTERPRET without CUDA before any kernel is defined)

    import widedeep.models  # noqa: F401  (its imports belong to the baseline, not to the step)
    from bench.impls import build, inputs, make_step, saved_bytes

    device = spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    _warm_runtime(device)
    impl = spec["impl"]
    row = dict(
        impl=impl,
        model=spec.get("model"),
        label=spec["label"],
        width=spec.get("width", 1.0),
        size=spec["size"],
        batch=spec["batch"],
        bn=spec.get("bn", "batch"),
        device=device,
        dtype="bf16 autocast" if device == "cuda" else "float32",
        layout="channels_last" if device == "cuda" else "NCHW",
    )
    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    t0 = time.perf_counter()
    model, fn = build(impl, spec["label"], width=spec.get("width", 1.0), device=device, bn=spec.get("bn", "batch"))
    x, y = inputs(model, spec["batch"], spec["size"], device)
    step = make_step(model, fn, x, y, device, impl)
    # graphed: warm-up steps and the capture happen before timing (the replays are what is timed)
    setup_calls = getattr(step, "warmup_calls", 0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        t = time.perf_counter()
        step()
        sync()
        row["first_step_s"] = round(time.perf_counter() - t, 3)  # includes torch.compile / autotuning
        if spec.get("smoke"):
            row["timed"] = False
            row["note"] = "smoke: one step run, not timed" + (
                " (Triton interpreter)" if impl == "fused_igemm" and device != "cuda" else ""
            )
        else:
            t = time.perf_counter()
            for _ in range(max(0, spec.get("warmup", 2) - 1, setup_calls - 1)):
                step()
            sync()
            if setup_calls:
                row["warmup_and_capture_s"] = round(time.perf_counter() - t, 3)
                row["graph_warmup_steps"] = step.graphed.warmup
            times = []
            for _ in range(spec.get("iters", 5)):
                t = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - t)
            med = statistics.median(times)
            row.update(
                timed=True,
                iters=len(times),
                step_ms=round(med * 1e3, 2),
                step_ms_min=round(min(times) * 1e3, 2),
                img_per_s=round(spec["batch"] / med, 2),
            )
        if device == "cuda":
            row["peak_bytes"] = torch.cuda.max_memory_allocated() - base
            row["peak_method"] = "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
        else:
            row["peak_bytes"] = _rss_bytes() - base
            row["peak_method"] = (
                "peak RSS (ru_maxrss) minus ru_maxrss after imports and runtime warm-up, same subprocess"
            )
            if impl in COMPILED:
                row["note"] = (
                    "CPU peak RSS not comparable: torch.compile compiles in this process and its workers, "
                    "and Inductor's CPU memory planning differs"
                )
        row["peak_MiB"] = round(row["peak_bytes"] / 2**20, 1)
    except torch.OutOfMemoryError:
        row.update(oom=True)
        return row
    if spec.get("saved"):
        t = time.perf_counter()
        try:
            row.update(saved_bytes(impl, model, fn, x))
            row["saved_MiB"] = round(row["saved_bytes"] / 2**20, 2)
        except Exception as e:  # noqa: BLE001 - a failure to count is recorded, not fatal
            row["saved_error"] = f"{type(e).__name__}: {e}"[:300]
        row["saved_s"] = round(time.perf_counter() - t, 2)
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    return row


def search(spec: dict) -> dict:
    """CUDA: the largest batch whose training step fits, by doubling from spec["start"] then bisection, in this
    process with full cleanup between tries (one model build, parameters and optimizer state kept: the fixed
    cost of training). Each try runs a warm-up step then ``TIMED_STEPS`` timed ones (median) and records its peak
    memory: the points of the step-time / peak-memory vs batch plots."""
    import gc

    import torch

    import kernels  # noqa: F401
    from bench.impls import build, inputs, make_step

    device = "cuda"
    model, fn = build(
        spec["impl"], spec["label"], width=spec.get("width", 1.0), device=device, bn=spec.get("bn", "batch")
    )
    deadline = time.monotonic() + spec.get("budget_s", 1e9)
    tries: list[dict] = []
    last = {"b": 0, "s": 0.0}  # the last try: batch and seconds, to predict the next one's cost

    def no_time_for(b: int) -> bool:
        """The next try would end after the deadline (its time scales with the batch, x1.3 for the margin)."""
        predicted = last["s"] * b / last["b"] * 1.3 if last["b"] else 0.0
        return time.monotonic() + predicted > deadline

    def fits(b: int) -> bool:
        x = y = step = None
        ok, row = False, dict(batch=b)
        t_try = time.monotonic()
        try:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            x, y = inputs(model, b, spec["size"], device)
            step = make_step(model, fn, x, y, device, spec["impl"])
            step()
            torch.cuda.synchronize()
            times = []
            for _ in range(TIMED_STEPS):  # median of several: one step's time is one sample of its noise
                t = time.perf_counter()
                step()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t) * 1e3)
            ms = statistics.median(times)
            row.update(
                fits=True,
                step_ms=round(ms, 2),
                step_ms_min=round(min(times), 2),
                timed_steps=len(times),
                img_per_s=round(b / ms * 1e3, 2),
                peak_MiB=round(torch.cuda.max_memory_allocated() / 2**20, 1),
            )
            ok = True
        except torch.OutOfMemoryError:
            row.update(fits=False)
        except RuntimeError as e:  # cuDNN / Triton report some OOMs as RuntimeError
            if "out of memory" not in str(e).lower():
                raise
            row.update(fits=False)
        x = y = step = None
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        last.update(b=b, s=time.monotonic() - t_try)
        tries.append(row)
        print(json.dumps(row), flush=True)
        return ok

    lo, hi, b, cap = 0, None, spec.get("start", 8), spec.get("cap", 8192)
    complete = True
    while b <= cap:
        if no_time_for(b):
            complete = False
            break
        if not fits(b):
            hi = b
            break
        lo, b = b, b * 2
    while complete and hi is not None and hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        if no_time_for(mid):
            complete = False
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return dict(
        impl=spec["impl"],
        model=spec.get("model"),
        label=spec["label"],
        size=spec["size"],
        bn=spec.get("bn", "batch"),
        largest_batch=lo or None,
        first_failure=hi,
        complete=complete,
        tries=tries,
        method="doubling from start, then bisection to ~6%; one process, full cleanup between tries",
        cap_reached=hi is None and lo >= cap,
    )


def _one(spec: dict) -> dict:
    try:
        return search(spec) if spec.get("search") else measure(spec)
    except Exception as e:  # noqa: BLE001 - the runner records why an implementation failed
        tb = traceback.format_exc().strip().splitlines()
        row = dict(
            impl=spec.get("impl"),
            model=spec.get("model"),
            batch=spec.get("batch"),
            error=f"{type(e).__name__}: {str(e)[:400]}",
            where=tb[-3:] if len(tb) > 3 else tb,
        )
        if type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e):
            row["oom"] = True
        return row


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    for one in spec.get("configs") or [spec]:
        row = _one(one)
        print(PREFIX + json.dumps(row), flush=True)
        if spec.get("configs"):  # the next configuration starts from an empty allocator
            import gc

            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
