"""Training and evaluation loops for ``python -m widedeep.train``, in the shape of torchvision's reference
``train.py``: :func:`train` = :func:`setup`, then per epoch :func:`train_one_epoch`, :func:`evaluate` when due and
:func:`end_epoch`. Everything reads the typed :class:`~widedeep.train.cli.TrainConfig` (``ctx.cfg``), whose task
defaults are resolved in ``cli.config``; the run's moving parts and position live in a :class:`TrainState`."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from data_pipes import LABEL_SPACES, build_loader
from widedeep.fileio import atomic_open, remove_stale_temporaries
from widedeep.models import create_model, parse_label
from widedeep.models.registry import ModelLabel
from widedeep.models.resnet38 import ResNet38

from . import checkpoint, distributed
from .cityscapes_metrics import CityscapesScores
from .cli import TrainConfig
from .evaluate import STRIDE, canvas_for, classify, nan_to_none, segment
from .logs import Summary
from .losses import training_loss
from .memory_format import use_channels_last
from .metrics import ConfusionMatrix, TopK
from .optim import learning_rate, make_optimizer, set_lr

log = logging.getLogger("widedeep.train")
DATASET_OF_LABEL = {"ilsvrc-cls": "ilsvrc", "voc": "voc", "cityscapes": "cityscapes", "ade20k": "ade20k"}


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss, bad flags); the message says what to do."""


@dataclass
class Context:
    """One process's view of a run: its config, device and rank."""

    cfg: TrainConfig
    device: torch.device
    dist: distributed.DistInfo
    channels_last: bool = False  # decided by build_model (see memory_format)

    @property
    def label(self) -> str:
        return self.cfg.label

    @property
    def dataset(self) -> str:
        return self.cfg.dataset

    @property
    def task(self) -> str:  # "cls" | "seg"
        return self.cfg.task

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def is_main(self) -> bool:
        return self.dist.is_main


def resolve(args) -> tuple[str, str, str]:
    """(label, dataset, task) from --model or the --weights file name, as the seed does."""
    name = args.model or (Path(args.weights).name if args.weights else None)
    if name is None:
        raise TrainingError("give --model <label> (e.g. voc_rna-a1_cls21_s8) or --weights <label>_ep-NNNN.params")
    lab = parse_label(name)
    if lab.dataset not in DATASET_OF_LABEL:
        raise TrainingError(
            f"--model {name}: no data pipeline for dataset {lab.dataset!r}; supported: {', '.join(DATASET_OF_LABEL)}"
        )
    return lab.label, DATASET_OF_LABEL[lab.dataset], "seg" if lab.task == "segmentation" else "cls"


def model_options(a: TrainConfig) -> dict:
    """create_model keywords from --activation, --activation-param, --bn-eps, --dilate-first-conv (only those given:
    the model's defaults stay the label's); bad values are one-line errors."""
    opts: dict = {}
    if a.activation:
        opts["activation"] = a.activation
    if a.activation_param is not None:
        if not (math.isfinite(a.activation_param) and a.activation_param >= 0):
            raise TrainingError(f"--activation-param {a.activation_param}: expected a finite slope >= 0")
        if opts.get("activation") != "leaky_relu":
            raise TrainingError("--activation-param is the leaky ReLU slope: add --activation leaky_relu")
        opts["activation_param"] = a.activation_param
    if a.bn_eps is not None:
        if not (math.isfinite(a.bn_eps) and a.bn_eps > 0):
            raise TrainingError(f"--bn-eps {a.bn_eps}: expected a positive number (1e-5, 1.001e-5)")
        opts["bn_eps"] = a.bn_eps
    if a.dilate_first_conv:
        opts["dilate_first_conv"] = True
    return opts


