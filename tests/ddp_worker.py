"""Run by test_engine.py under torchrun: 2 CPU ranks (gloo) train a few steps and save their weights.

Usage: ddp_worker.py CONFIG_YAML OUT_DIR (the test writes the config, so this script imports nothing
from the tests)."""
import copy
import sys

import torch

from clock_deploy.config import load_config
from clock_deploy.data.dataset import build_dataset
from clock_deploy.training import distributed as dist
from clock_deploy.training.commands import seed_everything
from clock_deploy.training.trainer import Trainer
from clock_deploy.models.build import build_criterion, build_model

config, out_dir = sys.argv[1], sys.argv[2]
cfg = load_config(config)
device = dist.init_from_env("cpu")
seed_everything(cfg.seed + dist.rank())  # different seeds per rank: DDP must still sync the weights
model = build_model(cfg.model)
initial = copy.deepcopy(model.state_dict())
trainer = Trainer(cfg, model, build_criterion(cfg.loss, cfg.model), build_dataset(cfg.data, "train", True),
                  device=device, progress=False)
trainer.fit()
torch.save({"model": model.state_dict(), "initial": initial, "iterations": trainer.iteration},
           f"{out_dir}/rank{dist.rank()}.pt")
dist.cleanup()
