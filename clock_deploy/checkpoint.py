"""Checkpoints: written atomically, loaded with weights_only=True, carrying their config and a checksum.

A checkpoint holds only tensors and plain Python containers, so loading it never
runs code from the file. Its checksum (sha256 over every tensor and value) is checked on
every read: Detector.load, export, resume, the teacher of a distillation.
"""
import hashlib
import logging
import os
import random

import numpy as np
import torch

from clock_deploy import __version__
from clock_deploy.config import ConfigError, from_dict, to_dict
from clock_deploy.errors import UserError
from clock_deploy.io import torch_load, torch_save
from clock_deploy.models.build import build_model

FORMAT = "clock-deploy-checkpoint-v1"
log = logging.getLogger(__name__)


def rng_state():
    """Every RNG the training loop draws from, as tensors / plain lists (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate((state["python_version"], tuple(state["python"]), None))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, model, cfg, classes, epoch, iteration, metrics=None, **extra_state):
    """Write model weights + config (+ optimizer etc. passed as extra_state) atomically."""
    ckpt = {
        "format": FORMAT,
        "version": __version__,
        "arch": cfg.model.arch,
        "classes": list(classes),
        "config": to_dict(cfg),
        "model": model.state_dict(),
        "epoch": epoch,
        "iteration": iteration,
        "metrics": metrics or {},
        "rng": rng_state(),
    }
    ckpt.update({k: v for k, v in extra_state.items() if v is not None})
    ckpt["checksum"] = content_sha256(ckpt)
    torch_save(ckpt, path)


def content_sha256(ckpt):
    """sha256 over everything a checkpoint holds but its checksum: every tensor's name, dtype, shape and
    bytes, and every plain value, in a fixed order. A flipped bit anywhere in the weights, the optimizer
    state or the config changes it."""
    digest = hashlib.sha256()
    _hash_value(digest, {k: v for k, v in ckpt.items() if k != "checksum"})
    return digest.hexdigest()


def _hash_value(digest, value):
    if torch.is_tensor(value):
        tensor = value.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"T{tensor.dtype}{tuple(value.shape)}:".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}:".encode())
        for key in sorted(value, key=repr):
            digest.update(f"{key!r}=".encode())
            _hash_value(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}:".encode())
        for item in value:
            _hash_value(digest, item)
    else:
        digest.update(f"V{value!r};".encode())


def read_checkpoint(path, map_location="cpu", verify=True):
    """Load a checkpoint dict safely, with a clear error for missing / corrupt / foreign / damaged files;
    verify: also check its checksum (one warning for a checkpoint written before checksums existed)."""
    path = os.fspath(path)
    ckpt = torch_load(path, "checkpoint", map_location=map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a clock-deploy checkpoint (expected a file written by "
                        f"`clock-deploy train` / `distill`)")
    _check_structure(ckpt, path)
    if verify:
        _verify_checksum(ckpt, path)
    return ckpt


def _is_state_dict(value):
    return isinstance(value, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in value.items())


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# key -> (check, what it must be); "ema" is optional
STRUCTURE = {
    "arch": (lambda v: isinstance(v, str), "a model family name"),
    "classes": (lambda v: isinstance(v, list) and v and all(isinstance(c, str) for c in v), "a list of class names"),
    "config": (lambda v: isinstance(v, dict), "a config mapping"),
    "model": (_is_state_dict, "a mapping of tensor names to tensors"),
    "epoch": (_is_count, "a count"),
    "iteration": (_is_count, "a count"),
    "metrics": (lambda v: isinstance(v, dict), "a mapping"),
    "ema": (_is_state_dict, "a mapping of tensor names to tensors"),
}


def _check_structure(ckpt, path):
    """The keys everything after loading reads are there and of the right kind (a file with the right
    format tag can still be hand-made or damaged)."""
    for key, (ok, what) in STRUCTURE.items():
        if key not in ckpt:
            if key != "ema":
                raise UserError(f"{path}: damaged checkpoint: key '{key}' is missing")
        elif not ok(ckpt[key]):
            raise UserError(f"{path}: damaged checkpoint: '{key}' must be {what}, got {type(ckpt[key]).__name__}")


_warned = set()  # checkpoints already reported as having no checksum in this process


def _verify_checksum(ckpt, path):
    if "checksum" not in ckpt:
        if path not in _warned:
            _warned.add(path)
            log.warning(f"{path}: no checksum (written by an older clock-deploy): its contents cannot be checked")
        return
    if ckpt["checksum"] != content_sha256(ckpt):
        raise UserError(f"{path}: checksum mismatch: the file changed after it was written (a damaged copy or a "
                        "disk error); use another copy")


def checkpoint_config(ckpt, path="checkpoint"):
    try:
        return from_dict(ckpt["config"], where=os.fspath(path))
    except ConfigError as e:
        raise UserError(f"{path}: its saved config does not match this version of clock-deploy: {e}") from None


def load_model(path, map_location="cpu", use_ema=True):
    """Build the model a checkpoint was trained with and load its weights (EMA weights when present).

    Returns (model in eval mode, config, checkpoint dict).
    """
    ckpt = read_checkpoint(path, map_location)
    cfg = checkpoint_config(ckpt, path)
    cfg.model.backbone.weights = None  # the checkpoint already holds the backbone weights
    model = build_model(cfg.model)
    state = ckpt["ema"] if use_ema and "ema" in ckpt else ckpt["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit a {cfg.model.arch} model built from its config: "
                        f"{str(e).splitlines()[0]}") from None
    model.eval()
    return model, cfg, ckpt