def build_model(ctx: Context) -> ResNet38:
    a = ctx.cfg
    fused = (
        {"on": True, "off": False, "auto": ctx.device.type == "cuda"}[a.fused]
        or a.backward_do_mirror
        or a.recompute == "unit"
    )  # the unit re-run runs on the fused kernels
    wf, strict = None, a.phase == "val"
    if a.weights and not a.resume:
        from widedeep.weights import read_weights

        # md5 checks are for released files: a mismatch (e.g. our own <label>_ep-NNNN exports) warns and loads
        wf = read_weights(a.weights, verify=not a.no_verify_weights, weights_convention=a.weights_convention)
    from widedeep.weights import WeightsMismatchError

    try:  # training drops a classifier of another size (fine-tuning); evaluation needs the file to fit exactly
        model = create_model(
            ctx.label,
            weights=wf,
            weights_strict=strict,
            pool_style=a.pool_top_infer_style,
            num_classes=None if strict else parse_label(ctx.label).num_classes,
            width=a.width,
            fused=bool(fused),
            recompute="unit" if a.recompute == "unit" else None,
            **model_options(a),
        )
    except WeightsMismatchError as e:
        raise TrainingError(_cli_mismatch_hint(e, ctx)) from None
    if a.bn_stats == "frozen":
        model.freeze_bn_stats()
    elif a.bn_stats == "sync" and ctx.dist.enabled:
        if fused:
            model.set_sync_bn()
        elif ctx.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            raise TrainingError("--bn-stats sync on CPU needs --fused on (torch's SyncBatchNorm is GPU-only)")
    model.to(ctx.device)
    ctx.channels_last = use_channels_last(model, ctx.device, a.channels_last, training=a.phase == "train")
    if ctx.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _compiled(net: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """torch.compile(net) for training; the fused kernels enter the graph as custom ops (kernels/ops.py)."""
    log.info("torch.compile mode %s (the first steps compile)", mode)
    if device.type == "cpu":
        # Inductor would make CPU convolutions channels_last, whose oneDNN backward segfaults on some AVX-512
        # CPUs with narrow strided convs (widedeep/train/memory_format.py): off for this model only.
        # reduce-overhead means CUDA graphs: nothing to do on a CPU.
        options = {"layout_optimization": False, **({"max_autotune": True} if mode == "max-autotune" else {})}
        return torch.compile(net, options=options)
    return torch.compile(net, mode=None if mode == "default" else mode)


def _graphed_step(ctx: Context, net: nn.Module, opt, scaler):
    """--cuda-graphs: the training step as a CUDA graph (graphs.py), or a one-line refusal."""
    from . import graphs

    a = ctx.cfg
    backend = torch.distributed.get_backend() if ctx.dist.enabled else None
    try:
        graphs.refuse(ctx.device, world_size=ctx.dist.world_size, compile_mode=a.compile, dist_backend=backend)
        graphs.prepare_optimizer(opt, ctx.device)
    except graphs.GraphRefused as e:
        raise TrainingError(str(e)) from None

    def forward_loss(x, y):
        with _autocast(ctx):
            out = net(x)
        return graphs.step_loss(ctx.task, out, y, loss_resolution=a.loss_resolution, ohem=not a.no_ohem, stride=STRIDE)

    return graphs.GraphedStep(net, opt, forward_loss, scaler=scaler)


def _cli_mismatch_hint(e, ctx: Context) -> str:
    """The weights mismatch in command-line terms (flags, not Python arguments)."""
    a, lab = ctx.cfg, parse_label(ctx.label)
    if e.width_ratio:
        return (
            f"--weights {e.path}: the file is a width-{e.file_width:g} net, the model width "
            f"{e.model_width:g}: add --width {e.file_width:g}"
        )
    if e.file_classes and e.model_classes is not None and e.file_classes != e.model_classes and len(e.mis_shaped) <= 4:
        fix = ModelLabel(lab.dataset, lab.variant, e.file_classes, lab.output_stride, lab.extra).label
        return (
            f"--weights {e.path}: the file's classifier has {e.file_classes} classes, --model {ctx.label} has "
            f"{e.model_classes}: use --model {fix}" + (" (or --phase train to fine-tune)" if a.phase == "val" else "")
        )
    return str(e)  # its hints name the command-line flags too


def _progress(ctx: Context, total: int, initial: int, desc: str):
    """A tqdm bar on rank 0 of an interactive terminal; silent on non-TTY (logs, CI) and other ranks."""
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, leave=False, mininterval=2, disable=None if ctx.is_main else True
    )


