"""torchrun / DDP helpers. Single-process runs work without any of this being initialized."""
import os

import torch
import torch.distributed as dist

from clock_deploy.errors import UserError


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main():
    return rank() == 0


def init_from_env(device="auto"):
    """Initialize the process group when launched by torchrun; return the torch.device to use.

    NCCL when this process has a GPU, gloo on CPU (also what the CPU tests use).
    """
    device = resolve_device(device)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not is_distributed():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def resolve_device(device):
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}' was requested but no CUDA GPU is available (use device=cpu)")
    return device


def barrier():
    if is_distributed():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor):
    if is_distributed():
        value = value.clone()
        dist.all_reduce(value)
        value /= world_size()
    return value


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (e.g. the metrics only rank 0 computes)."""
    if is_distributed():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        obj = box[0]
    return obj


def cleanup():
    if is_distributed():
        dist.destroy_process_group()
