"""Command line: the seed's flags (``iclass/ilsvrc.py`` and ``issegm/voc.py``) plus ours.

With no arguments it runs the embedded demo: a synthetic VOC-layout dataset, a width-1/16 A1-s8 net trained
on CPU for a few minutes, then evaluated with the seed's protocol.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

# This module owns every flag and every default: those that depend on the task in TASK_DEFAULTS (their help text is
# generated from it), filled in by config(), which builds the typed TrainConfig the trainer reads. (The module
# docstring above is the --help description.)
NO_MEANING = "accepted for the seed's commands; no meaning here"
DEMO_ARGS = [
    "--data-root",
    "data/synthetic-voc",
    "--output",
    "output/demo",
    "--model",
    "voc_rna-a1_cls21_s8",
    "--width",
    "0.0625",
    "--split",
    "train",
    "--batch-images",
    "8",
    "--crop-size",
    "96",
    "--origin-size",
    "96",
    "--lr-type",
    "poly",
    "--base-lr",
    "0.05",
    "--to-epoch",
    "40",
    "--bn-stats",
    "batch",
    "--test-scales",
    "112",
    "--test-flipping",
    "--eval-every",
    "10",
    "--log-interval",
    "40",
    "--synthetic",
    "--backend",
    "torch",
    "--prefetch-threads",
    "0",
    "--save-every",
    "10",
]


def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.split(",") if v != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


# ------------------------------------------------------------------------------------------------ task defaults
@dataclass(frozen=True)
class TaskDefaults:
    """The seed's recipe values that depend on the task: what a flag left out means. The one copy of them:
    :func:`config` fills them in and the flags' help text is generated from them."""

    batch_images: int  # global training batch (--batch-images)
    eval_batch: int  # evaluation batch (cls: --batch-images with --phase val; seg: one image at a time)
    crop_size: int  # training crop (--crop-size); seg: also the test canvas
    base_lr: float  # --base-lr
    weight_decay: float  # --weight-decay (weights and BN gamma; biases and beta have none)
    test_scales: tuple[int | None, ...]  # --test-scales; None = as loaded (the dataset's test size)
    bn_stats: str  # what --bn-stats auto means


TASK_DEFAULTS = {
    "cls": TaskDefaults(
        batch_images=256,
        eval_batch=10,
        crop_size=224,
        base_lr=0.1,
        weight_decay=1e-4,
        test_scales=(320,),
        bn_stats="batch",
    ),
    # crop 504: the seed's 500 rounded up to the output stride 8 (data_pipes rounds any --crop-size up)
    "seg": TaskDefaults(
        batch_images=16,
        eval_batch=1,
        crop_size=504,
        base_lr=0.0016,
        weight_decay=5e-4,
        test_scales=(None,),
        bn_stats="frozen",
    ),
}


def _show(v) -> str:
    if isinstance(v, tuple):
        return ",".join(_show(x) for x in v)
    if v is None:
        return "the dataset's test size"
    return f"{v:g}" if isinstance(v, float) else str(v)


def by_task(name: str) -> str:
    """``"cls 0.1, seg 0.0016"``: a task default of :data:`TASK_DEFAULTS` as the help text shows it."""
    return ", ".join(f"{task} {_show(getattr(d, name))}" for task, d in TASK_DEFAULTS.items())


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's ``(default: ...)`` after each help text, except where the text already says it (task defaults)."""

    def _get_help_string(self, action):
        return action.help if "(default" in (action.help or "") else super()._get_help_string(action)


# ------------------------------------------------------------------------------------------------ flags
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m widedeep.train", description=__doc__, formatter_class=_HelpFormatter)
    _seed_flags(ap.add_argument_group("the seed's flags"))
    group = ap.add_argument_group("widedeep")
    _widedeep_flags(group)
    _run_flags(group)
    _model_flags(ap.add_argument_group("model options"))
    return ap


