"""DALI backend (issue 15): the parallel feed, bad samples without double decoding, the GPU graph checked without a
GPU, the alignment check of the bench campaign, and the trainer's data-wait fraction. Real DALI, CPU only."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ImageFile

from data_pipes import BadSampleError, build_loader, discover
from data_pipes.dali_backend import available as dali_available

pytestmark = pytest.mark.skipif(not dali_available(), reason="DALI not installed")
ROOT = Path(__file__).resolve().parents[1]


def _children() -> set[int]:
    """Live child processes of this process (Linux /proc)."""
    me, kids = os.getpid(), set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                    kids.add(int(pid))
        except OSError:
            continue
    return kids


def _dali(ds, root, split="train", py_workers=None, **kw):
    kw.setdefault("batch_size", 3)
    kw.setdefault("train", split != "val")
    if kw["train"]:
        kw.setdefault("crop_size", 40)
    ld = build_loader(ds, root, split, backend="dali", device="cpu", workers=kw.pop("workers", 1), **kw)
    if py_workers is not None:
        ld.backend.py_workers = py_workers
    return ld


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"])
        assert torch.equal(x["label"], y["label"])


def test_feed_runs_in_worker_processes_and_the_data_do_not_depend_on_them(synthetic_root):
    """Python reads files, masks and parameters in DALI's worker processes; 0, 1 or 2 of them give the same
    batches, in the torch backend's order (the order is a function of (seed, epoch) only)."""
    root = synthetic_root("voc")
    before = _children()
    ld = _dali("voc", root, py_workers=2, workers=2, seed=5)
    two = list(ld)
    assert len(_children() - before) == 2  # the feed processes, alive while the pipeline prefetches epoch 1
    two += list(ld)
    ld.close()
    assert not _children() - before  # closed, not left to the garbage collector
    ld = _dali("voc", root, py_workers=0, seed=5)
    _same(two, list(ld) + list(ld))
    torch_order = build_loader(
        "voc", root, "train", batch_size=3, train=True, crop_size=40, backend="torch", workers=0, seed=5
    )
    assert [b["index"].tolist() for b in torch_order] == [b["index"].tolist() for b in two[: len(torch_order)]]


def test_spawned_workers_get_the_feed_pickled(synthetic_root):
    """With CUDA initialised the workers must be spawned (fork is unsafe): the feed is pickled and gives the same
    data as forked workers. Forced here on CPU."""
    root = synthetic_root("ilsvrc")
    fork = _dali("ilsvrc", root, seed=1)
    assert fork.backend.start_method() == "fork"
    spawn = _dali("ilsvrc", root, seed=1)
    spawn.backend.start_method = lambda: "spawn"
    _same(list(fork), list(spawn))
    spawn.close()


