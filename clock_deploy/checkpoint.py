"""Checkpoints: written atomically, loaded with weights_only=True, carrying their config.

A checkpoint holds only tensors and plain Python containers, so loading it never
runs code from the file.
"""
import os
import random

import numpy as np
import torch

from clock_deploy import __version__
from clock_deploy.config import ConfigError, from_dict, to_dict
from clock_deploy.errors import UserError
from clock_deploy.io import torch_load, torch_save

FORMAT = "clock-deploy-checkpoint-v1"


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
    torch_save(ckpt, path)


def read_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict safely, with a clear error for missing / corrupt / foreign files."""
    path = os.fspath(path)
    ckpt = torch_load(path, "checkpoint", map_location=map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a clock-deploy checkpoint (expected a file written by "
                        f"`clock-deploy train` / `distill`)")
    return ckpt


def checkpoint_config(ckpt, path="checkpoint"):
    try:
        return from_dict(ckpt["config"], where=os.fspath(path))
    except ConfigError as e:
        raise UserError(f"{path}: its saved config does not match this version of clock-deploy: {e}") from None


def load_model(path, map_location="cpu", use_ema=True):
    """Build the model a checkpoint was trained with and load its weights (EMA weights when present).

    Returns (model in eval mode, config, checkpoint dict).
    """
    from clock_deploy.models.build import build_model

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
