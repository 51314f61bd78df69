"""torchrun / DDP setup: one process per GPU (or CPU processes with gloo), rank-0 logging."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """RANK/WORLD_SIZE/LOCAL_RANK from torchrun, or SLURM_* equivalents; a single process otherwise."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


def init(device_kind: str) -> DistInfo:
    info = env_info()
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return info


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank if any rank says so (e.g. a NaN loss)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def global_mean_count(count: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a per-rank count (e.g. valid pixels), at least 1: a per-rank loss sum divided by it,
    then averaged over ranks by DDP, is the sum over all ranks divided by the total count, i.e. what one process
    computes on the whole global batch. One process: ``count`` itself."""
    c = count.detach().to(torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(c)
        c = c / dist.get_world_size()
    return c.clamp(min=1)


def reduce_step_stats(loss: torch.Tensor, hits: torch.Tensor, device: torch.device) -> tuple[float, torch.Tensor]:
    """(loss averaged over ranks, (correct, counted) summed over ranks) of one step, for the log and
    ``summary.csv`` (every rank gets the same numbers)."""
    if not (dist.is_available() and dist.is_initialized()):
        return loss.item(), hits
    t = torch.cat([loss.detach().reshape(1).to(device, torch.float64), hits.to(device, torch.float64)])
    dist.all_reduce(t)
    t = t.cpu()
    return (t[0] / dist.get_world_size()).item(), t[1:]