def _seed_flags(g) -> None:
    g.add_argument("--data-root", help="dataset folder in the seed's layout (data/ilsvrc12, data/VOCdevkit, ...)")
    g.add_argument("--output", default="output", help="run folder; <label>_ep-NNNN.params exports land here")
    g.add_argument("--model", help="seed label, e.g. voc_rna-a1_cls21_s8 (default: from the --weights file name)")
    g.add_argument("--weights", help=".params / .safetensors / .pth to start from (or to evaluate)")
    g.add_argument("--phase", choices=["train", "val"], default="train")
    g.add_argument("--split", help="train, train+ or val (default: train for --phase train, val otherwise)")
    g.add_argument(
        "--batch-images",
        type=int,
        help=f"GLOBAL batch over all GPUs (default: {by_task('batch_images')}"
        f"; evaluation batches: {by_task('eval_batch')}, cls: --batch-images with --phase val)",
    )
    g.add_argument(
        "--crop-size",
        type=int,
        help=f"training crop, rounded up to a multiple of 8 for seg (default: "
        f"{by_task('crop_size')}); the seg test canvas",
    )
    g.add_argument(
        "--origin-size", type=int, help="seg: nominal longer side for scale jitter (VOC 500, Cityscapes 2048)"
    )
    g.add_argument("--scale-rate-range", type=_floats, default=(0.7, 1.3))
    g.add_argument("--lr-type", choices=["fixed", "linear", "poly"], default="fixed")
    g.add_argument("--base-lr", type=float, help=f"(default: {by_task('base_lr')})")
    g.add_argument("--weight-decay", type=float, help=f"on weights and BN gamma (default: {by_task('weight_decay')})")
    g.add_argument("--to-epoch", type=int, default=1, help="schedule length in epochs")
    g.add_argument("--from-epoch", type=int, default=0, help="start at this epoch of the schedule (prefer --resume)")
    g.add_argument("--stop-epoch", type=int, help="stop after this epoch (the schedule still ends at --to-epoch)")
    g.add_argument(
        "--test-scales",
        type=_ints,
        help=f"cls: shorter side(s); seg: longer side(s) (default: {by_task('test_scales')}: VOC 500, Cityscapes 2048)",
    )
    g.add_argument("--test-flipping", action="store_true", help="average probabilities with the mirrored input")
    g.add_argument("--test-steps", type=int, default=1, help="seg: shift-and-stitch steps (ADE20K: 2)")
    g.add_argument("--test-3crops", action="store_true", help="cls: average three crops along the longer side")
    g.add_argument(
        "--pool-top-infer-style",
        choices=["mxnet", "caffe", "ceil"],
        help="Model A max-pool padding ('caffe' for the released Model A file; chosen automatically)",
    )
    g.add_argument(
        "--gpus",
        type=_ints,
        help="GPU ids; several spawn one DDP process each (or use torchrun). "
        "Without a CUDA device any --gpus is ignored with a warning: one CPU process",
    )
    g.add_argument("--prefetch-threads", type=int, help="data workers (DALI threads / DataLoader processes)")
    g.add_argument(
        "--backward-do-mirror",
        action="store_true",
        help="recompute BN-ReLU in backward instead of storing it (= --fused on)",
    )
    g.add_argument("--save-predictions", action="store_true", help="seg val: also save fp16 score maps (.npz)")
    g.add_argument("--debug", action="store_true", help="show the Python traceback of an error (else one line)")
    for flag in NO_MEANING_FLAGS:
        kw = {"action": "store_true"} if flag == "--no-choose-interp-method" else {}
        g.add_argument(flag, help=NO_MEANING, **kw)


NO_MEANING_FLAGS = ("--prefetcher", "--kvstore", "--cache-images", "--no-choose-interp-method")


def _widedeep_flags(o) -> None:
    """How the step computes (precision, kernels, memory, statistics, loss); :func:`_run_flags` the rest."""
    o.add_argument("--amp", choices=["bf16", "fp16", "off"], default="off", help="autocast dtype")
    o.add_argument(
        "--fused",
        choices=["auto", "on", "off"],
        default="auto",
        help="fused BN-ReLU-conv recompute kernels (auto: on with CUDA)",
    )
    o.add_argument(
        "--recompute",
        choices=["off", "unit"],
        default="off",
        help="unit: keep only each residual unit's input and re-run the unit (fused) in backward: "
        "~0.3x eager activation memory for one more forward of the convolutions",
    )
    o.add_argument(
        "--compile",
        choices=["off", "default", "reduce-overhead", "max-autotune"],
        default="off",
        help="torch.compile the training forward with this mode (the fused kernels stay as custom ops; "
        "reduce-overhead = CUDA graphs, for launch-bound small batches); evaluation stays eager",
    )
    o.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="capture the whole training step (forward, loss, backward, SGD) in one CUDA graph after 3 "
        "warm-up steps and replay it (one GPU; batches of another shape are dropped); eval stays eager",
    )
    o.add_argument(
        "--channels-last",
        action="store_true",
        help="channels_last model and batches (batches are NCHW otherwise); ignored when training on "
        "a CPU a model with strided convs of <16 channels, which crash oneDNN on some CPUs",
    )
    o.add_argument(
        "--bn-stats",
        choices=["auto", "batch", "frozen", "sync"],
        default="auto",
        help=f"BN statistics in training: auto = {by_task('bn_stats')} (the seed); sync = synchronised over ranks",
    )
    o.add_argument(
        "--loss-resolution",
        choices=["feature", "full"],
        default="feature",
        help="seg: labels subsampled [4::8] (the seed) or logits upsampled to the crop",
    )
    o.add_argument("--no-ohem", action="store_true", help="seg: plain cross-entropy instead of OHEM")


