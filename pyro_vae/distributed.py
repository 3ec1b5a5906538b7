"""Training on several processes with ``torch.distributed`` (``torchrun``).

``pyro-vae train CONFIG`` run under ``torchrun --nproc_per_node N`` (one
machine) or ``torchrun --nnodes M --nproc_per_node N --rdzv-endpoint HOST:PORT``
(several) trains data-parallel: every rank draws the same permutation of the
epoch, each global batch of ``train.batch_size`` is split between the ranks,
each rank's gradient of its part's summed loss is all-reduced (summed), so
every rank applies the gradient of the whole global batch -- what one process
would apply -- and the parameters stay identical.  The loss, the stop
requests (SIGINT / SIGTERM) and the epoch's metrics are reduced with them, so
a NaN or a signal on any rank stops every rank at the same step.  Random
numbers differ per rank (the latent samples, dynamic binarization).  Rank 0
alone writes the run directory and evaluates.  NCCL on GPUs (one per rank,
``LOCAL_RANK``), gloo on CPUs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from pyro_vae.errors import ConfigError


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world_size`` training processes."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # where the backend reduces: this rank's GPU for NCCL

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch's ``index``."""
        return torch.tensor_split(index, self.world_size)[self.rank] if self.active else index

    def all_reduce_sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum ``tensors`` over the ranks, in place, in one collective (on
        :attr:`device`, wherever each tensor lives: NCCL reduces CUDA tensors only)."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1).to(self.device, torch.float64) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_ranks(device: torch.device) -> Ranks:
    """Join the process group that ``torchrun`` set up (``WORLD_SIZE`` > 1 in
    the environment) for training on ``device``: NCCL on this rank's GPU
    (``LOCAL_RANK``) when it is a CUDA device, gloo when it is the CPU -- also
    on a machine that has GPUs but trains on its CPUs; a plain run is a world
    of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device.type == "cuda":
            visible = torch.cuda.device_count()
            if local_rank >= visible:
                raise ConfigError(
                    f"train.device = {device.type!r} with {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes on "
                    f"this node, but it has {visible} CUDA device(s) and NCCL needs one per process: start "
                    f"torchrun with --nproc_per_node {visible} or fewer, or train on the CPUs with train.device = 'cpu'")
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    reduce_on = torch.device("cuda", local_rank) if device.type == "cuda" else torch.device("cpu")
    return Ranks(dist.get_rank(), dist.get_world_size(), reduce_on)
