"""One stage trained by several processes, data parallel: which process this is, and
the few collective operations the training loop needs.

kdrun runs under ``torchrun --nproc_per_node=N -m kdrun ...`` or as a Slurm job of N
tasks (``hydra.launcher.tasks_per_node``). Every process runs the same pipeline; each
takes its contiguous shard of every global batch, and the gradients are summed over the
processes after the backward pass, the loss of each shard weighted by its share of the
batch: the same global batch and the same maths as one process. Only rank 0 writes.

Gradients are summed by one all-reduce of a flat buffer after the backward pass rather
than by wrapping the model in DistributedDataParallel: the loss's own learned parts (a
FitNet regressor) are summed with the model's, a short last batch may leave a process
without rows, and a cohort or a compiled model needs no special case. What it gives up
is DDP's overlap of the all-reduce with the backward pass, which matters only when
communication is slow next to compute (large models over slow links).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def parallel(self) -> bool:
        return self.size > 1

    @property
    def writer(self) -> bool:
        """Rank 0: the one process that writes files."""
        return self.rank == 0

    def shard(self, rows: int) -> slice:
        """This process's contiguous share of ``rows`` (the first ranks take one more
        row when they do not divide; a rank may get none)."""
        base, extra = divmod(rows, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))


ALONE = World()
_world = ALONE


def world() -> World:
    return _world


def launched_world() -> World:
    """The processes this one was started among: by torchrun (RANK, WORLD_SIZE), or as
    one task of a job submitted by submitit (Slurm, or its local executor); else this
    process alone."""
    if os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local"):  # a job of submitit's
        import submitit
        from submitit.helpers import TorchDistributedEnvironment

        if submitit.JobEnvironment().num_tasks > 1:  # its tasks: address, port, ranks
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return ALONE
    return World(rank=int(os.environ["RANK"]), size=size,
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                 local_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(size))))


def join(launched: World, backend: str, timeout_min: float) -> World:
    """Join the processes this one was started among (``launched_world()``)."""
    global _world
    if launched.parallel and not dist.is_initialized():
        if backend == "nccl":  # before the first collective: each process its own GPU
            torch.cuda.set_device(launched.local_rank)
        dist.init_process_group(backend, rank=launched.rank, world_size=launched.size,
                                timeout=datetime.timedelta(minutes=timeout_min))
    _world = launched
    return launched


def leave(together: bool = True) -> None:
    """Leave the processes: ``together`` (after a normal end), once every one got here,
    so that none tears its connections down while another still talks through them."""
    global _world
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
    _world = ALONE


def backend() -> str | None:
    """The backend the processes talk through (gloo, nccl), or None for one process."""
    return dist.get_backend() if _world.parallel and dist.is_initialized() else None


def barrier() -> None:
    if _world.parallel:
        dist.barrier()


def from_writer(value):
    """Rank 0's ``value`` (any picklable object), on every process."""
    if not _world.parallel:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_gradients(params: list[nn.Parameter], batch_rows: int) -> None:
    """Sum every parameter's gradient over the processes, in one flat all-reduce. When
    the batch has fewer rows than there are processes (a short last batch), those
    without rows add zeros and take rank 0's pattern of missing gradients (a parameter
    that no loss term reached has none, and an optimiser skips it)."""
    if not _world.parallel or not params:
        return
    if batch_rows < _world.size:
        reached = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8,
                               device=params[0].device)
        dist.broadcast(reached, src=0)
        for p, has in zip(params, reached.tolist()):
            if has and p.grad is None:
                p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def over_processes(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``values`` reduced (``op``: sum, max or min) over the processes."""
    if not _world.parallel:
        return values
    values = values.clone()
    dist.all_reduce(values, op=OPS[op])
    return values


def gather_rows(part: torch.Tensor, rows: int) -> torch.Tensor:
    """The processes' shards of a tensor of ``rows`` rows (``World.shard``), put back in
    order on every process."""
    if not _world.parallel:
        return part
    longest = -(-rows // _world.size)
    padded = part.new_zeros((longest, *part.shape[1:]))
    padded[:len(part)] = part
    pieces = [torch.empty_like(padded) for _ in range(_world.size)]
    dist.all_gather(pieces, padded)
    shards = [World(rank=r, size=_world.size).shard(rows) for r in range(_world.size)]
    return torch.cat([piece[:s.stop - s.start] for piece, s in zip(pieces, shards)])


def share_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (batch norm's running statistics) on every process, as
    DistributedDataParallel does: each process updated them from its own shard."""
    if not _world.parallel:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
