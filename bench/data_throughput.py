"""Data pipeline throughput: images/s of DALI vs the torch/Pillow backend on the same cores, interleaved.

Synthetic ImageNet-sized JPEGs (375-500 px sides) in the ILSVRC and VOC layouts; classification train
(random-resized crop 224 + colour + lighting + flip) and segmentation train (scale jitter, crop 504, flip). Each
run builds a fresh loader, iterates ``epochs`` epochs and times the steady state: from the arrival of batch
``warmup`` to the last batch (pipeline build and worker start excluded; epoch boundaries included). Runs of all
(case, workers, backend) are interleaved and repeated ``reps`` times in one process, so the load of other jobs on
the machine hits every configuration alike; rows give the median and range, ratios are DALI/torch per repetition
(adjacent runs), and the CPU time per image (this process and its workers) says where the cores go. On a GPU
machine DALI also runs with ``mixed`` (nvJPEG) decode, and :func:`alignment` checks its labels against the pixels.
The same code is the data section of ``python -m bench``. Usage::

    python -m bench.data_throughput [--workers 1 2] [--reps 5] [--images 256] [--out bench/results/data-cpu.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CASES = {"cls-train": ("ilsvrc", 224, {}), "seg-train": ("voc", 504, {"origin_size": 500})}


def _cpu_times() -> tuple[float, float]:
    """CPU seconds (user + system) of (this process, its worker processes: exited ones and live ones).

    DALI's threads count as this process; DataLoader workers and DALI's feed processes as workers. Live
    descendants are read from /proc (Linux; elsewhere only exited, reaped children count).
    """
    t = os.times()
    workers = t.children_user + t.children_system
    try:
        tick, me, parent = os.sysconf("SC_CLK_TCK"), os.getpid(), {}
        stats = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parent[int(pid)] = int(fields[1])
                stats[int(pid)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        for pid in stats:
            p = parent.get(pid)
            while p and p != me:
                p = parent.get(p)
            if p == me:
                workers += stats[pid]
    except (OSError, ValueError):
        pass
    return t.user + t.system, workers


def run_once(
    dataset: str,
    root: Path,
    crop: int,
    backend: str,
    device: str,
    workers: int,
    batch: int,
    epochs: int,
    recipe: dict,
    warmup: int = 2,
) -> dict:
    """One timed run on a fresh loader: steady-state images/s and CPU ms per image (this process, workers).

    The clock and the CPU counters start when batch ``warmup`` arrives and stop at the last batch.
    """
    from data_pipes import build_loader

    ld = build_loader(
        dataset,
        root,
        "train",
        batch_size=batch,
        train=True,
        crop_size=crop,
        backend=backend,
        device=device,
        workers=workers,
        **recipe,
    )
    seen, timed, t0, cpu0 = 0, 0, None, None
    try:
        for _ in range(epochs):
            for b in ld:
                if device == "cuda":
                    torch.cuda.synchronize()
                seen += 1
                if seen == warmup:
                    t0, cpu0 = time.perf_counter(), _cpu_times()
                elif seen > warmup:
                    timed += len(b["index"])
        t1, cpu1 = time.perf_counter(), _cpu_times()
    finally:
        ld.close()  # stop DALI's prefetch of the next epoch: it would run during the next measurement
    del ld
    gc.collect()
    if t0 is None or timed == 0:
        raise RuntimeError(f"run too short: {seen} batches, need more than warmup={warmup}")
    return dict(
        images_per_s=timed / (t1 - t0),
        timed_images=timed,
        seconds=t1 - t0,
        main_cpu_ms_per_image=1e3 * (cpu1[0] - cpu0[0]) / timed,
        worker_cpu_ms_per_image=1e3 * (cpu1[1] - cpu0[1]) / timed,
    )


def variants(dali: bool, cuda: bool) -> list[tuple[str, str]]:
    out = [("torch", "cpu")] + ([("dali", "cpu")] if dali else [])
    if dali and cuda:
        out.append(("dali", "cuda"))  # nvJPEG 'mixed' decode, everything after it on the GPU
    return out


def measure(
    cases: list[str],
    workers: list[int],
    *,
    reps: int,
    images: int,
    batch: int,
    epochs: int,
    tmp: Path,
    main_threads: int | None = None,
    section=None,
    log=print,
) -> tuple[list[dict], list[dict]]:
    """Interleaved, repeated runs. Returns (rows per case/backend/device/workers, DALI/torch ratio rows).

    ``main_threads``: torch intra-op threads of this (the consuming) process, where batches are finished (torch
    backend: colour, normalisation, NCHW; DALI: colour for classification training). Default: the CPUs the
    workers leave free, at least 1 (on 2 cores: 1, which is also the best setting there; with 2 threads the main
    process's OpenMP threads fight the workers: measured 2-3x slower).
    """
    threads = torch.get_num_threads()
    try:
        return _measure(
            cases,
            workers,
            reps=reps,
            images=images,
            batch=batch,
            epochs=epochs,
            tmp=tmp,
            main_threads=main_threads,
            section=section,
            log=log,
        )
    finally:
        torch.set_num_threads(threads)


def _measure(cases, workers, *, reps, images, batch, epochs, tmp, main_threads, section, log):
    from data_pipes.dali_backend import available as dali_available
    from data_pipes.synthetic import write_synthetic

    dali, cuda = dali_available(), torch.cuda.is_available()
    roots = {
        case: write_synthetic(CASES[case][0], tmp / CASES[case][0], num_train=images, num_val=1, size=(375, 500))
        for case in cases
    }
    runs: dict[tuple, list[dict]] = {}
    errors: dict[tuple, str] = {}
    for rep in range(reps):
        for case in cases:
            dataset, crop, recipe = CASES[case]
            for w in workers:
                torch.set_num_threads(main_threads or max(1, (os.cpu_count() or 1) - w))
                order = variants(dali, cuda)
                if rep % 2:  # alternate who goes first: a drifting background load favours neither
                    order = order[::-1]
                for backend, device in order:
                    key = (case, backend, device, w)
                    if key in errors:
                        continue
                    if section is not None and not section.has(5):
                        section.skip(f"data {case} {backend}/{device} w{w} rep {rep + 1}")
                        continue
                    try:
                        r = run_once(dataset, roots[case], crop, backend, device, w, batch, epochs, recipe)
                    except Exception as e:  # noqa: BLE001 - a broken backend is a result
                        errors[key] = f"{type(e).__name__}: {e}"[:300]
                        log(f"  data {case} {backend}/{device} w{w}: {errors[key]}")
                        continue
                    r["rep"] = rep
                    runs.setdefault(key, []).append(r)
                    log(
                        f"  data {case} {backend}/{device} workers {w} rep {rep + 1}: {r['images_per_s']:.1f} images/s "
                        f"(cpu ms/image: main {r['main_cpu_ms_per_image']:.1f}, workers "
                        f"{r['worker_cpu_ms_per_image']:.1f})"
                    )
    rows = []
    for case in cases:
        for w in workers:
            for backend, device in variants(dali, cuda):
                key = (case, backend, device, w)
                row = dict(
                    case=case,
                    backend=backend,
                    device=device,
                    workers=w,
                    batch=batch,
                    crop=CASES[case][1],
                    images=images,
                    epochs=epochs,
                    main_threads=main_threads or max(1, (os.cpu_count() or 1) - w),
                )
                if key in errors:
                    row["error"] = errors[key]
                if key in runs:
                    ips = [r["images_per_s"] for r in runs[key]]
                    row.update(
                        images_per_s=round(statistics.median(ips), 1),
                        min=round(min(ips), 1),
                        max=round(max(ips), 1),
                        reps=len(ips),
                        runs=[round(x, 1) for x in ips],
                        seconds_per_run=round(statistics.median(r["seconds"] for r in runs[key]), 2),
                        main_cpu_ms_per_image=_med(runs[key], "main_cpu_ms_per_image"),
                        worker_cpu_ms_per_image=_med(runs[key], "worker_cpu_ms_per_image"),
                    )
                if key in runs or key in errors:
                    rows.append(row)
    ratios = []
    for case in cases:
        for w in workers:
            base = {r["rep"]: r["images_per_s"] for r in runs.get((case, "torch", "cpu", w), [])}
            for backend, device in variants(dali, cuda)[1:]:
                mine = {r["rep"]: r["images_per_s"] for r in runs.get((case, backend, device, w), [])}
                paired = [mine[k] / base[k] for k in sorted(mine) if k in base]
                if paired:
                    ratios.append(
                        dict(
                            case=case,
                            workers=w,
                            vs="torch/cpu",
                            backend=backend,
                            device=device,
                            ratio=round(statistics.median(paired), 2),
                            min=round(min(paired), 2),
                            max=round(max(paired), 2),
                            reps=len(paired),
                        )
                    )
    return rows, ratios


def _med(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 2)


def scaling(rows: list[dict]) -> list[dict]:
    """images/s at the most workers over images/s at the fewest, per case and backend (medians)."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        for be in dict.fromkeys((r["backend"], r["device"]) for r in rows if r["case"] == case):
            mine = sorted(
                (r["workers"], r["images_per_s"])
                for r in rows
                if (r["case"], r["backend"], r["device"]) == (case, *be) and r.get("images_per_s")
            )
            if len(mine) > 1:
                out.append(
                    dict(
                        case=case,
                        backend=be[0],
                        device=be[1],
                        workers=f"{mine[0][0]}->{mine[-1][0]}",
                        speedup=round(mine[-1][1] / mine[0][1], 2),
                    )
                )
    return out


def profile(case: str, root: Path, batch: int = 16, epochs: int = 2) -> dict:
    """Single-threaded CPU ms per image of each backend's stages, in this process (no workers, 1 torch thread).

    torch: ``worker`` (Pillow decode, crop, resize, flip, mask; collate) and ``consumer`` (the loader's finish:
    NCHW, colour jitter / lighting, normalisation). DALI: ``feed`` (the worker-side Python: file read, header,
    mask, parameters) and ``pipeline`` (DALI's operators with 1 thread, plus handing the batch over).
    Their sums are what the cores pay per image; ``ratio`` = torch total / DALI total is the most DALI can gain on
    the same cores when they are saturated. ``decode_only``: Pillow's and DALI's CPU decoder alone.
    """
    from data_pipes import build_loader
    from data_pipes.dali_backend import available as dali_available
    from data_pipes.feed import SampleFeed

    dataset, crop, recipe = CASES[case]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict = {"case": case}
    try:
        ld = build_loader(
            dataset,
            root,
            "train",
            batch_size=batch,
            train=True,
            crop_size=crop,
            backend="torch",
            device="cpu",
            workers=0,
            **recipe,
        )
        n = epochs * len(ld.index)
        raws = [r for e in range(epochs) for r in ld.backend.iterate(e, ld.planner, batch)]  # warm the cache
        c = time.process_time()
        raws = [r for e in range(epochs) for r in ld.backend.iterate(e, ld.planner, batch)]
        worker = time.process_time() - c
        c = time.process_time()
        for r in raws:
            ld.finish(r)
        consumer = time.process_time() - c
        out["torch"] = dict(
            worker=round(1e3 * worker / n, 2),
            consumer=round(1e3 * consumer / n, 2),
            total=round(1e3 * (worker + consumer) / n, 2),
        )
        if dali_available():
            ld = build_loader(
                dataset,
                root,
                "train",
                batch_size=batch,
                train=True,
                crop_size=crop,
                backend="dali",
                device="cpu",
                workers=1,
                **recipe,
            )
            ld.backend.py_workers = 0  # the feed in this process, so that process_time sees it
            list(ld)
            c = time.process_time()
            for _ in range(epochs):
                list(ld)
            total = time.process_time() - c
            ld.close()
            idx = ld.index
            feed = SampleFeed(
                [s.image for s in idx.samples],
                [s.target for s in idx.samples],
                idx.label_space,
                ld.recipe,
                0,
                ld.planner,
                batch,
            )
            c = time.process_time()
            for e in range(epochs):
                for k in range(len(idx)):
                    feed(_Info(e, k))
            fed = time.process_time() - c
            out["dali"] = dict(
                feed=round(1e3 * fed / n, 2),
                pipeline=round(1e3 * (total - fed) / n, 2),
                total=round(1e3 * total / n, 2),
            )
            out["ratio"] = round(out["torch"]["total"] / out["dali"]["total"], 2)
            out["decode_only"] = _decode_costs([s.image for s in idx.samples])
    finally:
        torch.set_num_threads(threads)
    return out


def _decode_costs(files: list[str]) -> dict:
    """CPU ms per image to decode the files to RGB: Pillow vs DALI's CPU decoder (1 thread), the common core."""
    from nvidia.dali import fn, pipeline_def, types
    from PIL import Image

    def pillow():
        for f in files:
            with Image.open(f) as im:
                im.convert("RGB")

    data = [np.fromfile(f, np.uint8) for f in files]

    @pipeline_def(batch_size=16, num_threads=1, device_id=None, exec_dynamic=True)
    def pipe():
        return fn.decoders.image(
            fn.external_source(source=lambda info: data[info.idx_in_epoch % len(data)], batch=False),
            output_type=types.RGB,
        )

    p = pipe()
    p.build()
    batches = -(-len(files) // 16)
    out = {}
    for name, run in (("pillow", pillow), ("dali", lambda: [p.run() for _ in range(batches)])):
        run()
        c = time.process_time()
        run()
        out[name] = round(1e3 * (time.process_time() - c) / (len(files) if name == "pillow" else 16 * batches), 2)
    from data_pipes.dali_backend import _close

    _close(p)
    return out


class _Info:
    """DALI's SampleInfo, for calling the feed outside DALI."""

    def __init__(self, epoch: int, k: int):
        self.epoch_idx, self.idx_in_epoch = epoch, k


def alignment(device: str, tmp: Path, backend: str = "dali") -> dict:
    """Labels against pixels through ``backend`` on ``device`` (``cuda``: DALI's mixed decode), on synthetic sets
    whose colours encode the classes: segmentation train (scale, crop, padding, flip) and classification val.

    Returns fractions: ``seg_agree`` (pixels whose nearest class colour is the label; > 0.9 expected),
    ``seg_mirrored`` (the same against the mirrored label: a misaligned pipeline scores about as high), ``cls_acc``
    (images whose mean colour is nearest their class's colour) and ``ok``.
    """
    from data_pipes import build_loader
    from data_pipes.labels import voc_palette
    from data_pipes.recipes import MEAN, STD
    from data_pipes.synthetic import cls_colour, write_synthetic

    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    voc = write_synthetic("voc", tmp / "align-voc", num_train=12, num_val=1, size=(48, 80), num_classes=5)
    colours = torch.tensor(voc_palette()[:21].astype(np.float32))
    colours[0] = 40  # the synthetic background colour
    ld = build_loader(
        "voc",
        voc,
        "train",
        batch_size=4,
        train=True,
        crop_size=48,
        origin_size=64,
        scale_rate_range=(0.5, 1.5),
        backend=backend,
        device=device,
        workers=1,
    )
    agree = mirrored = total = 0
    for b in ld:
        for img, y in zip(b["image"].float().cpu(), b["label"].cpu()):
            rgb = ((img * std + mean) * 255).permute(1, 2, 0)
            pred = ((rgb[..., None, :] - colours) ** 2).sum(-1).argmin(-1)
            valid = y != 255
            agree += (pred[valid] == y[valid]).sum().item()
            mirrored += (pred.flip(-1)[valid] == y[valid]).sum().item()
            total += valid.sum().item()
    ld.close()
    n_cls = 4
    ilsvrc = write_synthetic(
        "ilsvrc", tmp / "align-ilsvrc", num_train=n_cls, num_val=12, size=(48, 80), num_classes=n_cls
    )
    ld = build_loader(
        "ilsvrc", ilsvrc, "val", batch_size=4, train=False, crop_size=48, backend=backend, device=device, workers=1
    )
    cls_colours = torch.tensor(np.stack([cls_colour(c, n_cls) for c in range(n_cls)]))
    hits = count = 0
    for b in ld:
        rgb = (b["image"].float().cpu() * std + mean).mean((2, 3)) * 255
        pred = ((rgb[:, None] - cls_colours) ** 2).sum(-1).argmin(-1)
        hits += (pred == b["label"].cpu()).sum().item()
        count += len(pred)
    ld.close()
    seg, mir, cls = agree / max(1, total), mirrored / max(1, total), hits / max(1, count)
    return dict(
        backend=backend,
        device=device,
        seg_agree=round(seg, 4),
        seg_mirrored=round(mir, 4),
        cls_acc=round(cls, 4),
        ok=bool(seg > 0.9 and mir < seg - 0.15 and cls > 0.9),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.data_throughput", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1, 2],
        help="DALI threads (and feed processes) = DataLoader worker processes; several: scaling",
    )
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--images", type=int, default=256, help="images per epoch")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per timed run")
    ap.add_argument(
        "--main-threads",
        type=int,
        help="torch threads of the consuming process (default: the CPUs the workers leave free, at least 1)",
    )
    ap.add_argument("--no-profile", action="store_true", help="skip the single-threaded CPU profile per stage")
    ap.add_argument("--out", default="bench/results/data-cpu.json")
    a = ap.parse_args(argv)
    from bench._env import write_results
    from data_pipes.dali_backend import available as dali_available

    extra: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows, ratios = measure(
            a.cases,
            a.workers,
            reps=a.reps,
            images=a.images,
            batch=a.batch,
            epochs=a.epochs,
            tmp=Path(tmp),
            main_threads=a.main_threads,
        )
        if dali_available():  # labels against pixels: DALI's mixed decode on a GPU, its CPU operators elsewhere
            extra["alignment"] = alignment("cuda" if torch.cuda.is_available() else "cpu", Path(tmp))
        if not a.no_profile:
            extra["profile"] = [profile(case, Path(tmp) / CASES[case][0], batch=a.batch) for case in a.cases]
    for r in ratios + scaling(rows) + [extra.get("alignment")] + extra.get("profile", []):
        print(json.dumps(r))
    write_results(
        a.out,
        rows,
        ratios=ratios,
        scaling=scaling(rows),
        **extra,
        image_sides="375-500 px JPEG",
        method=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
