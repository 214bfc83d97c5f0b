"""Process-group helpers that are safe to call in a single, non-distributed process.

Everything here degrades to the one-process answer when ``torch.distributed`` is not
initialized, so library code can call ``get_rank()`` or ``all_reduce_dict()`` unconditionally.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

_LOCAL_RANK = 0
_LOCAL_WORLD_SIZE = 1


def is_initialized() -> bool:
    """Whether a process group is up (``False`` in a single plain process)."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_local_rank() -> int:
    """Rank of this process on its machine (selects the GPU)."""
    return _LOCAL_RANK if is_initialized() else 0


def get_local_world_size() -> int:
    return _LOCAL_WORLD_SIZE if is_initialized() else 1


def is_main_process() -> bool:
    """True on the process that writes files and logs (global rank 0)."""
    return get_rank() == 0


def synchronize() -> None:
    """Barrier across all processes; a no-op in one process."""
    if get_world_size() > 1:
        if dist.get_backend() == dist.Backend.NCCL and torch.cuda.is_available():
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def env_launched() -> bool:
    """Whether this process was started by torchrun (or another env:// launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_process_group(
    backend: str,
    init_method: str,
    world_size: int,
    rank: int,
    local_rank: int,
    local_world_size: int,
) -> None:
    """Initialize ``torch.distributed`` and remember the local rank.

    Args:
        backend: ``"nccl"`` (GPU) or ``"gloo"`` (CPU).
        init_method: a URL such as ``tcp://127.0.0.1:29500`` or ``env://``.
        world_size: total number of processes over all machines.
        rank: global rank of this process.
        local_rank: rank on this machine; with NCCL it selects ``cuda:local_rank``.
        local_world_size: processes on this machine.
    """
    global _LOCAL_RANK, _LOCAL_WORLD_SIZE
    _LOCAL_RANK, _LOCAL_WORLD_SIZE = local_rank, local_world_size
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend=backend, init_method=init_method, world_size=world_size, rank=rank
    )
    logger.info(
        "Process group up: rank %d/%d (%s, local rank %d)", rank, world_size, backend, local_rank
    )


def destroy_process_group() -> None:
    if is_initialized():
        dist.destroy_process_group()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP (or compiled) wrapper; the module itself otherwise."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def _reduce_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo only CPU ones.
    if is_initialized() and dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_dict(values: Mapping[str, float | torch.Tensor], average: bool = True) -> dict:
    """Sum (or average) a dict of scalars over all processes in one collective.

    Every process must pass the same keys. Returns plain Python floats.
    """
    keys = sorted(values)
    if not keys:
        return {}
    flat = torch.stack(
        [torch.as_tensor(values[k], dtype=torch.float64).detach().reshape(()).cpu() for k in keys]
    )
    if get_world_size() > 1:
        flat = flat.to(_reduce_device())
        dist.all_reduce(flat)
        if average:
            flat /= get_world_size()
    return dict(zip(keys, flat.cpu().tolist()))


def all_processes_agree(flag: bool) -> bool:
    """True only if ``flag`` is true on every process (one tiny collective)."""
    if get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


@torch.no_grad()
def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy every buffer (BatchNorm statistics) of ``module`` from process ``src`` to all.

    DDP does this at the start of each forward; the teacher update calls it first so that the
    EMA reads the same student statistics on every process. One collective per dtype.
    """
    if get_world_size() == 1:
        return
    device = _reduce_device()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buf in unwrap_model(module).buffers():
        by_dtype.setdefault(buf.dtype, []).append(buf)
    for bufs in by_dtype.values():
        flat = torch.cat([b.detach().reshape(-1).to(device) for b in bufs])
        dist.broadcast(flat, src=src)
        offset = 0
        for b in bufs:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from ``src`` to every process (identity in one process)."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, device=_reduce_device())
    return holder[0]
