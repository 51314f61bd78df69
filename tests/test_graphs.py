"""--cuda-graphs (widedeep/train/graphs.py): the capture-safe step pieces on CPU, the captured step on a GPU.

CPU: the sync-free loss equals the trainer's, the tensor-lr optimizer equals plain SGD and checkpoints stay plain,
and a whole fused training step makes no host read (forbid_host_sync), which is what lets it be captured.
GPU (``-m gpu``): 3 warm-up + 3 captured steps equal 6 uncaptured ones (weights, running statistics, lr changes
included), and the trainer runs with --cuda-graphs end to end.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from widedeep.models import create_model
from widedeep.train import graphs
from widedeep.train.graphs import HostSyncError, forbid_host_sync, ohem_cross_entropy_static, step_loss
from widedeep.train.losses import ohem_cross_entropy
from widedeep.train.optim import make_optimizer, set_lr

ROOT = Path(__file__).resolve().parents[1]
TINY_S8 = dict(width=0.0625)


# ------------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("valid_frac", [0.0, 0.02, 0.5, 1.0])
def test_static_ohem_equals_ohem(valid_frac):
    """Values and gradients equal the seed's OHEM for no valid pixel, fewer than min_kept (all kept), and more."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 24, 24, generator=g) * 3
    target = torch.randint(0, 5, (2, 24, 24), generator=g)
    target[torch.rand(target.shape, generator=g) >= valid_frac] = 255
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ref = ohem_cross_entropy(a, target, min_kept=100)
    got = ohem_cross_entropy_static(b, target, min_kept=100)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)  # fp32 inside both: summation order only
    got.backward()
    if ref.grad_fn is None:  # losses.ohem_cross_entropy returns its 0 for "no valid pixel" without a graph
        assert valid_frac == 0.0 and not b.grad.any()
        return
    ref.backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("task,ohem", [("cls", True), ("seg", True), ("seg", False)])
def test_step_loss_equals_trainer_loss(task, ohem):
    """The capture-safe form (graphs.step_loss) equals the eager trainer's (losses.training_loss)."""
    from widedeep.train.losses import training_loss

    g = torch.Generator().manual_seed(2)
    if task == "cls":
        out, y = torch.randn(6, 10, generator=g), torch.randint(0, 10, (6,), generator=g)
    else:
        out, y = torch.randn(2, 5, 6, 6, generator=g), torch.randint(0, 5, (2, 48, 48), generator=g)
        y[:, :8] = 255
    ref_loss, ref_hits = training_loss(task, out, y, loss_resolution="feature", ohem=ohem)
    loss, hits = step_loss(task, out, y, ohem=ohem)
    torch.testing.assert_close(loss, ref_loss)
    assert hits.tolist() == ref_hits.tolist()


# ------------------------------------------------------------------------------------------------ optimizer
def test_tensor_lr_optimizer_equals_plain_sgd_and_saves_plain():
    torch.manual_seed(0)
    m1 = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    m2 = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    m2.load_state_dict(m1.state_dict())
    o1 = make_optimizer(m1, "seg", 0.1)
    o2 = graphs.prepare_optimizer(make_optimizer(m2, "seg", 0.1), torch.device("cpu"))
    lrs = [t for t in (g["lr"] for g in o2.param_groups)]
    assert all(isinstance(t, torch.Tensor) and t.dim() == 0 for t in lrs) and o2.param_groups[0]["fused"]
    x = torch.randn(2, 3, 8, 8)
    for step, lr in enumerate([0.1, 0.05, 0.02, 0.3]):  # changing lr: must reach the tensor-lr optimizer
        set_lr(o1, lr)
        set_lr(o2, lr)
        assert [g["lr"] for g in o2.param_groups] == lrs  # the same tensors, written in place
        assert o2.param_groups[1]["lr"].item() == pytest.approx(2 * lr)  # the seed's bias lr x2
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad(set_to_none=True)
            m(x + step).square().mean().backward()
            o.step()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p2, p1, rtol=1e-6, atol=1e-7)
    sd = o2.state_dict()
    assert all(isinstance(g["lr"], float) and g["fused"] is None for g in sd["param_groups"])
    assert isinstance(o2.param_groups[0]["lr"], torch.Tensor)  # the live optimizer keeps its tensors
    o3 = make_optimizer(m1, "seg", 0.1)
    o3.load_state_dict(sd)  # a --cuda-graphs checkpoint resumes without the flag
    assert o3.param_groups[1]["lr"] == pytest.approx(0.6)


