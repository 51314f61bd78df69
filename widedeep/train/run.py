"""Process setup around the engine: devices, torchrun/DDP or ``--gpus`` spawning, the demo's dataset."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path

import torch

from widedeep.fileio import NoSpaceError

from . import checkpoint, distributed, runlock
from .cli import config, parse
from .engine import Context, TrainingError, build_model, evaluate, resolve, train
from .logs import setup_logging

log = logging.getLogger("widedeep.train")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank: int, argv: list[str], gpus: tuple[int, ...], port: int) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(len(gpus)),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        CUDA_VISIBLE_DEVICES=",".join(map(str, gpus)),
    )
    try:
        main(argv)
    except USER_ERRORS as e:  # one line from the process that hit it, as cli() does
        if "--debug" in argv:
            raise
        print(f"python -m widedeep.train (rank {local_rank}): error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


def cli(argv: list[str] | None = None) -> int:
    """``python -m widedeep.train``: runs :func:`main`; a usage or input error is one line and exit status 2
    (the traceback only with ``--debug``); Ctrl-C is exit status 130 after the resume hint, SIGTERM 143."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        with checkpoint.sigterm_as_interrupt():  # SIGTERM as Ctrl-C: checkpoint write finished, resume hint
            main(argv)
    except checkpoint.Terminated:
        return 143  # 128 + SIGTERM, what a shell reports for a process ended by it
    except KeyboardInterrupt:
        return 130
    except torch.multiprocessing.ProcessExitedException as e:  # --gpus: a spawned rank exited; it said why
        return e.exit_code if e.exit_code and e.exit_code > 0 else 1
    except USER_ERRORS as e:
        if "--debug" in argv:
            raise
        print(f"python -m widedeep.train: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


# What bad flags, files and data raise: all are reported as one line. ValueError covers the weights, label,
# checkpoint and data errors (WeightsMismatchError, ParamsFormatError, BadSampleError ...).
USER_ERRORS = (
    TrainingError,
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    NoSpaceError,
)


def _one_line(e: BaseException) -> str:
    from data_pipes.errors import BadSampleError

    text = str(e).strip() or type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: its last line is the message
        text = lines[-1].split(": ", 1)[-1] if ": " in lines[-1] else lines[-1]
    else:
        text = " ".join(lines)
    if isinstance(e, BadSampleError) or "BadSampleError" in str(e):
        text += " (--skip-bad skips unreadable samples and counts them)"
    return text


def main(argv: list[str] | None = None) -> dict:
    """Parse, set up the process (device, DDP; --gpus spawns one process per GPU first), run. The flags read here
    (--gpus, --device) place the process; the run itself reads the TrainConfig that ``_run`` builds."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    gpus = args.gpus or ()
    if gpus and not torch.cuda.is_available():
        # one rule for any --gpus list: without CUDA the seed's commands still run, as one CPU process
        # (--batch-images is global, so the recipe is unchanged)
        print(
            f"warning: --gpus {','.join(map(str, gpus))} ignored: no CUDA device here; running one process on the CPU",
            file=sys.stderr,
        )
        gpus = ()
    if len(gpus) > 1 and "RANK" not in os.environ:  # the seed's --gpus 0,1,2,3 in one command: one process per GPU
        torch.multiprocessing.spawn(_spawned, args=(argv, gpus, _free_port()), nprocs=len(gpus))
        return {}
    info = distributed.env_info()
    if args.device == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        try:
            kind = torch.device(args.device).type
        except RuntimeError:
            raise TrainingError(f"--device {args.device}: expected auto, cpu, cuda or cuda:N") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise TrainingError(f"--device {args.device}: no CUDA device here")
    if kind == "cuda":
        explicit = torch.device(args.device).index if args.device != "auto" else None
        index = info.local_rank if info.enabled else (gpus[0] if gpus else (explicit or 0))
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    info = distributed.init(kind)
    try:
        return _run(args, info, device)
    finally:
        distributed.shutdown()


def _run(args, info, device) -> dict:
    if args.data_root is None:
        raise TrainingError("--data-root is required (the dataset folder in the seed's layout)")
    label, dataset, task = resolve(args)
    cfg = config(args, label=label, dataset=dataset, task=task)
    # one live run per folder (rank 0 holds the lock), and a fresh training run never mixes with an old one
    lock = runlock.RunLock(cfg.run_dir).acquire() if info.is_main else None
    removed = []
    try:
        if cfg.phase == "train":
            removed = runlock.check_fresh(
                cfg.run_dir,
                Path(cfg.output),
                label,
                resume=bool(cfg.resume),
                overwrite=cfg.overwrite or cfg.demo,
                remove=info.is_main,
            )
        setup_logging(cfg.run_dir, info.is_main)
        if removed:
            log.info("--overwrite: removed the previous run's %s", ", ".join(p.name for p in removed))
        return _run_locked(Context(cfg, device, info))
    finally:
        if lock is not None:
            lock.release()


def _run_locked(ctx: Context) -> dict:
    cfg, info = ctx.cfg, ctx.dist
    if cfg.demo:
        log.info("no arguments: running the demo (python -m widedeep.train --help for the real flags)")
    if cfg.synthetic and info.is_main:
        from data_pipes.synthetic import write_synthetic

        # 5 segmentation classes (or 10 ILSVRC classes): learnable by a tiny net in about a minute of CPU time
        write_synthetic(
            cfg.dataset,
            cfg.data_root,
            num_train=64,
            num_val=16,
            size=(64, 112),
            seed=0,
            num_classes=10 if cfg.dataset == "ilsvrc" else 5,
        )
    distributed.barrier()
    torch.manual_seed(cfg.seed + info.rank)
    t0 = time.perf_counter()
    if cfg.phase == "val":
        if not cfg.weights:
            raise TrainingError("--phase val needs --weights")
        model = build_model(ctx)
        metrics = evaluate(ctx, model, split=cfg.split, save=True)
    else:
        metrics = train(ctx)
        if cfg.demo and info.is_main and metrics:
            log.info("demo finished in %.0f s: %s", time.perf_counter() - t0, cfg.run_dir)
    return metrics