def _run_flags(o) -> None:
    o.add_argument("--width", type=float, default=1.0, help="channel multiplier (demos/tests; 1 = published)")
    o.add_argument("--resume", nargs="?", const="auto", help="checkpoint to continue from ('auto' = <run>/last.pt)")
    o.add_argument(
        "--overwrite",
        action="store_true",
        help="start a fresh run in a run folder that holds an earlier run (removes its files and exports)",
    )
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--log-interval", type=int, default=20, help="steps between log lines")
    o.add_argument("--checkpoint-interval", type=int, default=0, help="steps between recovery checkpoints (0: epochs)")
    o.add_argument("--save-every", type=int, default=1, help="epochs between <label>_ep-NNNN.params exports")
    o.add_argument("--eval-every", type=int, default=0, help="epochs between evaluations while training (0: end)")
    o.add_argument("--no-eval", action="store_true", help="train only")
    o.add_argument("--backend", choices=["auto", "dali", "torch"], default="auto", help="data backend")
    o.add_argument("--device", default="auto", help="auto, cpu or cuda")
    o.add_argument("--skip-bad", action="store_true", help="skip unreadable samples (counted) instead of stopping")
    o.add_argument(
        "--no-verify-weights",
        action="store_true",
        help="skip the md5 check of files named like the released ones (a mismatch only warns)",
    )
    o.add_argument("--val-list", help="ILSVRC: validation label list (default: <data-root>/val.lst)")
    o.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (extra 'tensorboard')")
    o.add_argument("--synthetic", action="store_true", help="write a synthetic dataset at --data-root first")
    o.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)  # tests: simulate a kill
    o.add_argument("--no-dropout", action="store_true", help=argparse.SUPPRESS)  # tests: DDP equivalence


def _model_flags(m) -> None:
    # model options the models already take (create_model keywords), so that a Mapillary/NVIDIA file fine-tunes
    # from the command line as it loads from Python (README: "Three ResNet-38 lineages")
    m.add_argument(
        "--activation",
        choices=["relu", "leaky_relu"],
        help="the trunk's BN activation (default relu; Mapillary's files: leaky_relu)",
    )
    m.add_argument("--activation-param", type=float, help="leaky ReLU slope (default 0.01)")
    m.add_argument(
        "--weights-convention",
        choices=["plain", "inplace_abn"],
        help="BN gammas of a Mapillary/NVIDIA --weights file: inplace_abn = saved from InPlaceABN "
        "(|gamma| + eps, converted on loading), plain = plain BatchNorm values",
    )
    m.add_argument("--bn-eps", type=float, help="every BatchNorm's eps (default 1.001e-5; Mapillary/psa 1e-5)")
    m.add_argument(
        "--dilate-first-conv",
        action="store_true",
        help="also dilate unit 5a's first 3x3 at output stride 8 (Mapillary's dilated WiderResNetA2)",
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv or DEMO_ARGS)
    args.demo = not argv
    check(args)
    return args


class FlagError(ValueError):
    """A flag's value is out of range (one line naming the flag; exit status 2)."""


# flag -> (smallest allowed value, what is expected); None values mean "the default"
_RANGES = {
    "batch_images": (1, "a positive integer (the global batch)"),
    "crop_size": (1, "a positive integer (pixels)"),
    "origin_size": (1, "a positive integer (pixels)"),
    "to_epoch": (1, "a positive number of epochs"),
    "stop_epoch": (1, "a positive epoch number"),
    "from_epoch": (0, "an epoch number >= 0"),
    "test_steps": (1, "a positive integer"),
    "log_interval": (1, "a positive number of steps"),
    "checkpoint_interval": (0, "a number of steps >= 0 (0: at epoch ends)"),
    "save_every": (0, "a number of epochs >= 0 (0: no exports)"),
    "eval_every": (0, "a number of epochs >= 0"),
    "prefetch_threads": (0, "a number of workers >= 0"),
    "stop_after_steps": (1, "a positive number of steps"),
    "base_lr": (0, "a learning rate >= 0"),
    "weight_decay": (0, "a weight decay >= 0"),
}


