"""Data parallelism over tasks with torch.distributed (launched by torchrun or by `mamlpp train`, launch.py).

Every process samples the same meta-batch (sampling is index-addressed and cheap), keeps its
contiguous share of the tasks, and the meta-gradient is all-reduced explicitly after backward:
functional inner loops and DistributedDataParallel's hooks do not mix. Evaluation tasks are split
the same way and gathered. Only rank 0 writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .config import ConfigError


# Set by launch.py in the processes `mamlpp train` starts itself: why it split the run (else: torchrun).
LAUNCH_REASON = "MAMLPP_PROCESSES_REASON"


@dataclass(frozen=True)
class Shard:
    """The part of a meta-batch that one meta_loss call sees: a chunk of tasks, of this process's share.

    offset: global index of the part's first task; total: tasks in the whole meta-batch (None: the
    part is the whole). carry: whether the part's new state carries the state it was given (the
    meta-batch's first part does); the other parts return only what they add to it (running
    statistics: their tasks' terms; zeros elsewhere), and the trainer sums the parts' states over
    chunks and processes, so a meta-batch gives the same state however it is split. generator: the
    meta-batch's own CPU generator, started from the same seed in every part, for numbers drawn for
    the whole meta-batch and sliced to the part (methods.base.task_uniforms); None: torch's global one.
    """
    offset: int = 0
    total: Optional[int] = None
    carry: bool = True
    generator: Optional[torch.Generator] = None

    def combine(self, losses: torch.Tensor, reduction: str) -> torch.Tensor:
        """The part's share of the meta-loss: the parts' shares (over chunks and processes) sum to it."""
        return losses.sum() if reduction == "sum" else losses.sum() / (self.total or losses.numel())


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def share(self, count: int) -> tuple[int, int]:
        """[lo, hi) of `count` items that this process handles: contiguous, sizes differ by <= 1."""
        return count * self.rank // self.world, count * (self.rank + 1) // self.world

    def all_reduce_grads(self, tensors: list[torch.Tensor]) -> None:
        """Sum gradients over processes in one flat buffer (one collective, not one per tensor)."""
        if self.active:
            grads = self.all_reduce_flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in tensors])
            for p, g in zip(tensors, grads):
                p.grad = g

    def all_reduce_flat(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors summed over processes, through one flat buffer (one collective, not one per tensor)."""
        if not self.active or not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        sizes = [t.numel() for t in tensors]
        return [part.view_as(t).to(t.dtype) for part, t in zip(flat.split(sizes), tensors)]

    def gather(self, t: torch.Tensor, count: int) -> torch.Tensor:
        """Concatenate every process's share (along dim 0) of `count` items, in rank order."""
        if not self.active:
            return t
        largest = max(hi - lo for lo, hi in (Dist(r, self.world).share(count) for r in range(self.world)))
        padded = torch.zeros((largest, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        sizes = [hi - lo for lo, hi in (Dist(r, self.world).share(count) for r in range(self.world))]
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def select_device(name: str) -> torch.device:
    """train.device: 'auto' (CUDA when there is one), 'cpu' or 'cuda'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
    return torch.device(name)


def dist_from_env() -> Dist:
    """This process's rank and the world size as torchrun sets them (one process otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Dist(int(os.environ["RANK"]), world) if world > 1 else Dist()


def init_from_env(device: str) -> tuple[Dist, torch.device]:
    """(Dist, device) for this process: one process alone, or a torchrun rank (NCCL on GPUs, gloo on CPUs)."""
    if not dist_from_env().active:
        return Dist(), select_device(device)
    world, rank, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def shutdown(clean: bool = True) -> None:
    """Leave the process group, all ranks together: a rank that tears gloo down while its peer still
    talks to it, or exits without leaving, can abort ("terminate called without an active exception").
    clean=False (after an error) skips the barrier, which a failed peer would never reach."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
