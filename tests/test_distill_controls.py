"""The gt_denoise control: TCLD's query group trained on the ground truth, with no teacher at all."""
import json

import pytest
import torch

from clock_deploy.distill import build_distiller
from clock_deploy.distill.controls import GtDenoiser
from clock_deploy.distill.queries import ground_truth_layout
from clock_deploy.models.build import build_criterion, build_model
from clock_deploy.models.contract import StageOutput
from clock_deploy.training.commands import run_training
from clock_deploy.training.trainer import TrainStep


def batch():
    """Like conftest's make_distill_batch, but both images have boxes: 3 GT boxes in all (the hand-computed loss)."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 96)
    targets = [{"boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.15, 0.2]]), "labels": torch.tensor([0, 2])},
               {"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]]), "labels": torch.tensor([1])}]
    return images, targets


@pytest.mark.parametrize("arch", ["dab_detr", "deformable_detr", "dino"])
def test_gt_denoise_trains_a_step_of_every_family_without_a_teacher(arch, make_distill_config):
    cfg = make_distill_config(arch, method="gt_denoise", enc_layers=1)
    torch.manual_seed(0)
    student = build_model(cfg.model).train()
    denoiser = build_distiller(cfg, None, student)  # no teacher exists: none can be run or read
    assert isinstance(denoiser, GtDenoiser) and not hasattr(denoiser, "teacher")
    assert not list(denoiser.parameters()) and denoiser.trainable_state() == {}
    step = TrainStep(student, build_criterion(cfg.loss, cfg.model), denoiser).train()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    images, targets = batch()
    losses = step(images, targets)
    group = {f"loss_{t}_gtdn{s}" for t in ("cls", "bbox", "giou") for s in ("", "_0", "_general", "_0_general")}
    assert group <= set(losses) and set(step.distill_keys) == group
    assert all(torch.isfinite(v) and v > 0 for k, v in losses.items() if k in group)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    heads = [p.grad for n, p in student.named_parameters() if "class_embed" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in heads)
    optimizer.step()
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_gt_denoise_loss_by_hand(make_distill_config):
    """GT slots are supervised by their own GT box: exact boxes give 0, one coordinate off by 0.1 gives
    w_l1 * 0.1 / (GT count 3 x repeats 2); general slots go through Hungarian matching."""
    cfg = make_distill_config("dino", method="gt_denoise", enc_layers=1)
    cfg.distill.logit.repeats, cfg.distill.logit.random_queries = 2, 3
    cfg.loss.aux = False
    denoiser = build_distiller(cfg, None, build_model(cfg.model))
    _, targets = batch()
    labels, boxes, pad_mask, size = ground_truth_layout(targets, 3, 2)
    assert size == 2 and pad_mask.tolist() == [[False] * 4, [False, True, False, True]]
    general = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.15, 0.2], [0.2, 0.2, 0.1, 0.1]])
    exact = torch.cat([boxes, general[None].expand(2, -1, -1)], 1)
    logits = torch.zeros(2, 7, 3)
    losses = denoiser.losses([StageOutput(logits, exact)], targets)
    assert losses["loss_bbox_gtdn"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou_gtdn"].item() == pytest.approx(0.0, abs=1e-6)
    moved = exact.clone()
    moved[0, 2, 0] += 0.1  # repeat 1 of the first GT box of image 0
    off = denoiser.losses([StageOutput(logits, moved)], targets)
    assert off["loss_bbox_gtdn"].item() == pytest.approx(denoiser.criterion.weight_l1 * 0.1 / 6, rel=1e-4)
    assert off["loss_bbox_gtdn_general"].item() == pytest.approx(losses["loss_bbox_gtdn_general"].item())


def test_gt_denoise_runs_from_config_without_a_teacher(tmp_path, synthetic_data, make_train_config):
    cfg = make_train_config(synthetic_data, tmp_path / "run", extra=[
        "distill.method=gt_denoise", "distill.logit.random_queries=5", "train.epochs=1", "train.eval_every=-1"])
    assert cfg.distill.teacher is None
    run_training(cfg, progress=False)
    records = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    steps = [r for r in records if "loss_bbox_gtdn" in r]
    assert steps and all(r["loss_bbox_gtdn"] > 0 for r in steps)
    assert any("grad_share_loss_bbox_gtdn" in r for r in records)  # counted as the distiller's terms


def test_demo_gt_denoise_config_asks_clocks_query_group():
    from clock_deploy.config import load_config
    cfg = load_config("configs/demo/distill_gt_denoise.yaml")
    clock = load_config("configs/demo/distill.yaml")
    assert cfg.distill.method == "gt_denoise" and cfg.distill.teacher is None
    assert cfg.distill.logit == clock.distill.logit and cfg.distill.lambda_logit == clock.distill.lambda_logit
    assert cfg.model == clock.model and cfg.data == clock.data and cfg.train == clock.train
    denoiser = build_distiller(cfg, None, build_model(cfg.model))
    assert denoiser.sampler.random_count == clock.distill.logit.random_queries
