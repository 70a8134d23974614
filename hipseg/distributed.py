"""Data-parallel set-up under ``torchrun``: process group, device per rank, the collectives training needs.

``torchrun`` (torch.distributed.elastic) starts one process per device and sets
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`setup` reads them and joins the group (gloo on CPU, NCCL on CUDA with device
``cuda:LOCAL_RANK``). Outside torchrun it returns a one-process context and touches
nothing. The pattern is torch's own DDP tutorial and nnU-Net v2's ``run_training``:
one process per device, every rank computes, rank 0 alone writes.

A rank that dies: torchrun's agent stops the others and reports the failed rank's
error (``hipseg.cli.main`` is wrapped in ``record``, so its traceback is in the
report); a rank stuck in a collective gives up after ``HIPSEG_DIST_TIMEOUT`` seconds
(default 600) instead of hanging.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hipseg.errors import ConfigError

TIMEOUT_ENV = "HIPSEG_DIST_TIMEOUT"


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank, local rank, world size, its device, whether it set up the group."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, metrics, curves and run.json."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """True inside a multi-process torchrun (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 of a torchrun group, or a process outside torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(device: torch.device) -> Context:
    """Join the torchrun process group; a one-process Context outside torchrun.

    Parameters
    ----------
    device
        The device training asked for; on CUDA each rank takes ``cuda:LOCAL_RANK``.
    """
    if not launched():
        return Context(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU (this node has "
                              f"{torch.cuda.device_count()}); start at most that many processes "
                              "per node (torchrun --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                **({"device_id": device} if device.type == "cuda" else {}))
    return Context(rank, local_rank, world_size, device, owns)


def teardown(context: Context) -> None:
    """Destroy the process group if this process set it up (``context.owns_group``); else nothing."""
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: Context) -> None:
    """Wait until every rank gets here (``torch.distributed.barrier``); a no-op in one process."""
    if context.active:
        dist.barrier()


def broadcast_object(context: Context, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (pickled; for small things: splits, decisions, errors)."""
    if not context.active:
        return value
    box = [value if context.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_float(context: Context, value: float) -> float:
    """Rank 0's number on every rank: one small collective, cheap enough to run every step."""
    if not context.active:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device(context))
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def mean_over_ranks(context: Context, value: float) -> float:
    """Mean of ``value`` over all ranks (float64 all-reduce), on every rank; ``value`` in one process.

    A collective: every rank must call it, in the same order as the other collectives.
    """
    if not context.active:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device(context))
    dist.all_reduce(tensor)
    return float(tensor.item()) / context.world_size


def gather_objects(context: Context, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not context.active:
        return [value]
    out: list[Any] = [None] * context.world_size
    dist.all_gather_object(out, value)
    return out


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers: equal on every rank when DDP kept them in sync."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _collective_device(context: Context) -> torch.device:
    return context.device if context.device.type == "cuda" else torch.device("cpu")