def check(args: argparse.Namespace) -> None:
    """Ranges of the numeric flags: a 0 or negative value is an error naming the flag, never a silent default."""

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for name, (low, what) in _RANGES.items():
        v = getattr(args, name, None)
        if v is not None and (v < low or (isinstance(v, float) and v != v)):
            raise FlagError(f"{flag(name)} {v:g}: expected {what}")
    if not args.width > 0:
        raise FlagError(f"--width {args.width:g}: expected a positive channel multiplier (1 = published)")
    for s in args.test_scales or ():
        if s < 1:
            raise FlagError(f"--test-scales {','.join(map(str, args.test_scales))}: expected positive sizes")
    lo_hi = tuple(args.scale_rate_range)
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
        raise FlagError(
            f"--scale-rate-range {','.join(f'{v:g}' for v in lo_hi)}: expected LOW,HIGH with "
            "0 < LOW <= HIGH (e.g. 0.7,1.3)"
        )
    if args.from_epoch >= args.to_epoch:
        raise FlagError(f"--from-epoch {args.from_epoch}: expected less than --to-epoch {args.to_epoch}")


# ------------------------------------------------------------------------------------------------ the typed config
@dataclass(frozen=True)
class TrainConfig:
    """Everything a run reads: the flags (same names as their ``dest``) with :data:`TASK_DEFAULTS` filled in by
    :func:`config`, the run's label/dataset/task, and the command line as parsed (``flags``, saved in checkpoints).
    The flags listed in :data:`NO_MEANING_FLAGS` are accepted and dropped."""

    label: str  # seed label, e.g. voc_rna-a1_cls21_s8
    dataset: str  # ilsvrc | voc | cityscapes | ade20k
    task: str  # cls | seg
    flags: dict  # vars() of the parsed namespace, unresolved: the checkpoint's "args"
    # -- the seed's flags
    data_root: str
    output: str
    model: str | None
    weights: str | None
    phase: str  # train | val
    split: str  # resolved: train for --phase train, val otherwise
    batch_images: int  # resolved: global training batch
    eval_batch: int  # resolved: evaluation batch per process
    crop_size: int  # resolved
    origin_size: int | None
    scale_rate_range: tuple[float, ...]
    lr_type: str
    base_lr: float  # resolved
    weight_decay: float  # resolved
    to_epoch: int
    from_epoch: int
    stop_epoch: int  # resolved: min(--stop-epoch or --to-epoch, --to-epoch)
    test_scales: tuple[int | None, ...]  # resolved
    test_flipping: bool
    test_steps: int
    test_3crops: bool
    pool_top_infer_style: str | None
    gpus: tuple[int, ...] | None
    prefetch_threads: int | None
    backward_do_mirror: bool
    save_predictions: bool
    debug: bool
    # -- widedeep
    amp: str
    fused: str
    recompute: str
    compile: str
    cuda_graphs: bool
    channels_last: bool
    bn_stats: str  # resolved: batch | frozen | sync
    loss_resolution: str
    no_ohem: bool
    width: float
    resume: str | None  # None, "auto" or a path (see resume_path)
    overwrite: bool
    seed: int
    log_interval: int
    checkpoint_interval: int
    save_every: int
    eval_every: int
    no_eval: bool
    backend: str
    device: str
    skip_bad: bool
    no_verify_weights: bool
    val_list: str | None
    tensorboard: bool
    synthetic: bool
    stop_after_steps: int | None
    no_dropout: bool
    demo: bool  # no arguments: the embedded demo
    # -- model options (None: the label's own)
    activation: str | None
    activation_param: float | None
    weights_convention: str | None
    bn_eps: float | None
    dilate_first_conv: bool

    @property
    def run_dir(self) -> Path:
        return Path(self.output) / self.label

    @property
    def resume_path(self) -> Path | None:
        """The checkpoint --resume names (``auto``: <run>/last.pt), or None."""
        return self.run_dir / "last.pt" if self.resume == "auto" else (Path(self.resume) if self.resume else None)


def config(args: argparse.Namespace, *, label: str, dataset: str, task: str) -> TrainConfig:
    """The run's :class:`TrainConfig` from the parsed flags: the one place where a flag left out gets its task's
    default (:data:`TASK_DEFAULTS`) or its phase's split."""
    d = TASK_DEFAULTS[task]
    given = vars(args)
    values = {f.name: given[f.name] for f in fields(TrainConfig) if f.name in given}
    values.update(
        split=args.split or ("train" if args.phase == "train" else "val"),
        batch_images=args.batch_images or d.batch_images,
        eval_batch=args.batch_images if task == "cls" and args.phase == "val" and args.batch_images else d.eval_batch,
        crop_size=args.crop_size or d.crop_size,
        base_lr=d.base_lr if args.base_lr is None else args.base_lr,
        weight_decay=d.weight_decay if args.weight_decay is None else args.weight_decay,
        stop_epoch=min(args.stop_epoch or args.to_epoch, args.to_epoch),
        test_scales=args.test_scales or d.test_scales,
        bn_stats=d.bn_stats if args.bn_stats == "auto" else args.bn_stats,
    )
    return TrainConfig(label=label, dataset=dataset, task=task, flags=dict(given), **values)