def _autocast(ctx: Context):
    a = ctx.cfg.amp
    if a == "off":
        return contextlib.nullcontext()
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16 if a == "bf16" else torch.float16)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except Exception:
        return math.nan


# ------------------------------------------------------------------------------------------------ training
class EpochStats:
    """Running loss/accuracy sums of one epoch; saved in mid-epoch checkpoints so a resumed epoch merges."""

    def __init__(self, loss_sum: float = 0.0, steps: int = 0, hits: float = 0.0, counted: float = 0.0):
        self.loss_sum, self.steps, self.hits, self.counted = loss_sum, steps, hits, counted
        self.seen_here = 0  # images since this process started the epoch (for images/s)

    @classmethod
    def restore(cls, state: dict | None) -> "EpochStats":
        return cls(**state) if state else cls()

    def state(self) -> dict:
        return {"loss_sum": self.loss_sum, "steps": self.steps, "hits": self.hits, "counted": self.counted}

    def add(self, loss: float, hits: torch.Tensor, n: int) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.hits += float(hits[0])
        self.counted += float(hits[1])
        self.seen_here += n

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.steps)

    @property
    def acc(self) -> float:
        return self.hits / max(1.0, self.counted)


@dataclass
class TrainState:
    """A training run's moving parts and position. :meth:`save` writes it to ``last.pt`` (the fields a resume
    reads back in :func:`_restore`); the loop functions read and advance it."""

    model: nn.Module  # the ResNet38: what is saved, exported and evaluated
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: Any  # data_pipes Loader of this rank's shard
    iters: int  # steps per epoch
    total: int  # steps of the whole schedule (--to-epoch), for the lr
    start_epoch: int  # the first epoch this process trains (--from-epoch or the checkpoint's)
    start_step: int = 0  # its first step (a checkpoint written mid-epoch)
    partial: dict | None = None  # that epoch's running sums from the checkpoint
    global_step: int = 0
    best: float | None = None  # the best validation score so far (err1: lower, miou: higher)
    net: nn.Module | None = None  # what trains: model, DDP-wrapped and/or compiled
    graphed: Any = None  # graphs.GraphedStep with --cuda-graphs
    summary: Summary | None = None  # summary.csv (rank 0)
    stats: EpochStats = field(default_factory=EpochStats)  # the epoch in progress
    saved: dict = field(default_factory=dict)  # the newest checkpoint (path, epoch, step), for Ctrl-C's hint
    metrics: dict = field(default_factory=dict)  # the last evaluation

    def save(self, ctx: Context, epoch: int, step_in_epoch: int, name: str = "last.pt") -> None:
        """Checkpoint at ``step_in_epoch`` of ``epoch`` (0 = its start): every rank's RNG state, rank 0 writes."""
        rngs = [checkpoint.rng_state()]
        if ctx.dist.enabled:
            gathered = [None] * ctx.dist.world_size
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if ctx.is_main:
            checkpoint.save(
                ctx.run_dir / name,
                {
                    "model": self.model.state_dict(),
                    "optimizer": self.opt.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "epoch": epoch,
                    "step_in_epoch": step_in_epoch,
                    "global_step": self.global_step,
                    "best": self.best,
                    "rng": rngs if ctx.dist.enabled else rngs[0],
                    "args": ctx.cfg.flags,
                    "label": ctx.label,
                    "epoch_stats": self.stats.state() if step_in_epoch else None,
                },
            )
            self.saved = {"path": ctx.run_dir / name, "epoch": epoch, "step": step_in_epoch}


