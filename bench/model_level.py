"""Model-level measurements, each in a fresh subprocess (:mod:`bench.worker`): step time, peak memory, saved
activation bytes at a fixed batch, a batch sweep for the plots, and (CUDA) the largest batch that fits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.worker import PREFIX

ROOT = Path(__file__).resolve().parents[1]


def run_worker(spec: dict, timeout: float, log=print) -> dict:
    """Run one spec in ``python -m bench.worker``; a timeout or crash becomes a row with ``error``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    base = dict(
        impl=spec["impl"], model=spec.get("model"), batch=spec["batch"], size=spec["size"], width=spec.get("width", 1.0)
    )
    if timeout < 3:
        return dict(base, skipped="no time left in the section budget")
    t = time.perf_counter()
    try:
        p = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-m", "bench.worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return dict(base, error=f"timed out after {timeout:.0f} s (section budget)", timeout=True)
    wall = round(time.perf_counter() - t, 1)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(PREFIX):
            row = json.loads(line[len(PREFIX) :])
            row["process_s"] = wall
            return row
    tail = (p.stderr or p.stdout).strip().splitlines()[-4:]
    if "Fatal Python error" in (p.stderr or ""):  # faulthandler: the error and the innermost frames of the crash
        lines = p.stderr.splitlines()
        fatal = next(ln for ln in lines if "Fatal Python error" in ln)
        frames = [ln.strip() for ln in lines if ln.strip().startswith("File ")]
        main_frames = [f for f in frames if "threading.py" not in f and "tqdm" not in f][:2]
        tail = [fatal] + main_frames
    if p.returncode < 0 or "CUDA out of memory" in (p.stderr or ""):
        return dict(base, oom="CUDA out of memory" in (p.stderr or ""), error=f"exit {p.returncode}: {tail}")
    return dict(base, error=f"worker exit {p.returncode}: {tail}", process_s=wall)


def run_worker_multi(specs: list[dict], timeout: float, log=print) -> list[dict]:
    """CUDA: several configurations of one implementation in one ``bench.worker`` process (one start-up, one
    import of torch and the kernels; the allocator emptied and the peak reset between configurations). A row per
    spec, in order: measured, or why not (the process timed out or crashed before reaching it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    bases = [
        dict(
            impl=s["impl"],
            model=s.get("model"),
            batch=s["batch"],
            size=s["size"],
            width=s.get("width", 1.0),
            bn=s.get("bn", "batch"),
        )
        for s in specs
    ]
    if timeout < 3:
        return [dict(b, skipped="no time left in the section budget") for b in bases]
    t = time.perf_counter()
    why = None
    try:
        p = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-m", "bench.worker", json.dumps({"configs": specs})],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env=env,
        )
        out, err = p.stdout, p.stderr
        if p.returncode != 0:
            why = f"worker exit {p.returncode}: {(err or out).strip().splitlines()[-3:]}"
    except subprocess.TimeoutExpired as e:  # the rows printed before the timeout are kept
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = ""
        why = f"timed out after {timeout:.0f} s (section budget)"
    wall = round(time.perf_counter() - t, 1)
    rows = [json.loads(ln[len(PREFIX) :]) for ln in out.splitlines() if ln.startswith(PREFIX)]
    for r in rows:
        r["process_s"] = wall
        r["shared_process"] = len(specs)
    for b in bases[len(rows) :]:
        rows.append(
            dict(b, error=why or "the worker printed no row for it", timeout=why is not None and "timed out" in why)
        )
    return rows


def _log_row(row: dict, log) -> None:
    if "error" in row or "skipped" in row:
        log(f"  {row['model']:6s} {row['impl']:14s} b{row['batch']:<4d} {row.get('error') or row.get('skipped')}")
    elif row.get("oom"):
        log(f"  {row['model']:6s} {row['impl']:14s} b{row['batch']:<4d} out of memory")
    else:
        t = f"{row['step_ms']:9.1f} ms {row['img_per_s']:8.1f} img/s" if row.get("timed") else f"{'not timed':>27s}"
        s = f" saved {row['saved_MiB']:.1f} MiB" if "saved_MiB" in row else ""
        log(
            f"  {row['model']:6s} {row['impl']:14s} b{row['batch']:<4d}{t}  peak {row['peak_MiB']:8.1f} MiB{s}"
            f"  ({row.get('process_s', '?')} s)"
        )


def largest_batch(base: dict, section, start: int, cap: int, log=print, backstop: float = 60) -> dict:
    """CUDA only: :func:`bench.worker.search` in a fresh process, given what is left of the section budget.
    The worker does not start a try it predicts to end after its budget; ``backstop`` s more is the timeout."""
    budget = section.timeout() - 10  # leave the process time to report
    if budget < 15:
        return dict(impl=base["impl"], model=base.get("model"), skipped="no time left in the section budget")
    spec = dict(base, search=True, start=start, cap=cap, budget_s=budget, batch=start)
    row = run_worker(spec, budget + backstop, log)
    if "largest_batch" in row:
        log(
            f"  {row['model']:6s} {row['impl']:14s} largest batch {row['largest_batch']} "
            f"(first failure {row['first_failure']}, complete={row['complete']}, {row.get('process_s')} s)"
        )
    else:
        log(f"  {base.get('model')} {base['impl']} largest batch: {row.get('error') or row.get('skipped')}")
    return row
