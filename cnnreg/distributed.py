"""Data-parallel training through PyTorch's own torch.distributed.

cnnreg does not launch processes itself: ``torchrun`` (or ``cnnreg run
--nproc N``, which calls torch.distributed.run) starts one process per
device and sets the usual environment variables; :func:`setup` joins the
process group they describe. Without them, a run is a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from cnnreg.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job; a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_setting: str) -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_setting in ("auto", "cuda") or device_setting.startswith("cuda")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices; "
                            "start at most one process per GPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                      device_id=device if use_cuda else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def wrap(model: nn.Module, dist: DistInfo) -> nn.Module:
    """DistributedDataParallel around ``model`` when there are several processes."""
    if not dist.enabled:
        return model
    device_ids = [dist.device.index] if dist.device is not None and dist.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def all_reduce(tensor: torch.Tensor, dist: DistInfo) -> None:
    """Sum ``tensor`` over every process, in place (a no-op for one process)."""
    if dist.enabled:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)


def barrier(dist: DistInfo) -> None:
    if dist.enabled:
        torch_dist.barrier()


def teardown() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