def train(ctx: Context) -> dict:
    """Train from --from-epoch (or the --resume checkpoint) to --stop-epoch: the last evaluation's metrics, or
    ``{"stopped_at": step}`` after --stop-after-steps. Ctrl-C / SIGTERM log where the last checkpoint is."""
    st = setup(ctx)
    try:
        for epoch in range(st.start_epoch, ctx.cfg.stop_epoch):
            row = train_one_epoch(ctx, st, epoch)
            if row is None:
                return {"stopped_at": st.global_step}
            evaluated = None
            if _eval_due(ctx.cfg, epoch):
                evaluated = st.metrics = evaluate(ctx, st.model, split="val", save=False)
            end_epoch(ctx, st, epoch, row, evaluated)
    except KeyboardInterrupt as e:
        if ctx.is_main:
            log.warning(
                "%s. %s",
                "terminated (SIGTERM)" if isinstance(e, checkpoint.Terminated) else "interrupted",
                _resume_hint(st.saved, ctx),
            )
        raise
    return st.metrics


def setup(ctx: Context) -> TrainState:
    """Loader, model, optimizer, the resumed position, the training wrappers, the summary, in this order (the
    random draws of model init and resume, and so a resumed run's bits, depend on it)."""
    cfg, world = ctx.cfg, ctx.dist.world_size
    if cfg.batch_images % world:
        raise TrainingError(f"--batch-images {cfg.batch_images} (global) must be divisible by the {world} processes")
    loader = _train_loader(ctx, cfg.batch_images // world)
    iters = len(loader)
    if ctx.is_main:  # temporaries of a run killed while saving (.last.pt.tmp-<host>-<pid>); live writers are kept
        for folder in (ctx.run_dir, Path(cfg.output)):
            remove_stale_temporaries(folder)
    model = build_model(ctx)
    if cfg.no_dropout:
        _no_dropout(model)
    opt = make_optimizer(model, ctx.task, cfg.base_lr, cfg.weight_decay)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.amp == "fp16")
    st = TrainState(
        model=model,
        opt=opt,
        scaler=scaler,
        loader=loader,
        iters=iters,
        total=cfg.to_epoch * iters,
        start_epoch=cfg.from_epoch,
    )
    if cfg.resume_path is not None:
        _restore(ctx, st, cfg.resume_path)
    st.net = _training_net(ctx, model)
    st.graphed = _graphed_step(ctx, st.net, opt, scaler) if cfg.cuda_graphs else None
    st.summary = (
        Summary(
            ctx.run_dir / "summary.csv", ctx.run_dir / "tb" if cfg.tensorboard else None, keep_through=st.start_epoch
        )
        if ctx.is_main
        else None
    )
    log.info(
        "%s on %s: %d process(es), batch %d per process = %d global, %d iterations/epoch, epochs %d..%d of %d, "
        "lr %s %.4g",
        ctx.label,
        ctx.dataset,
        world,
        cfg.batch_images // world,
        cfg.batch_images,
        iters,
        st.start_epoch + 1,
        cfg.stop_epoch,
        cfg.to_epoch,
        cfg.lr_type,
        cfg.base_lr,
    )
    st.global_step = st.start_epoch * iters + st.start_step
    st.saved = {"path": cfg.resume_path, "epoch": st.start_epoch, "step": st.start_step}
    return st


def _train_loader(ctx: Context, per_rank: int):
    cfg = ctx.cfg
    recipe = {}
    if ctx.task == "seg":
        recipe["scale_rate_range"] = tuple(cfg.scale_rate_range)
        if cfg.origin_size:
            recipe["origin_size"] = cfg.origin_size
    return build_loader(
        ctx.dataset,
        cfg.data_root,
        cfg.split,
        batch_size=per_rank,
        train=True,
        crop_size=cfg.crop_size,
        device=ctx.device,
        backend=cfg.backend,
        shard_id=ctx.dist.rank,
        num_shards=ctx.dist.world_size,
        seed=cfg.seed,
        workers=cfg.prefetch_threads,
        skip_bad=cfg.skip_bad,
        val_list=cfg.val_list,
        **recipe,
    )


