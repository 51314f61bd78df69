"""Training and evaluation loops for ``python -m widedeep.train``."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

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
from .evaluate import STRIDE, canvas_for, classify, nan_to_none, segment
from .logs import Summary
from .memory_format import use_channels_last
from .losses import cross_entropy_sum, labels_at_feature_resolution, ohem_cross_entropy
from .metrics import ConfusionMatrix, TopK
from .optim import learning_rate, make_optimizer, set_lr

log = logging.getLogger("widedeep.train")
DATASET_OF_LABEL = {"ilsvrc-cls": "ilsvrc", "voc": "voc", "cityscapes": "cityscapes", "ade20k": "ade20k"}


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss, bad flags); the message says what to do."""


@dataclass
class Context:
    args: object
    label: str
    dataset: str
    task: str  # "cls" | "seg"
    device: torch.device
    dist: distributed.DistInfo
    run_dir: Path
    channels_last: bool = False  # decided by build_model (see memory_format)

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
        raise TrainingError(f"--model {name}: no data pipeline for dataset {lab.dataset!r}; "
                            f"supported: {', '.join(DATASET_OF_LABEL)}")
    return lab.label, DATASET_OF_LABEL[lab.dataset], "seg" if lab.task == "segmentation" else "cls"


def model_options(a) -> dict:
    """create_model keywords from --activation, --activation-param, --bn-eps, --dilate-first-conv (only those given:
    the model's defaults stay the label's); bad values are one-line errors."""
    opts: dict = {}
    if getattr(a, "activation", None):
        opts["activation"] = a.activation
    if getattr(a, "activation_param", None) is not None:
        if not (math.isfinite(a.activation_param) and a.activation_param >= 0):
            raise TrainingError(f"--activation-param {a.activation_param}: expected a finite slope >= 0")
        if opts.get("activation") != "leaky_relu":
            raise TrainingError("--activation-param is the leaky ReLU slope: add --activation leaky_relu")
        opts["activation_param"] = a.activation_param
    if getattr(a, "bn_eps", None) is not None:
        if not (math.isfinite(a.bn_eps) and a.bn_eps > 0):
            raise TrainingError(f"--bn-eps {a.bn_eps}: expected a positive number (1e-5, 1.001e-5)")
        opts["bn_eps"] = a.bn_eps
    if getattr(a, "dilate_first_conv", False):
        opts["dilate_first_conv"] = True
    return opts


def build_model(ctx: Context) -> ResNet38:
    a = ctx.args
    fused = ({"on": True, "off": False, "auto": ctx.device.type == "cuda"}[a.fused] or a.backward_do_mirror
             or a.recompute == "unit")  # the unit re-run runs on the fused kernels
    wf, strict = None, a.phase == "val"
    if a.weights and not a.resume:
        from widedeep.weights import read_weights

        # md5 checks are for released files: a mismatch (e.g. our own <label>_ep-NNNN exports) warns and loads
        wf = read_weights(a.weights, verify=not a.no_verify_weights,
                          weights_convention=getattr(a, "weights_convention", None))
    from widedeep.weights import WeightsMismatchError

    try:  # training drops a classifier of another size (fine-tuning); evaluation needs the file to fit exactly
        model = create_model(ctx.label, weights=wf, weights_strict=strict, pool_style=a.pool_top_infer_style,
                             num_classes=None if strict else parse_label(ctx.label).num_classes, width=a.width,
                             fused=bool(fused), recompute="unit" if a.recompute == "unit" else None,
                             **model_options(a))
    except WeightsMismatchError as e:
        raise TrainingError(_cli_mismatch_hint(e, ctx)) from None
    bn = a.bn_stats if a.bn_stats != "auto" else ("frozen" if ctx.task == "seg" else "batch")
    if bn == "frozen":
        model.freeze_bn_stats()
    elif bn == "sync" and ctx.dist.enabled:
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

    a = ctx.args
    backend = torch.distributed.get_backend() if ctx.dist.enabled else None
    try:
        graphs.refuse(ctx.device, world_size=ctx.dist.world_size, compile_mode=a.compile, dist_backend=backend)
        graphs.prepare_optimizer(opt, ctx.device)
    except graphs.GraphRefused as e:
        raise TrainingError(str(e)) from None

    def forward_loss(x, y):
        with _autocast(ctx):
            out = net(x)
        return graphs.step_loss(ctx.task, out, y, loss_resolution=a.loss_resolution, ohem=not a.no_ohem,
                                stride=STRIDE)

    return graphs.GraphedStep(net, opt, forward_loss, scaler=scaler)