# ------------------------------------------------------------------------------------------------ no host sync
def _seg_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss, hits = step_loss("seg", model(x), y)
    loss.backward()
    opt.step()
    return loss, hits


def test_forbid_host_sync_catches_reads():
    """The detector is not vacuous: every kind of host read the trainer used to make is caught."""
    t = torch.ones(3)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=torch.tensor(0.1), foreach=True)
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    cases = [
        lambda: t.sum().item(),
        lambda: bool(t.sum()),
        lambda: t.tolist(),
        lambda: int(t[0]),
        lambda: t[t > 0],
        lambda: torch.nonzero(t),
        lambda: t.cpu(),
        lambda: ohem_cross_entropy(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)),
        lambda: opt.step(),  # foreach SGD turns a tensor lr into a Python scalar (alpha=-lr)
        lambda: t * torch.tensor(2.0),
        lambda: t.masked_fill_(t > 0, 0.0).index_put_((t > 5,), t[:1] * 0),
    ]
    for case in cases:
        with pytest.raises(HostSyncError), forbid_host_sync():
            case()
    with forbid_host_sync():  # and what the graphed step does is allowed
        (t * 2).sum().add_(1)


@pytest.mark.parametrize("bn", ["batch", "frozen"])
def test_fused_training_step_makes_no_host_read(bn):
    """A whole fused A1-s8 training step (forward, OHEM loss, backward with recomputation, BN statistics and
    running-stat updates, tensor-lr SGD) reads nothing back to the host: the property CUDA-graph capture needs.

    The kernels run with backend="torch" here: the Triton interpreter executes a kernel's device code on the
    host with numpy, so it would trip the detector by construction (see the triton variant below)."""
    model = create_model("voc_rna-a1_cls21_s8", fused="torch", **TINY_S8).train()
    if bn == "frozen":
        model.freeze_bn_stats()
    opt = graphs.prepare_optimizer(make_optimizer(model, "seg", 0.01), torch.device("cpu"))
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 21, (2, 32, 32))
    y[:, :4] = 255
    _seg_step(model, opt, x, y)  # first step: momentum buffers (the graphed step's warm-up does the same)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_lr(opt, 0.02)
    with forbid_host_sync():
        loss, _ = _seg_step(model, opt, x, y)
    assert torch.isfinite(loss)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("conv1.weight") or "weight" in k for k in changed)  # the step did train
    if bn == "batch":
        assert any(k.endswith("running_mean") for k in changed)
    else:
        assert not any(k.endswith(("running_mean", "running_var")) for k in changed)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors need the Triton interpreter (no CUDA)")
def test_fused_training_step_triton_makes_no_host_read():
    """The same step with the Triton kernels (interpreted): host reads made *inside* Triton (the
    interpreter's numpy simulation of device code; on a GPU that code runs on the device and the launcher only
    passes pointers) are exempt; every read by our host code (bn_params, the launch set-up, the autograd
    Functions, the loss, the optimizer) is still caught. Batch statistics: the mode with the most kernels."""
    model = create_model("voc_rna-a1_cls21_s8", fused="triton", **TINY_S8).train()
    opt = graphs.prepare_optimizer(make_optimizer(model, "seg", 0.01), torch.device("cpu"))
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 21, (2, 16, 16))
    _seg_step(model, opt, x, y)
    nbt = model.units()[0].bn_branch2a.num_batches_tracked.clone()
    with forbid_host_sync(exclude_packages=("triton",)):
        loss, _ = _seg_step(model, opt, x, y)
    assert torch.isfinite(loss) and model.units()[0].bn_branch2a.num_batches_tracked == nbt + 1
    with pytest.raises(HostSyncError), forbid_host_sync(exclude_packages=("triton",)):
        loss.item()  # still armed outside the interpreter


