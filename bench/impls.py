"""The implementations the runner compares, each a way to train the same ResNet-38 (same parameters).

    eager          torch ops (BatchNorm2d, ReLU, cuDNN/oneDNN convs): what a user has without this library
    fused          ours: BN-ReLU recompute kernels with torch/cuDNN convolutions (``create_model(fused=True)``)
    fused_igemm    ours: BN-ReLU prologue inside Triton implicit-GEMM convolutions (``create_model(fused="triton",
                   conv_impl="triton")``)
    checkpoint     eager with ``torch.utils.checkpoint`` on each residual unit (``set_grad_checkpointing``)
    compile        ``torch.compile`` of the eager model
    fused_compile  ``torch.compile`` of the fused model (may fail: the failure is a result)
    fused_cudagraphs  ``torch.compile(mode="reduce-overhead")`` of the fused model: CUDA graphs (plain compile on CPU)
    eager_graphed  eager, the whole training step captured in one CUDA graph (``widedeep.train.graphs``, the
                   trainer's ``--cuda-graphs``): 3 warm-up steps on a side stream, capture, replay; CUDA only
    fused_graphed  the same for the fused model
    unit           fused with ``recompute="unit"`` (only each residual unit's input kept; the unit re-runs in backward)

The graphed rows step with SGD(fused=True) and a tensor lr (what ``--cuda-graphs`` uses, so that an lr schedule
reaches the captured step); the other rows with torch's default (foreach) SGD: the optimizer is ~1.5 of ~36 ms of
an A1-s8 b4 step (bench/results/h100-2026-11-25-profile).

``fused_igemm``: the model's ``conv_impl="triton"``: every BN-ReLU-conv call through
``kernels.bn_relu_conv(..., conv="triton")`` (stages with dropout keep torch convolutions, as ``bn_relu_conv``
requires), the segmentation head's conv6a included (results before 2026-12-05 patched the units only, the head
ran cuDNN). Without CUDA it runs in the Triton interpreter: a correctness smoke only, never a timing.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

IMPLS = (
    "eager",
    "fused",
    "fused_igemm",
    "checkpoint",
    "compile",
    "fused_compile",
    "fused_cudagraphs",
    "eager_graphed",
    "fused_graphed",
    "unit",
)
COMPILED = ("compile", "fused_compile", "fused_cudagraphs")
GRAPHED = ("eager_graphed", "fused_graphed")  # CUDA only: a whole-step torch.cuda.graph
CUDA_ONLY = {
    "eager_graphed": "a CUDA graph needs CUDA",
    "fused_graphed": "a CUDA graph needs CUDA",
    "fused_cudagraphs": "reduce-overhead = CUDA graphs: needs CUDA (on CPU it would be fused_compile again)",
}
LABELS = {"A1": "ilsvrc-cls_rna-a1_cls1000", "A1-s8": "voc_rna-a1_cls21_s8"}


def build(impl: str, label: str, *, width: float = 1.0, device: str = "cpu", bn: str = "batch"):
    """(model, fn): the nn.Module (parameters, optimizer) and the callable that runs its forward.

    ``bn``: "batch" (batch statistics) or "frozen" (running statistics in training: the seed's segmentation
    fine-tuning, ``freeze_bn_stats``)."""
    from widedeep.models import create_model

    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; one of {IMPLS}")
    if bn not in ("batch", "frozen"):
        raise ValueError(f"bn must be 'batch' or 'frozen', got {bn!r}")
    fused = {
        "fused": True,
        "fused_compile": True,
        "fused_cudagraphs": True,
        "fused_igemm": "triton",
        "fused_graphed": True,
        "unit": True,
    }.get(impl, False)
    model = create_model(
        label,
        fused=fused,
        width=width,
        recompute="unit" if impl == "unit" else None,
        conv_impl="triton" if impl == "fused_igemm" else "torch",
    )
    model = model.to(device).train()
    if bn == "frozen":
        model.freeze_bn_stats()
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.set_grad_checkpointing(impl == "checkpoint")
    if impl in COMPILED and device != "cuda":
        # Inductor turns CPU convolutions channels_last; oneDNN's convolution_backward then segfaults in the
        # compiled backward (torch 2.13 CPU, width-1/16 A1 at 224; the trainer's CPU channels_last guard is the same
        # crash). Keep NCHW, as the eager CPU runs do.
        import torch._inductor.config as inductor_config

        inductor_config.layout_optimization = False
    # fused_cudagraphs: CUDA graphs replay the whole step's launches (the fused path is launch-bound at small
    # batches: bench/results/h100-2026-11-25-profile); on CPU it is plain torch.compile
    mode = "reduce-overhead" if impl == "fused_cudagraphs" and device == "cuda" else None
    fn = torch.compile(model, mode=mode) if impl in COMPILED else model
    return model, fn


def inputs(model, batch: int, size, device: str):
    """A random image batch and targets: class indices, or a label map at the score map's resolution.
    ``size``: an int (square) or [H, W] (e.g. a full Cityscapes frame, [1024, 2048])."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, h, w, generator=g).to(device)
    if device == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    n = max(1, model.num_classes)
    if model.segmentation:
        s = model.output_stride
        y = torch.randint(0, n, (batch, -(-h // s), -(-w // s)), generator=g)
    else:
        y = torch.randint(0, n, (batch,), generator=g)
    return x, y.to(device)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.dim() == 4 and out.shape[-2:] != y.shape[-2:]:
        out = F.interpolate(out, size=y.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(out.float(), y)


def make_step(model, fn, x, y, device: str, impl: str = "eager"):
    """One training step (forward, loss, backward, SGD with momentum); bf16 autocast on CUDA, fp32 on CPU.

    Graphed impls: the step is a :class:`widedeep.train.graphs.GraphedStep`; its first ``warmup_calls`` calls are
    the warm-up and the capture (``step.warmup_calls``: the worker runs at least that many before timing)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if impl in GRAPHED:
        from widedeep.train import graphs

        if device != "cuda":
            raise RuntimeError(f"{impl}: {CUDA_ONLY[impl]}")
        graphs.prepare_optimizer(opt, torch.device(device))

        def forward_loss(x_, y_):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fn(x_)
            return loss_fn(out, y_), out.new_zeros(())

        graphed = graphs.GraphedStep(model, opt, forward_loss)

        def graphed_step():
            graphed(x, y)

        graphed_step.warmup_calls = graphed.warmup + 1  # warm-up steps, then the call that captures
        graphed_step.graphed = graphed
        return graphed_step

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            out = fn(x)
        loss_fn(out, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def saved_bytes(impl: str, model, fn, x) -> dict:
    """Saved-for-backward bytes of one training forward (``kernels.profiling.saved_tensor_bytes``).

    ``checkpoint``: non-reentrant checkpointing keeps each unit's input itself (not through autograd's
    saved-tensor hooks), so those inputs (each storage once) are added and reported separately.
    """
    from kernels.profiling import saved_tensor_bytes

    device = x.device.type
    unit_inputs: dict[int, int] = {}
    handles = []
    if impl == "checkpoint":

        def pre(_mod, args):
            s = args[0].untyped_storage()
            unit_inputs[s.data_ptr()] = s.nbytes()

        handles = [u.register_forward_pre_hook(pre) for u in model.units()]

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            return fn(x).float().sum()

    try:
        hooked = saved_tensor_bytes(forward, model.parameters())
    finally:
        for h in handles:
            h.remove()
    extra = sum(unit_inputs.values())
    row = dict(saved_bytes=hooked + extra)
    if impl == "checkpoint":
        row.update(saved_bytes_hooks=hooked, saved_bytes_checkpoint_inputs=extra)
    return row