def _cli_mismatch_hint(e, ctx: Context) -> str:
    """The weights mismatch in command-line terms (flags, not Python arguments)."""
    a, lab = ctx.args, parse_label(ctx.label)
    if e.width_ratio:
        return f"--weights {e.path}: the file is a width-{e.file_width:g} net, the model width {e.model_width:g}: add --width {e.file_width:g}"
    if e.file_classes and e.model_classes is not None and e.file_classes != e.model_classes and len(e.mis_shaped) <= 4:
        fix = ModelLabel(lab.dataset, lab.variant, e.file_classes, lab.output_stride, lab.extra).label
        return (f"--weights {e.path}: the file's classifier has {e.file_classes} classes, --model {ctx.label} has "
                f"{e.model_classes}: use --model {fix}" + (" (or --phase train to fine-tune)" if a.phase == "val" else ""))
    return str(e)  # its hints name the command-line flags too


def _progress(ctx: Context, total: int, initial: int, desc: str):
    """A tqdm bar on rank 0 of an interactive terminal; silent on non-TTY (logs, CI) and other ranks."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, mininterval=2,
                disable=None if ctx.is_main else True)


def _autocast(ctx: Context):
    a = ctx.args.amp
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


def train(ctx: Context) -> dict:
    a = ctx.args
    world, rank = ctx.dist.world_size, ctx.dist.rank
    batch = a.batch_images or (256 if ctx.task == "cls" else 16)
    if batch % world:
        raise TrainingError(f"--batch-images {batch} (global) must be divisible by the {world} processes")
    per_rank = batch // world
    recipe = {}
    if ctx.task == "seg":
        recipe["scale_rate_range"] = tuple(a.scale_rate_range)
        if a.origin_size:
            recipe["origin_size"] = a.origin_size
    loader = build_loader(ctx.dataset, a.data_root, a.split or "train", batch_size=per_rank, train=True,
                          crop_size=a.crop_size, device=ctx.device, backend=a.backend, shard_id=rank,
                          num_shards=world, seed=a.seed, workers=a.prefetch_threads, skip_bad=a.skip_bad,
                          val_list=a.val_list, **recipe)
    iters = len(loader)
    total = a.to_epoch * iters
    stop_epoch = min(a.stop_epoch or a.to_epoch, a.to_epoch)
    if ctx.is_main:  # temporaries of a run killed while saving (.last.pt.tmp-<host>-<pid>); live writers are kept
        for folder in (ctx.run_dir, Path(a.output)):
            remove_stale_temporaries(folder)
    model = build_model(ctx)
    if a.no_dropout:
        _no_dropout(model)
    base_lr = a.base_lr if a.base_lr is not None else (0.1 if ctx.task == "cls" else 0.0016)
    opt = make_optimizer(model, ctx.task, base_lr, a.weight_decay)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=a.amp == "fp16")
    start_epoch, start_step, best, partial = a.from_epoch, 0, None, None
    resume = (ctx.run_dir / "last.pt") if a.resume == "auto" else (Path(a.resume) if a.resume else None)
    if resume is not None:
        ck = checkpoint.load(resume)
        checkpoint.load_model(model, ck, resume, label=ctx.label, width=a.width)
        opt.load_state_dict(ck["optimizer"])
        _load_scaler(scaler, ck, a.amp)
        start_epoch, start_step, best = ck["epoch"], ck["step_in_epoch"], ck.get("best")
        partial = ck.get("epoch_stats") if start_step else None
        checkpoint.set_rng_state(ck["rng"][rank] if isinstance(ck["rng"], list) else ck["rng"])
        log.info("resumed %s at epoch %d step %d", resume, start_epoch + 1, start_step)
    net = model
    if ctx.dist.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if a.compile != "off":
        net = _compiled(net, a.compile, ctx.device)
    graphed = _graphed_step(ctx, net, opt, scaler) if getattr(a, "cuda_graphs", False) else None
    summary = Summary(ctx.run_dir / "summary.csv", ctx.run_dir / "tb" if a.tensorboard else None,
                      keep_through=start_epoch) if ctx.is_main else None
    log.info("%s on %s: %d process(es), batch %d per process = %d global, %d iterations/epoch, epochs %d..%d of %d, "
             "lr %s %.4g", ctx.label, ctx.dataset, world, per_rank, batch, iters, start_epoch + 1, stop_epoch,
             a.to_epoch, a.lr_type, base_lr)
    global_step = start_epoch * iters + start_step
    metrics: dict = {}
    saved = {"path": resume, "epoch": start_epoch, "step": start_step}  # the newest checkpoint, for Ctrl-C
    stats = EpochStats()

    def save_state(epoch: int, step_in_epoch: int, name: str = "last.pt") -> None:
        rngs = [checkpoint.rng_state()]
        if ctx.dist.enabled:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if ctx.is_main:
            checkpoint.save(ctx.run_dir / name, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step, "best": best,
                "rng": rngs if ctx.dist.enabled else rngs[0], "args": vars(a), "label": ctx.label,
                "epoch_stats": stats.state() if step_in_epoch else None})
            saved.update(path=ctx.run_dir / name, epoch=epoch, step=step_in_epoch)

    try:
        for epoch in range(start_epoch, stop_epoch):
            net.train()
            first = start_step if epoch == start_epoch else 0
            # the running sums of an epoch resumed mid-way continue from the checkpoint: one row per whole epoch
            stats = EpochStats.restore(partial if epoch == start_epoch else None)
            t_epoch = t_data = t0 = time.perf_counter()
            data_time = 0.0
            # the last step's lr, for the row of an epoch resumed after its last step (no step left to run)
            lr = learning_rate(a.lr_type, base_lr, max(0, global_step - 1), total)
            bar = _progress(ctx, iters, first, f"epoch {epoch + 1}")
            for step, b in enumerate(loader.iter_epoch(epoch, first, keep_empty=True), start=first):
                bar.update()
                data_time += time.perf_counter() - t_data
                lr = learning_rate(a.lr_type, base_lr, global_step, total)
                set_lr(opt, lr)
                # every rank takes every step (DDP): if --skip-bad emptied a batch on any rank, all skip it
                empty = "empty" in b
                if a.skip_bad and ctx.dist.enabled:
                    empty = distributed.broadcast_flag(empty, ctx.device)
                if empty:
                    log.warning("epoch %d step %d skipped: a batch had no readable sample", epoch + 1, step + 1)
                else:
                    x = b["image"].to(ctx.device, non_blocking=True)
                    if ctx.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    y = b["label"].to(ctx.device, non_blocking=True)
                    if graphed is not None:  # the whole step, replayed (forward, loss, backward, SGD): graphs.py
                        loss, hits = graphed(x, y) or (None, None)
                    else:
                        with _autocast(ctx):
                            out = net(x)
                        loss, hits = _loss(ctx, out, y)
                    bad = loss is not None and distributed.broadcast_flag(not torch.isfinite(loss).item(), ctx.device)
                    if bad:
                        raise TrainingError(f"loss is {loss.item()} at epoch {epoch + 1} step {step + 1} (lr {lr:.4g}); "
                                            "lower --base-lr, try --amp off, or check the data")
                    if graphed is None:
                        opt.zero_grad(set_to_none=True)
                        scaler.scale(loss).backward()
                        scaler.step(opt)
                        scaler.update()
                    if loss is not None:  # None: a batch of another shape, dropped by --cuda-graphs
                        stats.add(*distributed.reduce_step_stats(loss, hits, ctx.device), len(y))  # over ranks
                global_step += 1
                if ctx.is_main and ((step + 1) % a.log_interval == 0 or step + 1 == iters):
                    dt = time.perf_counter() - t0
                    eta = dt / max(1, step + 1 - first) * (iters - step - 1)
                    # data-wait: the share of the step time this process sat waiting for the loader (a starving
                    # pipeline shows as a high value; the host syncs on loss.item() every step, so on a GPU the
                    # host's wait is the GPU's idle time)
                    log.info("epoch %d [%d/%d] lr %.4g loss %.4f %s %.3f img/s %.1f (global %.1f) data %.3fs "
                             "data-wait %.2f mem %.0fMB eta %ds", epoch + 1, step + 1, iters, lr, stats.loss,
                             "acc" if ctx.task == "cls" else "pix-acc", stats.acc, stats.seen_here / dt,
                             stats.seen_here * world / dt, data_time / max(1, step + 1 - first),
                             min(1.0, data_time / dt), _peak_mb(ctx.device), eta)
                if a.checkpoint_interval and global_step % a.checkpoint_interval == 0:
                    save_state(epoch, step + 1)
                if a.stop_after_steps and global_step >= a.stop_after_steps:
                    save_state(epoch, step + 1)
                    log.info("stopping after %d steps (--stop-after-steps)", global_step)
                    return {"stopped_at": global_step}
                t_data = time.perf_counter()
            bar.close()
            start_step = 0
            loop_s = time.perf_counter() - t_epoch
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": stats.loss, "train_acc": stats.acc,
                   "epoch_s": round(loop_s, 2), "data_wait_frac": round(min(1.0, data_time / max(loop_s, 1e-9)), 4)}
            if first:
                row["resumed_at_step"] = first  # loss/acc cover the whole epoch; epoch_s only the part after it
            do_eval = not a.no_eval and (epoch + 1 == stop_epoch or (a.eval_every and (epoch + 1) % a.eval_every == 0))
            if do_eval:
                metrics = evaluate(ctx, model, split="val", save=False)
                key = "err1" if ctx.task == "cls" else "miou"
                score = metrics[key]
                row[f"val_{key}"] = score
                if best is None or (score < best if key == "err1" else score > best):
                    best = score
                    if ctx.is_main:
                        checkpoint.save(ctx.run_dir / "best.pt", {"model": model.state_dict(), "epoch": epoch + 1,
                                                                  key: score, "label": ctx.label})
            save_state(epoch + 1, 0)
            if ctx.is_main:
                if a.save_every and (epoch + 1) % a.save_every == 0:
                    from widedeep.weights import save_weights

                    save_weights(model, checkpoint.epoch_params_path(a.output, ctx.label, epoch + 1))
                summary.add(row)
                summary.plot(ctx.run_dir / "curves.png")
    except KeyboardInterrupt as e:
        if ctx.is_main:
            log.warning("%s. %s", "terminated (SIGTERM)" if isinstance(e, checkpoint.Terminated) else "interrupted",
                        _resume_hint(saved, ctx))
        raise
    return metrics


def _no_dropout(model: nn.Module) -> None:
    """Dropout off in units 6a/7a (--no-dropout: N-process vs 1-process equivalence checks; each rank draws its
    own masks)."""
    import dataclasses

    for m in model.modules():
        spec = getattr(m, "spec", None)
        if dataclasses.is_dataclass(spec) and getattr(spec, "dropout", 0):
            m.spec = dataclasses.replace(spec, dropout=0.0)


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


def _load_scaler(scaler: torch.amp.GradScaler, ck: dict, amp: str) -> None:
    """The fp16 loss scale of the checkpoint, when both runs use fp16; a switch of --amp starts afresh."""
    state = ck.get("scaler") or {}
    before = (ck.get("args") or {}).get("amp", "off")
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)
    elif before != amp:
        log.info("--amp %s (the checkpoint was trained with --amp %s)%s", amp, before,
                 ": starting a new fp16 loss scale" if scaler.is_enabled() else "")


def _resume_hint(saved: dict, ctx: Context) -> str:
    if saved["path"] is None:
        return "No checkpoint was written yet in this run."
    where = f"epoch {saved['epoch'] + 1} step {saved['step']}" if saved["step"] else f"the end of epoch {saved['epoch']}"
    return (f"Last checkpoint: {saved['path']} (at {where}). To continue, run the same command with --resume"
            + ("" if Path(saved["path"]) == ctx.run_dir / "last.pt" else f" {saved['path']}") + ".")


def _loss(ctx: Context, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and (correct, counted) for the running training accuracy (seg: the seed's ``fcn_valid``)."""
    if ctx.task == "cls":
        loss = F.cross_entropy(out.float(), y)
        return loss, torch.tensor([(out.argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
    if ctx.args.loss_resolution == "feature":
        y = labels_at_feature_resolution(y, STRIDE)
        if y.shape[-2:] != out.shape[-2:]:
            raise TrainingError(f"labels {tuple(y.shape[-2:])} vs scores {tuple(out.shape[-2:])}: the crop must be a "
                                "multiple of 8 (it is rounded up for you) and the model output stride 8")
    else:
        out = F.interpolate(out.float(), size=y.shape[-2:], mode="bilinear", align_corners=False)
    # the per-process sum over the global mean count: after DDP averages the ranks' gradients, every valid pixel
    # of the global batch has the weight it has in one process (OHEM still selects per process)
    total, count = (cross_entropy_sum(out, y) if ctx.args.no_ohem
                    else ohem_cross_entropy(out, y, reduction="sum"))
    loss = total / distributed.global_mean_count(count).to(total.dtype)
    valid = y != 255
    hits = ((out.argmax(1) == y) & valid).sum().item()
    return loss, torch.tensor([hits, valid.sum().item()], dtype=torch.float64)


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
        return (f"top-1 error {m['err1']:.4f} top-5 error {m['err5']:.4f} (accuracy {m['acc1']:.4f} / {m['acc5']:.4f})"
                f" on {m['count']} images")
    s = f"mIoU {m['miou']:.4f} pixel acc {m['pixel_acc']:.4f} mean acc {m['mean_acc']:.4f}"
    if "cityscapes" in m:
        c = m["cityscapes"]
        s += (f" | Cityscapes IoU class {c['averageScoreClasses']:.4f} iIoU class {c['averageScoreInstClasses']:.4f}"
              f" IoU category {c['averageScoreCategories']:.4f} iIoU category {c['averageScoreInstCategories']:.4f}")
    return s


def _val_loader(ctx: Context, split: str, **kw):
    a = ctx.args
    return build_loader(ctx.dataset, a.data_root, split, batch_size=kw.pop("batch_size", 1), train=False,
                        device=ctx.device, backend=a.backend, shard_id=ctx.dist.rank, num_shards=ctx.dist.world_size,
                        seed=a.seed, workers=a.prefetch_threads, skip_bad=a.skip_bad, val_list=a.val_list, **kw)


def _evaluate_cls(ctx: Context, model: nn.Module, split: str, save: bool) -> dict:
    a = ctx.args
    scales = a.test_scales or (320,)
    per_scale, probs, labels = {}, {}, {}
    batch = a.batch_images if a.phase == "val" and a.batch_images else 10
    for s in scales:
        top = TopK(ctx.device)
        for b in _val_loader(ctx, split, batch_size=batch, crop_size=s, crops=3 if a.test_3crops else 1):
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
            top.update(torch.stack([torch.stack(probs[i]).mean(0) for i in keys]).to(ctx.device),
                       torch.tensor([labels[i] for i in keys], device=ctx.device))
        out = top.all_reduce().scores()
    out["scales"] = {str(s): v for s, v in per_scale.items()}
    return out


def _evaluate_seg(ctx: Context, model: nn.Module, split: str, save: bool) -> dict:
    a = ctx.args
    space = LABEL_SPACES[ctx.dataset]
    loader = _val_loader(ctx, split, batch_size=1, scale=None)
    cm = ConfusionMatrix(space.num_classes, ctx.device)
    cs = CityscapesScores() if ctx.dataset == "cityscapes" else None
    scales = a.test_scales or (None,)
    canvas = canvas_for(ctx.dataset, -(-(a.crop_size or 500) // 8) * 8)
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
                probs = segment(model, img, scales=scales, flip=a.test_flipping,
                                steps=a.test_steps, canvas_min=canvas)
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