class _FakeStream:
    def __init__(self, device=None):
        pass

    def wait_stream(self, other):
        pass


class _FakeGraph:
    """CPU stand-in for torch.cuda.CUDAGraph: "capture" runs the step eagerly (a real capture runs nothing and
    its first replay does the work, so the first replay here is skipped); later replays run the captured step
    again with grads reset to None first (a replayed backward writes its grads afresh, it never accumulates)."""

    owner = None

    def __init__(self):
        self.fresh = True

    def replay(self):
        if self.fresh:
            self.fresh = False
            return
        st = _FakeGraph.owner
        for g in st.opt.param_groups:
            for p in g["params"]:
                p.grad = None
        loss, extras = st._captured_step()
        st.static_out[0].copy_(loss.detach())  # the graph's outputs are static tensors, refilled in place
        st.static_out[1].copy_(extras)


def test_graphed_step_plumbing_on_cpu(monkeypatch):
    """GraphedStep's control flow with CPU stand-ins for streams and graphs: 3 warm-up steps then capture, the
    batch copied into the static buffers each step, the lr written in place reaching the step, a batch of another
    shape dropped untrained; 6 steps equal 6 plain eager steps (loss per step, weights, BN statistics). The real
    capture is the GPU test below; this catches plumbing errors without a GPU."""
    import contextlib

    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g, stream=None, **k: contextlib.nullcontext())

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(8, 5),
        )

    ref, cap = net(), net()
    opts = [graphs.prepare_optimizer(make_optimizer(m, "cls", 0.1), torch.device("cpu")) for m in (ref, cap)]

    def fl(model):
        return lambda x, y: step_loss("cls", model(x), y)

    step = graphs.GraphedStep(cap, opts[1], fl(cap), scaler=torch.amp.GradScaler("cpu", enabled=False))
    _FakeGraph.owner = step
    g = torch.Generator().manual_seed(4)
    for i in range(6):
        x, y = torch.randn(4, 3, 9, 9, generator=g), torch.randint(0, 5, (4,), generator=g)
        for o in opts:
            set_lr(o, 0.1 * (1 - i / 6))
        opts[0].zero_grad(set_to_none=True)
        loss_ref, hits_ref = fl(ref)(x, y)
        loss_ref.backward()
        opts[0].step()
        loss, hits = step(x, y)
        assert (step.graph is not None) == (i >= 3)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-7)
        assert hits.tolist() == hits_ref.tolist()
        if i == 4:  # a last partial batch: dropped, nothing trained
            before = [p.clone() for p in cap.parameters()]
            assert step(x[:3], y[:3]) is None and step.dropped == 1
            assert all(torch.equal(a, b) for a, b in zip(before, cap.parameters()))
    assert step.steps == 6
    for (k, a), b in zip(ref.state_dict().items(), cap.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")


_FAKE_TRAIN = """
import contextlib, sys, torch
import kernels
sys.path.insert(0, {tests!r})
import test_graphs as t
from widedeep.train import graphs
from widedeep.train.run import cli
torch.cuda.Stream, torch.cuda.CUDAGraph = t._FakeStream, t._FakeGraph
torch.cuda.stream = lambda s: contextlib.nullcontext()
torch.cuda.current_stream = lambda *a, **k: t._FakeStream()
torch.cuda.graph = lambda g, stream=None, **k: contextlib.nullcontext()
graphs.refuse = lambda *a, **k: None  # the CPU stands in for the GPU here
init = graphs.GraphedStep.__init__
def register(self, *a, **k):
    init(self, *a, **k)
    t._FakeGraph.owner = self
graphs.GraphedStep.__init__ = register
sys.exit(cli(sys.argv[1:]))
"""


def test_trainer_cuda_graphs_hook_on_cpu(tmp_path):
    """The trainer's --cuda-graphs path end to end with the CPU stand-ins (subprocess): warm-up, capture, replays,
    the last partial batch of each epoch dropped (18 images, batch 4), the poly lr schedule, evaluation, the
    checkpoint (plain optimizer state: it resumes without the flag)."""
    from data_pipes.synthetic import write_synthetic

    root = write_synthetic("voc", tmp_path / "voc", num_train=18, num_val=2, size=(48, 64), num_classes=5)
    out = tmp_path / "out"
    args = [
        "--data-root",
        str(root),
        "--output",
        str(out),
        "--model",
        "voc_rna-a1_cls21_s8",
        "--width",
        "0.0625",
        "--crop-size",
        "32",
        "--origin-size",
        "64",
        "--batch-images",
        "4",
        "--to-epoch",
        "2",
        "--lr-type",
        "poly",
        "--fused",
        "on",
        "--backend",
        "torch",
        "--prefetch-threads",
        "0",
        "--test-scales",
        "48",
        "--save-every",
        "0",
        "--log-interval",
        "1000",
        "--cuda-graphs",
    ]
    r = subprocess.run(
        [sys.executable, "-c", _FAKE_TRAIN.format(tests=str(ROOT / "tests")), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-4000:]
    assert "step captured after 3 warm-up steps" in text and "dropped (1 so far" in text, text[-3000:]
    run = out / "voc_rna-a1_cls21_s8"
    rows = (run / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and "miou" in rows[0], rows  # header + 2 epochs, evaluated
    from widedeep.train import checkpoint

    ck = checkpoint.load(run / "last.pt")
    assert all(isinstance(g["lr"], float) for g in ck["optimizer"]["param_groups"])
    assert ck["epoch"] == 2


def test_refusals():
    with pytest.raises(graphs.GraphRefused, match="needs a CUDA device"):
        graphs.refuse(torch.device("cpu"))
    dev = torch.device("cuda")
    if torch.cuda.is_available():
        with pytest.raises(graphs.GraphRefused, match="one process"):
            graphs.refuse(dev, world_size=2, dist_backend="nccl")
        with pytest.raises(graphs.GraphRefused, match="gloo"):
            graphs.refuse(dev, world_size=2, dist_backend="gloo")
        with pytest.raises(graphs.GraphRefused, match="pick one"):
            graphs.refuse(dev, compile_mode="default")


def test_trainer_refuses_cuda_graphs_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU test runs the flag instead")
    from data_pipes.synthetic import write_synthetic

    root = write_synthetic("voc", tmp_path / "voc", num_train=4, num_val=2, size=(48, 64), num_classes=5)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "widedeep.train",
            "--data-root",
            str(root),
            "--output",
            str(tmp_path),
            "--model",
            "voc_rna-a1_cls21_s8",
            "--width",
            "0.0625",
            "--crop-size",
            "48",
            "--backend",
            "torch",
            "--prefetch-threads",
            "0",
            "--cuda-graphs",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert "--cuda-graphs needs a CUDA device" in lines[0]


# ------------------------------------------------------------------------------------------------ GPU
def _pair(label, fused, bn, device):
    torch.manual_seed(0)
    kw = dict(fused=fused, **TINY_S8)
    if "s8" in label:
        kw["dropout"] = (0.0, 0.0)  # dropout's RNG stream differs between eager and replay by design
    a = create_model(label, **kw).to(device).to(memory_format=torch.channels_last).train()
    b = create_model(label, **kw).to(device).to(memory_format=torch.channels_last).train()
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        if bn == "frozen":
            m.freeze_bn_stats()
    return a, b


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bn", ["batch", "frozen"])
def test_captured_steps_equal_uncaptured(device, fused, bn, amp, monkeypatch):
    """3 warm-up + 3 replayed steps of the CUDA graph == 6 eager steps on the same 6 batches with the same
    changing lr: weights, BN running statistics and num_batches_tracked, and each step's loss."""
    if device != "cuda":
        pytest.skip("needs CUDA")
    if amp != "off" and (bn == "frozen" or not fused):
        pytest.skip("autocast: one configuration per dtype is enough")
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # same algorithms in both runs
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    label = "voc_rna-a1_cls21_s8"
    ref, cap = _pair(label, fused, bn, device)
    opts = [graphs.prepare_optimizer(make_optimizer(m, "seg", 0.01), torch.device(device)) for m in (ref, cap)]
    scalers = [torch.amp.GradScaler("cuda", enabled=amp == "fp16") for _ in range(2)]
    ac = dict(device_type="cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16, enabled=amp != "off")

    def make_fl(model):
        def fl(x, y):
            with torch.autocast(**ac):
                out = model(x)
            return step_loss("seg", out, y)

        return fl

    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(6):
        x = torch.randn(2, 3, 48, 48, generator=g).to(device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 21, (2, 48, 48), generator=g).to(device)
        batches.append((x, y))
    graphed = graphs.GraphedStep(cap, opts[1], make_fl(cap), scaler=scalers[1])
    fl_ref = make_fl(ref)
    tol = dict(rtol=1e-5, atol=1e-6) if amp == "off" else dict(rtol=1e-3, atol=1e-4)
    for i, (x, y) in enumerate(batches):
        lr = 0.01 * (1 - i / 8)
        set_lr(opts[0], lr)
        set_lr(opts[1], lr)
        opts[0].zero_grad(set_to_none=True)
        loss_ref, _ = fl_ref(x, y)
        scalers[0].scale(loss_ref).backward()
        scalers[0].step(opts[0])
        scalers[0].update()
        loss_cap, _ = graphed(x, y)
        torch.testing.assert_close(loss_cap, loss_ref, **tol)
    assert graphed.graph is not None and graphed.steps == 6
    torch.cuda.synchronize()
    sr, sc = ref.state_dict(), cap.state_dict()
    for k in sr:
        if sr[k].is_floating_point():
            torch.testing.assert_close(sc[k], sr[k], **tol, msg=lambda m: f"{k}: {m}")
        else:
            assert torch.equal(sc[k], sr[k]), k
    assert sc[[k for k in sc if k.endswith("num_batches_tracked")][0]].item() == (6 if bn == "batch" else 0)


@pytest.mark.gpu
def test_trainer_cuda_graphs_end_to_end(device, tmp_path):
    """python -m widedeep.train --cuda-graphs on synthetic VOC: trains (warm-up, capture, replays, a dropped
    partial last batch), evaluates eagerly, writes its summary."""
    if device != "cuda":
        pytest.skip("needs CUDA")
    from data_pipes.synthetic import write_synthetic

    root = write_synthetic("voc", tmp_path / "voc", num_train=18, num_val=2, size=(48, 64), num_classes=5)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "widedeep.train",
            "--data-root",
            str(root),
            "--output",
            str(tmp_path / "out"),
            "--model",
            "voc_rna-a1_cls21_s8",
            "--width",
            "0.0625",
            "--crop-size",
            "48",
            "--batch-images",
            "4",
            "--to-epoch",
            "2",
            "--lr-type",
            "poly",
            "--backend",
            "torch",
            "--prefetch-threads",
            "0",
            "--amp",
            "bf16",
            "--cuda-graphs",
            "--test-scales",
            "64",
            "--save-every",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr[-4000:]
    text = r.stdout + r.stderr
    assert "step captured after 3 warm-up steps" in text and "dropped" in text, text[-3000:]
    assert (tmp_path / "out" / "voc_rna-a1_cls21_s8" / "summary.csv").is_file()
