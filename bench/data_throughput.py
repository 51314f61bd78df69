"""Data pipeline throughput: images/s of DALI vs the torch/Pillow backend on the same cores.

Synthetic ImageNet-sized JPEGs (375-500 px sides) in the ILSVRC and VOC layouts; classification train
(random-resized crop 224 + colour + lighting + flip) and segmentation train (scale jitter, crop 504, flip).
On a GPU machine DALI also runs with ``mixed`` (nvJPEG) decode. Usage::

    python -m bench.data_throughput [--workers 2] [--images 96] [--out bench/results/data-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench._env import write_results
from data_pipes import build_loader
from data_pipes.dali_backend import available as dali_available
from data_pipes.synthetic import write_synthetic

CASES = {"cls-train": ("ilsvrc", 224, {}), "seg-train": ("voc", 504, {"origin_size": 500})}


def throughput(dataset: str, root: Path, crop: int, backend: str, device: str, workers: int, batch: int,
               epochs: int, recipe: dict) -> float:
    ld = build_loader(dataset, root, "train", batch_size=batch, train=True, crop_size=crop, backend=backend,
                      device=device, workers=workers, **recipe)
    for _ in ld:  # warm-up epoch (pipeline build, worker start, page cache)
        pass
    n, t = 0, time.perf_counter()
    for _ in range(epochs):
        for b in ld:
            n += len(b["index"])
    if device == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.data_throughput", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="DALI threads = DataLoader worker processes")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default="bench/results/data-cpu.json")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, (dataset, crop, recipe) in CASES.items():
            root = write_synthetic(dataset, Path(tmp) / dataset, num_train=a.images, num_val=1, size=(375, 500))
            variants = [("torch", "cpu")] + ([("dali", "cpu")] if dali_available() else [])
            if torch.cuda.is_available() and dali_available():
                variants.append(("dali", "cuda"))
            for backend, device in variants:
                ips = throughput(dataset, root, crop, backend, device, a.workers, a.batch, a.epochs, recipe)
                rows.append(dict(case=case, backend=backend, device=device, workers=a.workers, batch=a.batch,
                                 crop=crop, images_per_s=round(ips, 1)))
                print(json.dumps(rows[-1]), flush=True)
    write_results(a.out, rows, images=a.images, image_sides="375-500 px JPEG")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
