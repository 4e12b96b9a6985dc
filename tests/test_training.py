import json
import os
import subprocess
import sys

import pytest
import torch

from clock_deploy.config import dump
from clock_deploy.checkpoint import load_model, read_checkpoint
from clock_deploy.training.commands import run_training
from clock_deploy.training.trainer import Trainer, TrainingDiverged, lr_factor
from clock_deploy.errors import UserError
from clock_deploy.models.build import build_criterion, build_model
from clock_deploy.data.dataset import build_dataset


def losses(output_dir):
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["iteration"], r["loss"]) for r in records if "iteration" in r and "loss" in r]


def test_lr_schedule_warmup_then_steps(make_train_config):
    cfg = make_train_config("unused", "unused", extra=["train.warmup_iters=4", "train.lr_drop_epochs=[2, 3]"]).train
    assert [lr_factor(i, 10, cfg) for i in (0, 1, 3)] == [0.25, 0.5, 1.0]
    assert lr_factor(19, 10, cfg) == 1.0
    assert lr_factor(20, 10, cfg) == pytest.approx(0.1)
    assert lr_factor(35, 10, cfg) == pytest.approx(0.01)


def test_resume_continues_bit_for_bit(tmp_path, synthetic_data, make_train_config):
    straight = make_train_config(synthetic_data, tmp_path / "straight", extra=["train.ema=true"])
    run_training(straight, progress=False)

    first = make_train_config(synthetic_data, tmp_path / "resumed", extra=["train.ema=true", "train.epochs=1"])
    run_training(first, progress=False)
    assert read_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    second = make_train_config(synthetic_data, tmp_path / "resumed", extra=["train.ema=true"])
    run_training(second, resume=True, progress=False)

    expected = losses(tmp_path / "straight")
    assert len(expected) == 6  # 6 train images / batch 2 = 3 iterations per epoch
    assert losses(tmp_path / "resumed") == expected  # exact float equality, not approx
    a = read_checkpoint(tmp_path / "straight" / "last.pt")
    b = read_checkpoint(tmp_path / "resumed" / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key


def test_checkpoint_round_trip_and_clear_errors(tmp_path, synthetic_data, make_train_config):
    cfg = make_train_config(synthetic_data, tmp_path / "run", extra=["train.epochs=1", "train.max_iters=1"])
    run_training(cfg, progress=False)
    model, loaded_cfg, ckpt = load_model(tmp_path / "run" / "last.pt")
    assert loaded_cfg == cfg and ckpt["classes"] == ["Car", "Pedestrian", "Cyclist"]
    assert not model.training

    with pytest.raises(UserError, match="checkpoint not found"):
        load_model(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((tmp_path / "run" / "last.pt").read_bytes()[:1000])
    with pytest.raises(UserError, match="corrupt.pt: not a readable checkpoint"):
        load_model(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(UserError, match="not a clock-deploy checkpoint"):
        load_model(foreign)
    with pytest.raises(UserError, match="no checkpoint at"):
        run_training(make_train_config(synthetic_data, tmp_path / "fresh"), resume=True, progress=False)


class NanAfter(torch.nn.Module):
    """Wraps a criterion and returns a NaN loss from the `after`-th call on."""

    def __init__(self, criterion, after):
        super().__init__()
        self.criterion, self.after, self.calls = criterion, after, 0

    def forward(self, outputs, targets):
        self.calls += 1
        losses = self.criterion(outputs, targets)
        if self.calls > self.after:
            losses["loss_cls"] = losses["loss_cls"] * float("nan")
        return losses


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, synthetic_data, make_train_config):
    cfg = make_train_config(synthetic_data, tmp_path / "nan")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    criterion = NanAfter(build_criterion(cfg.loss, cfg.model), after=4)  # epoch 1 = 3 iterations
    train_set = build_dataset(cfg.data, "train", train=True)
    trainer = Trainer(cfg, model, criterion, train_set, progress=False)
    with pytest.raises(TrainingDiverged,
                       match=r"epoch 2, iteration 5 .*loss_cls=nan.*last good checkpoint kept: .*last.pt"):
        trainer.fit()
    ckpt = read_checkpoint(tmp_path / "nan" / "last.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_train_refuses_a_distill_config(tmp_path):
    from click.testing import CliRunner
    from clock_deploy.training.commands import train

    cfg = tmp_path / "d.yaml"
    cfg.write_text("distill:\n  method: clock\n")
    result = CliRunner().invoke(train, ["--cfg", str(cfg)])
    assert isinstance(result.exception, UserError) and "clock-deploy distill" in str(result.exception)


def test_ddp_two_cpu_processes_agree(tmp_path, synthetic_data, make_train_config):
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    dump(make_train_config(synthetic_data, tmp_path / "ddp"), tmp_path / "ddp.yaml")  # the workers' config
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29731",
           worker, str(tmp_path / "ddp.yaml"), str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["iterations"] == rank1["iterations"] == 2  # 6 images / (2 ranks x batch 2) = 1 per epoch
    for key in rank0["model"]:
        assert torch.equal(rank0["model"][key], rank1["model"][key]), key
    initial = rank0["initial"]
    assert any(not torch.equal(initial[k], rank0["model"][k]) for k in initial)  # it did train
    assert os.path.exists(tmp_path / "ddp" / "last.pt")  # written by rank 0 only


def test_tiny_dino_overfits_a_few_synthetic_scenes(tmp_path, make_train_config):
    """The whole training stack (data, model, criterion, trainer, evaluation) can fit 4 scenes."""
    from clock_deploy.data.synthetic import generate
    from clock_deploy.eval.loop import evaluate_model

    generate(str(tmp_path / "data"), 4, seed=3, val_fraction=0.25, progress=False)
    steps = 250  # batch 4 = the whole set: one iteration per epoch
    cfg = make_train_config(tmp_path / "data", tmp_path / "run", extra=[
        "data.img_size=[96, 320]", "data.hflip=0", "data.train_split=trainval", "data.val_split=trainval",
        "train.batch_size=4", f"train.epochs={steps}", f"train.ckpt_every={steps}", "train.lr=1e-3",
        "train.lr_backbone_mult=1.0", "train.lr_drop_epochs=[]", "model.backbone.frozen_bn=false",
        "model.backbone.width=16", "model.hidden_dim=64", "model.num_queries=20", "model.dn.num_queries=20",
        "train.log_every=50"])
    run_training(cfg, progress=False)
    model, cfg, _ = load_model(tmp_path / "run" / "last.pt")
    dataset = build_dataset(cfg.data, "trainval", train=False)
    assert sum(len(dataset[i][1]["labels"]) for i in range(4)) >= 10
    metrics = evaluate_model(model, dataset, cfg.data.img_size, cfg.export.topk)
    assert metrics["AP50"] > 0.9, metrics