def _restore(ctx: Context, st: TrainState, path: Path) -> None:
    """Model, optimizer, loss scale, position, best score and this rank's RNG state from checkpoint ``path``."""
    ck = checkpoint.load(path)
    checkpoint.load_model(st.model, ck, path, label=ctx.label, width=ctx.cfg.width)
    st.opt.load_state_dict(ck["optimizer"])
    _load_scaler(st.scaler, ck, ctx.cfg.amp)
    st.start_epoch, st.start_step, st.best = ck["epoch"], ck["step_in_epoch"], ck.get("best")
    st.partial = ck.get("epoch_stats") if st.start_step else None
    checkpoint.set_rng_state(ck["rng"][ctx.dist.rank] if isinstance(ck["rng"], list) else ck["rng"])
    log.info("resumed %s at epoch %d step %d", path, st.start_epoch + 1, st.start_step)


def _training_net(ctx: Context, model: nn.Module) -> nn.Module:
    """The module that trains: ``model`` in DDP over several processes, then torch.compile'd with --compile."""
    net = model
    if ctx.dist.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    if ctx.cfg.compile != "off":
        net = _compiled(net, ctx.cfg.compile, ctx.device)
    return net


class _EpochClock:
    """An epoch's wall time and the part of it this process sat waiting for the loader."""

    def __init__(self):
        self.t0 = self.asked = time.perf_counter()
        self.data_time = 0.0

    def got_batch(self) -> None:
        self.data_time += time.perf_counter() - self.asked

    def ask_batch(self) -> None:
        self.asked = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def train_one_epoch(ctx: Context, st: TrainState, epoch: int) -> dict | None:
    """Epoch ``epoch`` (0-based) from its first step not trained yet, logging every --log-interval steps and
    checkpointing every --checkpoint-interval: its summary.csv row, or None once --stop-after-steps is reached."""
    cfg = ctx.cfg
    st.net.train()
    first = st.start_step if epoch == st.start_epoch else 0
    # the running sums of an epoch resumed mid-way continue from the checkpoint: one row per whole epoch
    st.stats = EpochStats.restore(st.partial if epoch == st.start_epoch else None)
    clock = _EpochClock()
    # the last step's lr, for the row of an epoch resumed after its last step (no step left to run)
    lr = learning_rate(cfg.lr_type, cfg.base_lr, max(0, st.global_step - 1), st.total)
    bar = _progress(ctx, st.iters, first, f"epoch {epoch + 1}")
    for step, b in enumerate(st.loader.iter_epoch(epoch, first, keep_empty=True), start=first):
        bar.update()
        clock.got_batch()
        lr = learning_rate(cfg.lr_type, cfg.base_lr, st.global_step, st.total)
        set_lr(st.opt, lr)
        train_step(ctx, st, b, epoch, step, lr)
        st.global_step += 1
        if ctx.is_main and ((step + 1) % cfg.log_interval == 0 or step + 1 == st.iters):
            _log_step(ctx, st, epoch, step, first, lr, clock)
        if cfg.checkpoint_interval and st.global_step % cfg.checkpoint_interval == 0:
            st.save(ctx, epoch, step + 1)
        if cfg.stop_after_steps and st.global_step >= cfg.stop_after_steps:
            st.save(ctx, epoch, step + 1)
            log.info("stopping after %d steps (--stop-after-steps)", st.global_step)
            return None
        clock.ask_batch()
    bar.close()
    loop_s = clock.elapsed()
    row = {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": st.stats.loss,
        "train_acc": st.stats.acc,
        "epoch_s": round(loop_s, 2),
        "data_wait_frac": round(min(1.0, clock.data_time / max(loop_s, 1e-9)), 4),
    }
    if first:
        row["resumed_at_step"] = first  # loss/acc cover the whole epoch; epoch_s only the part after it
    return row


