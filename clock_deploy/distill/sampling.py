"""The side random stream the distillers draw their extra queries from."""
import contextlib
import hashlib

import torch


def side_seed(*integers):
    """A 64-bit seed from integers only (run seed, epoch, iteration, rank): the same on every CPU,
    thread count and instruction set, unlike anything computed in floating point from the data."""
    digest = hashlib.sha256(":".join(str(int(i)) for i in integers).encode())
    return int.from_bytes(digest.digest()[:8], "little")


@contextlib.contextmanager
def side_rng(seed, device):
    """Random draws inside come from a side stream seeded by `seed` and leave the global RNG as it was.

    The global stream also drives data augmentation and DINO's denoising noise, so a distilled
    run of a seed sees the same flips and noise as the plain run of that seed (paired A/B).
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
