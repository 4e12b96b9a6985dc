"""`clock-deploy train` and `clock-deploy distill`."""
import contextlib
import logging
import os
import random

import click
import numpy as np
import torch

from clock_deploy.checkpoint import load_model
from clock_deploy.config import dump, load_config
from clock_deploy.data.dataset import build_dataset
from clock_deploy.data.kitti import class_names
from clock_deploy.distill import build_distiller
from clock_deploy.errors import UserError
from clock_deploy.eval.units import metrics_text
from clock_deploy.lock import output_lock
from clock_deploy.models.build import build_criterion, build_model
from clock_deploy.training import distributed as dist
from clock_deploy.training.pretrained import load_pretrained
from clock_deploy.training.trainer import Trainer

log = logging.getLogger(__name__)
overrides_argument = click.argument("overrides", nargs=-1, metavar="[KEY.SUB=VALUE]...")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _datasets(cfg):
    train_set = build_dataset(cfg.data, cfg.data.train_split, train=True)
    val_set = build_dataset(cfg.data, cfg.data.val_split, train=False) if cfg.train.eval_every >= 0 else None
    if len(train_set.classes) != cfg.model.num_classes:
        raise UserError(f"model.num_classes={cfg.model.num_classes} but data.classes={cfg.data.classes} "
                        f"has {len(train_set.classes)} classes")
    return train_set, val_set


def load_teacher(cfg, device):
    """The frozen teacher for distillation, checked against the student's classes.

    Loading it leaves the training RNG stream as in plain training (paired A/B runs of a seed).
    """
    if not cfg.distill.teacher:
        raise UserError("distill.method needs a teacher: set distill.teacher to a checkpoint from `clock-deploy train`")
    with torch.random.fork_rng(devices=[]):  # building the model draws its (then overwritten) init
        teacher, teacher_cfg, ckpt = load_model(cfg.distill.teacher, map_location=device)
    if ckpt["classes"] != class_names(cfg.data.classes):
        raise UserError(f"{cfg.distill.teacher}: teacher was trained on classes {ckpt['classes']} but the student "
                        f"uses data.classes={cfg.data.classes} {class_names(cfg.data.classes)}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval()


RUN_FILES = ("last.pt", "metrics.json")        # a folder holding one of these holds a run
REPLACED_FILES = RUN_FILES + ("best.pt", "log.jsonl")  # what --overwrite removes, so nothing of the old run stays


def claim_output(output_dir, resume=False, overwrite=False):
    """A folder that holds a run is continued (resume) or replaced (overwrite), never silently."""
    held = [f for f in RUN_FILES if os.path.isfile(os.path.join(output_dir, f))]
    if not held or resume:
        return
    if not overwrite:
        raise UserError(f"{output_dir} holds a run ({', '.join(held)}): pass --resume to continue it or "
                        "--overwrite to replace it (or choose another --output-dir)")
    for name in REPLACED_FILES:
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            os.remove(path)
    log.warning(f"{output_dir}: replacing the run that was there (--overwrite)")


def run_training(cfg, resume=False, progress=True, overwrite=False):
    """Train (or distill, when cfg.distill.method != 'none') as configured; return final metrics.

    A folder that already holds a run needs resume (continue it) or overwrite (replace it); a folder
    another process is writing is refused (lock.py)."""

    # torchrun: rank 0 writes the outputs and holds the lock (the process group is not up yet)
    lock = (output_lock(cfg.output_dir, "distill" if cfg.distill.method != "none" else "train")
            if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext())
    with lock:
        if os.environ.get("RANK", "0") == "0":
            claim_output(cfg.output_dir, resume, overwrite)
        return _run_training(cfg, resume, progress)


def _run_training(cfg, resume, progress):
    device = dist.init_from_env(cfg.device)
    try:
        seed_everything(cfg.seed)
        train_set, val_set = _datasets(cfg)
        model = build_model(cfg.model)
        if cfg.model.pretrained and not resume:  # a resumed run holds its own weights
            lines = load_pretrained(model, cfg.model, train_set.classes)
            if dist.is_main():
                log.info("\n".join(lines))
        criterion = build_criterion(cfg.loss, cfg.model)
        distiller = None
        if cfg.distill.method != "none":
            teacher = None if cfg.distill.method == "gt_denoise" else load_teacher(cfg, device)  # the control has none
            distiller = build_distiller(cfg, teacher, model)
        # the checkpoint is checked against the config (Trainer) before config.yaml is replaced
        trainer = Trainer(cfg, model, criterion, train_set, val_set, distiller=distiller, device=device,
                          resume=resume, progress=progress)
        if dist.is_main():
            dump(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        return trainer.fit()
    finally:
        dist.cleanup()


def _command(name, help_text):
    @click.command(name=name, help=help_text)
    @click.option("--cfg", "cfg_path", required=True, type=click.Path(dir_okay=False),
                  help="YAML config (configs/demo/*.yaml, configs/kitti/*.yaml).")
    @click.option("--resume", is_flag=True, help="Continue from <output_dir>/last.pt exactly where it stopped.")
    @click.option("--overwrite", is_flag=True,
                  help="Replace the run already in the output folder (its last.pt, best.pt, metrics.json and "
                       "log.jsonl are deleted first). Without --resume or --overwrite a folder holding a run is "
                       "refused.")
    @click.option("--output-dir", default=None, help="Override output_dir from the config.")
    @click.option("--device", default=None, help="auto | cpu | cuda | cuda:N (overrides the config).")
    @overrides_argument
    def command(cfg_path, resume, overwrite, output_dir, device, overrides):
        extra = list(overrides)
        if output_dir:
            extra.append(f"output_dir={output_dir}")
        if device:
            extra.append(f"device={device}")
        cfg = load_config(cfg_path, extra)
        if name == "train" and cfg.distill.method != "none":
            raise UserError(f"{cfg_path}: distill.method={cfg.distill.method}; use `clock-deploy distill` "
                            f"for distillation configs")
        if resume and overwrite:
            raise UserError("--resume and --overwrite exclude each other: continue the run or replace it")
        metrics = run_training(cfg, resume=resume, overwrite=overwrite)
        click.echo(f"done: {cfg.output_dir}/last.pt {metrics_text(metrics)}".rstrip())
    return command


train = _command("train", "Train a teacher or a baseline student: clock-deploy train --cfg configs/demo/teacher.yaml")
distill = _command("distill", "Distill a student from distill.teacher with distill.method "
                              "(clock | kd_detr | fgd | gt_denoise | none; gt_denoise needs no teacher): "
                              "clock-deploy distill --cfg configs/demo/distill.yaml")