def train_step(ctx: Context, st: TrainState, b: dict, epoch: int, step: int, lr: float) -> None:
    """One step on batch ``b``: forward, loss, backward and SGD (or their CUDA-graph replay), then the running
    sums over ranks. Every rank takes every step (DDP): if --skip-bad emptied a batch on any rank, all skip it."""
    cfg = ctx.cfg
    empty = "empty" in b
    if cfg.skip_bad and ctx.dist.enabled:
        empty = distributed.broadcast_flag(empty, ctx.device)
    if empty:
        log.warning("epoch %d step %d skipped: a batch had no readable sample", epoch + 1, step + 1)
        return
    x = b["image"].to(ctx.device, non_blocking=True)
    if ctx.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = b["label"].to(ctx.device, non_blocking=True)
    if st.graphed is not None:  # the whole step, replayed (forward, loss, backward, SGD): graphs.py
        loss, hits = st.graphed(x, y) or (None, None)
    else:
        with _autocast(ctx):
            out = st.net(x)
        loss, hits = training_loss(
            ctx.task, out, y, loss_resolution=cfg.loss_resolution, ohem=not cfg.no_ohem, stride=STRIDE
        )
    if loss is not None and distributed.broadcast_flag(not torch.isfinite(loss).item(), ctx.device):
        raise TrainingError(
            f"loss is {loss.item()} at epoch {epoch + 1} step {step + 1} (lr {lr:.4g}); "
            "lower --base-lr, try --amp off, or check the data"
        )
    if st.graphed is None:
        st.opt.zero_grad(set_to_none=True)
        st.scaler.scale(loss).backward()
        st.scaler.step(st.opt)
        st.scaler.update()
    if loss is not None:  # None: a batch of another shape, dropped by --cuda-graphs
        st.stats.add(*distributed.reduce_step_stats(loss, hits, ctx.device), len(y))  # over ranks


def _log_step(ctx: Context, st: TrainState, epoch: int, step: int, first: int, lr: float, clock: _EpochClock):
    dt = clock.elapsed()
    done = max(1, step + 1 - first)
    eta = dt / done * (st.iters - step - 1)
    # data-wait: the share of the step time this process sat waiting for the loader (a starving pipeline shows
    # as a high value; the host syncs on loss.item() every step, so on a GPU the host's wait is the GPU's idle time)
    log.info(
        "epoch %d [%d/%d] lr %.4g loss %.4f %s %.3f img/s %.1f (global %.1f) data %.3fs "
        "data-wait %.2f mem %.0fMB eta %ds",
        epoch + 1,
        step + 1,
        st.iters,
        lr,
        st.stats.loss,
        "acc" if ctx.task == "cls" else "pix-acc",
        st.stats.acc,
        st.stats.seen_here / dt,
        st.stats.seen_here * ctx.dist.world_size / dt,
        clock.data_time / done,
        min(1.0, clock.data_time / dt),
        _peak_mb(ctx.device),
        eta,
    )


def _eval_due(cfg: TrainConfig, epoch: int) -> bool:
    """Evaluate after the last epoch of this run and every --eval-every epochs, unless --no-eval."""
    every = bool(cfg.eval_every) and (epoch + 1) % cfg.eval_every == 0
    return not cfg.no_eval and (epoch + 1 == cfg.stop_epoch or every)


def end_epoch(ctx: Context, st: TrainState, epoch: int, row: dict, metrics: dict | None) -> None:
    """After epoch ``epoch``: its validation score (``metrics``, None when not evaluated) in the row and best.pt
    when it is the best so far, last.pt, the <label>_ep-NNNN.params export every --save-every epochs, the
    summary.csv row and the curves."""
    cfg = ctx.cfg
    if metrics is not None:
        key = "err1" if ctx.task == "cls" else "miou"
        score = metrics[key]
        row[f"val_{key}"] = score
        if st.best is None or (score < st.best if key == "err1" else score > st.best):
            st.best = score
            if ctx.is_main:
                checkpoint.save(
                    ctx.run_dir / "best.pt",
                    {"model": st.model.state_dict(), "epoch": epoch + 1, key: score, "label": ctx.label},
                )
    st.save(ctx, epoch + 1, 0)
    if ctx.is_main:
        if cfg.save_every and (epoch + 1) % cfg.save_every == 0:
            from widedeep.weights import save_weights

            save_weights(st.model, checkpoint.epoch_params_path(cfg.output, ctx.label, epoch + 1))
        st.summary.add(row)
        st.summary.plot(ctx.run_dir / "curves.png")