def test_skip_bad_never_decodes_twice(synthetic_root, tmp_path):
    """Clean data: Python decodes no image (DALI does), each mask once. A truncated JPEG (no end-of-image marker)
    is refused by the feed before any decode. A JPEG DALI cannot decode (its scans cut off, the EOI kept): its
    batch fails in DALI, only then Pillow finds the culprit (once: the next epoch remembers it); every other
    sample is delivered."""
    import shutil

    root = Path(shutil.copytree(synthetic_root("voc"), tmp_path / "voc"))
    decoded: list[str] = []
    load = ImageFile.ImageFile.load

    def counting_load(self):
        # not decoded yet (a second load() call on a decoded image does nothing); a file with no scan has no tile
        if self.tile or getattr(self, "_im", None) is None:
            decoded.append(Path(self.filename).name)
        return load(self)

    ImageFile.ImageFile.load = counting_load  # py_workers=0: the feed runs here, so every decode is seen
    try:
        ld = _dali("voc", root, py_workers=0, skip_bad=True)
        assert sum(len(b["index"]) for b in ld) == 10
        assert not [f for f in decoded if f.endswith(".jpg")] and len(decoded) == 10  # the masks, once each
        bad = discover("voc", root, "train").samples[4].image
        data = Path(bad).read_bytes()
        Path(bad).write_bytes(data[: len(data) // 3])  # truncated: refused from its bytes, never decoded
        decoded.clear()
        ld = _dali("voc", root, py_workers=0, skip_bad=True)
        for _ in range(2):
            got = sorted(int(i) for b in ld for i in b["index"])
            assert got == [i for i in range(10) if i != 4]
        assert ld.skipped == 2 and decoded.count(Path(bad).name) == 0
        Path(bad).write_bytes(data[: data.rfind(b"\xff\xda")] + b"\xff\xd9")  # headers, no scan, an EOI
        decoded.clear()
        ld = _dali("voc", root, py_workers=0, skip_bad=True)
        for _ in range(2):
            got = sorted(int(i) for b in ld for i in b["index"])
            assert got == [i for i in range(10) if i != 4]
        assert ld.skipped == 2  # once per epoch
        assert decoded.count(Path(bad).name) == 1
    finally:
        ImageFile.ImageFile.load = load
    with pytest.raises(BadSampleError, match=re.escape(Path(bad).name) + ": cannot decode image"):
        list(_dali("voc", root))  # without skip_bad: one error naming the file


RECIPES = [
    ("ilsvrc", "train", {}),
    ("ilsvrc", "val", {"crop_size": 32, "crops": 3}),
    ("voc", "train", {}),
    ("voc", "val", {"scale": 64}),
]


@pytest.mark.parametrize("ds,split,kw", RECIPES, ids=[f"{d}-{s}" for d, s, _ in RECIPES])
def test_gpu_pipeline_graph_is_valid_without_a_gpu(synthetic_root, ds, split, kw):
    """device='cuda' chooses DALI's mixed decode; its graph passes DALI's own checks (serialisation, kernels
    registered for each placement, schema metadata inference) and meets the output contract. The CPU twin (same
    graph, CPU placement) runs, and what it returns matches what the checker inferred for it."""
    from data_pipes.dali_backend import contract

    root = synthetic_root(ds)
    gpu = build_loader(
        ds, root, split, batch_size=2, train=split == "train", device="cuda", backend="dali", workers=1, **kw
    )
    assert gpu.backend.device == "gpu" and gpu.backend.start_method() == "spawn"
    report = gpu.backend.check_graph(gpu.planner)
    assert report["problems"] == []
    placed = {schema: dev for _, schema, dev in report["ops"]}
    decoders = [s for s in placed if s.startswith("decoders__")]
    assert decoders and all(placed[s] == "mixed" for s in decoders)
    assert all(dev in ("gpu", "mixed") for _, schema, dev in report["ops"] if schema != "ExternalSource")
    want = contract(gpu.recipe, gpu=True)
    if split == "train" and ds == "ilsvrc":  # colour jitter, lighting and normalisation follow in torch
        assert want["image"] == ("gpu", "UINT8", 3, "HWC") and "photometric" in want
    else:
        assert want["image"][:3] == ("gpu", "FLOAT", 4 if kw.get("crops") else 3)

    cpu = _dali(ds, root, split, batch_size=2, **kw)
    twin = cpu.backend.check_graph(cpu.planner)
    assert twin["problems"] == [] and [s for _, s, _ in twin["ops"]] == [s for _, s, _ in report["ops"]]
    pipe = cpu.backend.pipeline(cpu.planner)
    outs = pipe.run()
    for name, tl, (_dev, ndim, dtype, layout) in zip(contract(cpu.recipe, gpu=False), outs, twin["outputs"]):
        assert (tl.dtype.name, len(tl[0].shape()), tl.layout()) == (dtype, ndim, layout), name
    from data_pipes.dali_backend import _close

    _close(pipe)


def test_graph_check_catches_what_only_a_gpu_build_would(synthetic_root):
    """An operator without a GPU kernel, and a feed output of the wrong dimensionality, pass DALI's
    serialisation on CPU; the checker reports both."""
    from nvidia.dali import fn, pipeline_def, types

    from data_pipes.dali_backend import check_graph

    def src(info):
        return np.zeros(4, np.uint8), np.zeros((4, 4), np.uint8)

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def bad():
        enc, mask = fn.external_source(source=src, num_outputs=2, batch=False)
        shape = fn.peek_image_shape(enc.gpu())  # a CPU-only operator placed on the GPU
        return shape, fn.resize(mask.gpu(), size=[8, 8], interp_type=types.INTERP_NN)

    pipe = bad()
    pipe.serialize()
    sources = [op.spec.OutputName(0) for op in pipe._ops if op._op.schema.Name() == "ExternalSource"]
    pipe.feed_metadata = {s: (2, "UINT8", "") for s in sources}  # a mask without its channel axis
    problems = check_graph(pipe)["problems"]
    assert any("PeekImageShape has no gpu implementation" in p for p in problems), problems
    assert any("Resize" in p for p in problems), problems


def test_bench_alignment_check_runs_on_cpu(tmp_path):
    """The label/pixel alignment the GPU campaign runs on DALI's mixed decode, here on DALI's CPU operators."""
    from bench.data_throughput import alignment

    r = alignment("cpu", tmp_path)
    assert r["ok"] and r["seg_agree"] > 0.9 and r["cls_acc"] > 0.9, r


def test_trainer_logs_the_data_wait_fraction(tmp_path):
    """The log line and summary.csv say which share of the step time went to waiting for data (DALI feed)."""
    from data_pipes.synthetic import write_synthetic

    voc = write_synthetic("voc", tmp_path / "voc", num_train=8, num_val=2, size=(48, 64), num_classes=3)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "widedeep.train",
            "--data-root",
            str(voc),
            "--output",
            str(tmp_path / "out"),
            "--model",
            "voc_rna-a1_cls21_s8",
            "--width",
            "0.0625",
            "--crop-size",
            "48",
            "--origin-size",
            "64",
            "--bn-stats",
            "batch",
            "--backend",
            "dali",
            "--prefetch-threads",
            "1",
            "--batch-images",
            "4",
            "--to-epoch",
            "1",
            "--no-eval",
            "--log-interval",
            "1",
            "--save-every",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    waits = [float(x) for x in re.findall(r"data-wait (\d\.\d\d)", r.stdout)]
    assert len(waits) == 2 and all(0 <= w <= 1 for w in waits), r.stdout[-2000:]
    with open(tmp_path / "out" / "voc_rna-a1_cls21_s8" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert 0 <= float(rows[0]["data_wait_frac"]) <= 1
