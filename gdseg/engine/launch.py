"""Start one training process per device, on one or many machines, or join torchrun's.

``launch(fn, num_gpus, num_machines, machine_rank, dist_url, args)`` mirrors detectron2's
launcher and the published flags. Three cases:

- torchrun (``RANK``/``WORLD_SIZE`` in the environment): the processes exist already; we only
  initialize the process group from ``env://`` and call ``fn``.
- world size 1: call ``fn`` in this process, no process group, no DDP.
- otherwise: spawn ``num_gpus`` processes with ``torch.multiprocessing``. On a machine without
  GPUs the same flags start that many CPU processes talking over gloo.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import distributed as comm

logger = logging.getLogger(__name__)

__all__ = ["default_backend", "find_free_port", "launch"]


def default_backend() -> str:
    """NCCL when this machine has a GPU, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def find_free_port() -> int:
    """A TCP port that is free right now on this machine (for single-machine runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    main_func: Callable[..., Any],
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: Sequence[Any] = (),
    backend: str | None = None,
) -> None:
    """Run ``main_func(*args)`` in every training process.

    Args:
        main_func: the per-process entry point.
        num_gpus_per_machine: processes per machine (GPUs, or CPU processes without GPUs).
        num_machines: number of machines.
        machine_rank: index of this machine (0 is the one hosting ``dist_url``).
        dist_url: rendezvous URL, e.g. ``tcp://10.0.0.1:29500``; ``None`` or ``"auto"`` picks a
            free local port (single machine only).
        args: positional arguments of ``main_func``.
        backend: ``"nccl"`` or ``"gloo"``; default: NCCL with GPUs, gloo without.
    """
    backend = backend or default_backend()
    if comm.env_launched():
        _init_from_env(backend)
        try:
            main_func(*args)
        finally:
            comm.destroy_process_group()
        return

    if num_gpus_per_machine < 1 or num_machines < 1:
        raise ValueError(
            f"--num-gpus and --num-machines must be >= 1; got {num_gpus_per_machine} and "
            f"{num_machines}."
        )
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"--machine-rank {machine_rank} must be in [0, {num_machines - 1}].")
    if backend == "nccl" and num_gpus_per_machine > torch.cuda.device_count():
        raise ValueError(
            f"--num-gpus {num_gpus_per_machine} but this machine has "
            f"{torch.cuda.device_count()} GPU(s)."
        )
    world_size = num_gpus_per_machine * num_machines
    if world_size == 1:
        main_func(*args)
        return

    if dist_url in (None, "", "auto"):
        if num_machines > 1:
            raise ValueError("--dist-url is required with --num-machines > 1 (tcp://HOST:PORT).")
        dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    if num_machines > 1 and dist_url.startswith("file://"):
        logger.warning("file:// rendezvous across machines needs a shared file system.")

    mp.start_processes(
        _worker,
        nprocs=num_gpus_per_machine,
        args=(
            main_func,
            world_size,
            num_gpus_per_machine,
            machine_rank,
            backend,
            dist_url,
            tuple(args),
        ),
        daemon=False,
        start_method="spawn",
    )


def _worker(
    local_rank: int,
    main_func: Callable[..., Any],
    world_size: int,
    num_gpus_per_machine: int,
    machine_rank: int,
    backend: str,
    dist_url: str,
    args: tuple,
) -> None:
    rank = machine_rank * num_gpus_per_machine + local_rank
    if backend == "gloo" and "OMP_NUM_THREADS" not in os.environ:
        # CPU processes share the cores; without this each one starts a thread per core and
        # they slow each other down (torchrun makes the same choice).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_gpus_per_machine))
    try:
        comm.init_process_group(
            backend, dist_url, world_size, rank, local_rank, num_gpus_per_machine
        )
    except Exception as e:
        raise RuntimeError(f"Process group initialization failed at {dist_url}: {e}") from e
    try:
        comm.synchronize()
        main_func(*args)
    finally:
        comm.destroy_process_group()


def _init_from_env(backend: str) -> None:
    """Join a process group set up by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR)."""
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build.")
    comm.init_process_group(backend, "env://", world_size, rank, local_rank, local_world_size)