def _no_dropout(model: nn.Module) -> None:
    """Dropout off in units 6a/7a (--no-dropout: N-process vs 1-process equivalence checks; each rank draws its
    own masks)."""
    import dataclasses

    for m in model.modules():
        spec = getattr(m, "spec", None)
        if dataclasses.is_dataclass(spec) and getattr(spec, "dropout", 0):
            m.spec = dataclasses.replace(spec, dropout=0.0)


def _load_scaler(scaler: torch.amp.GradScaler, ck: dict, amp: str) -> None:
    """The fp16 loss scale of the checkpoint, when both runs use fp16; a switch of --amp starts afresh."""
    state = ck.get("scaler") or {}
    before = (ck.get("args") or {}).get("amp", "off")
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)
    elif before != amp:
        log.info(
            "--amp %s (the checkpoint was trained with --amp %s)%s",
            amp,
            before,
            ": starting a new fp16 loss scale" if scaler.is_enabled() else "",
        )


def _resume_hint(saved: dict, ctx: Context) -> str:
    if saved["path"] is None:
        return "No checkpoint was written yet in this run."
    where = (
        f"epoch {saved['epoch'] + 1} step {saved['step']}" if saved["step"] else f"the end of epoch {saved['epoch']}"
    )
    return (
        f"Last checkpoint: {saved['path']} (at {where}). To continue, run the same command with --resume"
        + ("" if Path(saved["path"]) == ctx.run_dir / "last.pt" else f" {saved['path']}")
        + "."
    )


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(ctx: Context, model: nn.Module, *, split: str = "val", save: bool = True) -> dict:
    model.eval()
    fn = _evaluate_cls if ctx.task == "cls" else _evaluate_seg
    metrics = fn(ctx, model, split, save)
    model.train()
    if ctx.is_main:
        text = json.dumps(nan_to_none(metrics), indent=1)
        (ctx.run_dir / f"metrics-{split}.json").write_text(text)
        log.info("%s %s: %s", ctx.label, split, _headline(ctx, metrics))
    return metrics


def _headline(ctx: Context, m: dict) -> str:
    if ctx.task == "cls":
        return (
            f"top-1 error {m['err1']:.4f} top-5 error {m['err5']:.4f} (accuracy {m['acc1']:.4f} / {m['acc5']:.4f})"
            f" on {m['count']} images"
        )
    s = f"mIoU {m['miou']:.4f} pixel acc {m['pixel_acc']:.4f} mean acc {m['mean_acc']:.4f}"
    if "cityscapes" in m:
        c = m["cityscapes"]
        s += (
            f" | Cityscapes IoU class {c['averageScoreClasses']:.4f} iIoU class {c['averageScoreInstClasses']:.4f}"
            f" IoU category {c['averageScoreCategories']:.4f} iIoU category {c['averageScoreInstCategories']:.4f}"
        )
    return s


def _val_loader(ctx: Context, split: str, **kw):
    a = ctx.cfg
    return build_loader(
        ctx.dataset,
        a.data_root,
        split,
        batch_size=kw.pop("batch_size", 1),
        train=False,
        device=ctx.device,
        backend=a.backend,
        shard_id=ctx.dist.rank,
        num_shards=ctx.dist.world_size,
        seed=a.seed,
        workers=a.prefetch_threads,
        skip_bad=a.skip_bad,
        val_list=a.val_list,
        **kw,
    )


def _evaluate_cls(ctx: Context, model: nn.Module, split: str, save: bool) -> dict:
    a = ctx.cfg
    scales = a.test_scales
    per_scale, probs, labels = {}, {}, {}
    for s in scales:
        top = TopK(ctx.device)
        for b in _val_loader(ctx, split, batch_size=a.eval_batch, crop_size=s, crops=3 if a.test_3crops else 1):
            with _autocast(ctx):
                p = classify(model, b["image"], flip=a.test_flipping)
            real = b["real"]
            p, y = p[real.to(p.device)], b["label"][real.to(b["label"].device)]
            top.update(p, y)
            for i, pi, yi in zip(b["index"][real].tolist(), p.cpu(), y.tolist()):
                probs.setdefault(i, []).append(pi)
                labels[i] = yi
        per_scale[s] = top.all_reduce().scores()
    out = dict(per_scale[scales[0]])
    if len(scales) > 1:  # the seed: the mean of softmax probabilities over all scales
        top = TopK(ctx.device)
        keys = sorted(probs)
        if keys:
            top.update(
                torch.stack([torch.stack(probs[i]).mean(0) for i in keys]).to(ctx.device),
                torch.tensor([labels[i] for i in keys], device=ctx.device),
            )
        out = top.all_reduce().scores()
    out["scales"] = {str(s): v for s, v in per_scale.items()}
    return out


