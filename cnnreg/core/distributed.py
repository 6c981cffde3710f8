"""Data-parallel training through PyTorch's own torch.distributed.

cnnreg does not launch processes itself: ``torchrun`` (or ``cnnreg run
--nproc N``, which calls torch.distributed.run) starts one process per
device and sets the usual environment variables; :func:`setup` joins the
process group they describe. Without them, a run is a single process.

What each rank does: ``data.batch_size`` is per rank (the global batch is
``world_size`` times it); each rank trains on its shard of one global,
per-epoch permutation; evaluation shards are exact (every sample counted
once) and all tallies are all-reduced, so every rank reads the same metrics.
Only rank 0 writes (run directory, checkpoints, logs) and draws progress;
stop decisions are rank 0's, broadcast (:func:`agree`).

Resuming: ``last.pt`` holds nothing rank-specific but the random states,
which are rank 0's; every rank restores them (all ranks also start from the
recipe's one seed, so random augmentation draws the same stream on every rank,
applied to different images). An end-of-epoch checkpoint resumes under any
world size: the next epoch's global permutation is the same, cut into the
new number of shards (with the per-rank batch size, the global batch and so
the trajectory change). A mid-epoch checkpoint counts its position in
per-rank batches and so resumes only under the world size that saved it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as torch_dist
from torch import nn

from cnnreg.core.errors import UserError


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


def sync_batchnorm(model: nn.Module, dist: DistInfo, enabled: bool) -> nn.Module:
    """``model`` with its BatchNorm layers synchronised across processes, when asked for and useful.

    torch's SyncBatchNorm computes batch statistics over every rank's part of
    the batch, so small per-GPU batches normalise like the global one. It
    runs only on accelerators (torch refuses CPU tensors under gloo), so on
    the CPU the option is an error rather than a silent no-op.
    """
    if not enabled or not dist.enabled:
        return model
    if dist.device is None or dist.device.type == "cpu":
        raise UserError("trainer.sync_batchnorm needs CUDA devices: torch's SyncBatchNorm does not run on the CPU "
                        "(gloo); set it to false for a CPU run")
    # The converted layers reuse the same parameter and buffer tensors, so an
    # optimizer built on the old ones stays valid and state dicts keep their keys.
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def agree(decision: str | None, dist: DistInfo) -> str | None:
    """Rank 0's ``decision`` on every rank (one small broadcast per call).

    Decisions that end a loop (early stopping) must be identical on every
    rank, or the ranks still training wait forever in their next all-reduce.
    The metrics they rest on are already all-reduced, but a callback may look
    at something rank-local (timings, its own RNG), so rank 0 decides.
    """
    if not dist.enabled:
        return decision
    box = [decision]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, dist: DistInfo) -> bool:
    """Whether ``flag`` is set on any process: one tiny all-reduce, so every
    rank must call it at the same point (the same step of the same epoch)."""
    if not dist.enabled:
        return flag
    box = torch.tensor([1 if flag else 0], dtype=torch.int32, device=dist.device or "cpu")
    torch_dist.all_reduce(box, op=torch_dist.ReduceOp.MAX)
    return bool(box.item())


def all_reduce(tensor: torch.Tensor, dist: DistInfo) -> None:
    """Sum ``tensor`` over every process, in place (a no-op for one process)."""
    if dist.enabled:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)


def barrier(dist: DistInfo) -> None:
    if dist.enabled:
        torch_dist.barrier()


def teardown() -> bool:
    """Leave the process group; whether there was one to leave."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
        return True
    return False


def end_worker_process(status: int) -> NoReturn:
    """End a torchrun worker that has left its group, without interpreter finalisation.

    Why: gloo's worker threads drop each finished collective's tensors a
    moment after the caller sees it done, and dropping a tensor that Python
    knows takes the GIL. If the interpreter is already finalising, the thread
    cannot have it and the process aborts ("terminate called without an
    active exception", SIGABRT) after a run that succeeded and saved
    everything; torchrun then reports the whole job failed. A core dump of
    such a rank showed exactly that (ProcessGroupGloo::runLoop destroying an
    AsyncAllreduceWork in take_gil while the main thread was in
    Py_FinalizeEx). destroy_process_group does not end those threads: DDP
    leaves references to the group that nothing collects (pytorch#179291
    describes the same crash). So the atexit handlers (logging, trackers,
    plugins' own) run here while Python is whole, the streams are flushed,
    and the process ends with os._exit, before any finalisation.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe must not turn success into a crash
            stream.flush()
    os._exit(status)
