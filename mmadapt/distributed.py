"""Process-group set-up for DeepSpeed ranks, or one process without a launcher."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist


def single_process_env() -> None:
    """Give ``python train.py`` the environment a launcher would set (rank 0 of 1)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def env_rank() -> int:
    """This process's rank from the environment (usable before the process group exists)."""
    return int(os.environ.get("RANK", "0"))


def init(threads: int | None) -> None:
    """Start the process group: NCCL on GPUs, gloo on CPU; set CPU threads per rank."""
    import deepspeed

    single_process_env()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_ranks))
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        _unlink_shm_allreduce_buffer()


def _unlink_shm_allreduce_buffer() -> None:
    """DeepSpeed's CPU all-reduce creates a ~69 MB /dev/shm segment per rank when all ranks
    share this host (the launcher sets ``LOCAL_SIZE``) and never unlinks it, so every launch
    used to leave them in RAM until reboot. When ``init_distributed`` has returned on every
    rank, every rank has mapped every segment; the name is no longer needed, and unlinking it
    now frees the memory when the ranks exit, however they exit."""
    dist.barrier()
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{dist.get_rank()}").unlink(
        missing_ok=True
    )


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def all_sum(values: list[float]) -> list[float]:
    """Sum floats over ranks (float64 so token counts stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()