def _evaluate_seg(ctx: Context, model: nn.Module, split: str, save: bool) -> dict:
    a = ctx.cfg
    space = LABEL_SPACES[ctx.dataset]
    loader = _val_loader(ctx, split, batch_size=a.eval_batch, scale=None)
    cm = ConfusionMatrix(space.num_classes, ctx.device)
    cs = CityscapesScores() if ctx.dataset == "cityscapes" else None
    scales = a.test_scales
    canvas = canvas_for(ctx.dataset, -(-a.crop_size // 8) * 8)
    pred_dir = ctx.run_dir / f"{split}-predictions"
    samples = loader.index.samples
    for b in _progress_iter(ctx, loader, f"{split} images"):
        for k in range(len(b["index"])):
            if not bool(b["real"][k]):
                continue
            h, w = b["image_size"][k].tolist()
            lh, lw = b["label_size"][k].tolist()
            img = b["image"][k, :, :h, :w]
            with _autocast(ctx):
                probs = segment(model, img, scales=scales, flip=a.test_flipping, steps=a.test_steps, canvas_min=canvas)
            if probs.shape[-2:] != (lh, lw):
                probs = F.interpolate(probs[None], size=(lh, lw), mode="bilinear", align_corners=False)[0]
            pred = probs.argmax(0)
            label = b["label"][k, :lh, :lw].to(pred.device)
            cm.update(pred, label)
            sample = samples[int(b["index"][k])]
            raw = space.decode(pred.to(torch.uint8).cpu().numpy())
            if cs is not None:
                gt_raw = np.asarray(Image.open(sample.target))
                inst_path = sample.target.replace("_labelIds.png", "_instanceIds.png")
                inst = np.asarray(Image.open(inst_path)) if os.path.isfile(inst_path) else None
                cs.update(raw, gt_raw, inst)
            if save:
                _save_prediction(pred_dir, sample.image, raw, space, probs if a.save_predictions else None)
    out = cm.all_reduce().scores()
    out["class_names"] = list(space.names)
    if cs is not None:
        out["cityscapes"] = cs.all_reduce(ctx.device if ctx.device.type == "cuda" else "cpu").scores()
    return out


def _progress_iter(ctx: Context, iterable, desc: str):
    bar = _progress(ctx, len(iterable), 0, desc)
    for item in iterable:
        yield item
        bar.update()
    bar.close()


def _save_prediction(folder: Path, image_path: str, raw: np.ndarray, space, probs: torch.Tensor | None) -> None:
    """Dataset ids as a single-channel PNG (Cityscapes labelIds, VOC indices, ADE 1..150) plus a colour PNG."""
    stem = Path(image_path).stem.replace("_leftImg8bit", "")
    (folder / "ids").mkdir(parents=True, exist_ok=True)
    (folder / "color").mkdir(parents=True, exist_ok=True)
    _atomic_png(Image.fromarray(raw, "L"), folder / "ids" / f"{stem}.png")
    im = Image.fromarray(raw, "P")
    im.putpalette(space.palette.tobytes())
    _atomic_png(im, folder / "color" / f"{stem}.png")
    if probs is not None:
        np.savez_compressed(folder / "ids" / f"{stem}_scores.npz", scores=probs.half().cpu().numpy())


def _atomic_png(im: Image.Image, path: Path) -> None:
    with atomic_open(path) as f:
        im.save(f, format="PNG")
