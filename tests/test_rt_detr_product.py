"""RT-DETR through the product: the trainer trains a teacher, `distill` distils a student from it
(CLoCK), the exporter writes the student's ONNX (parity-checked) and `Detector.load` runs it."""
import json
import pathlib

import numpy as np
import pytest

from clock_deploy.checkpoint import read_checkpoint
from clock_deploy.export.exporter import Exporter
from clock_deploy.runtime import Detector
from clock_deploy.training.commands import run_training


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, synthetic_data, make_train_config):
    out = tmp_path_factory.mktemp("rt_detr_teacher")
    cfg = make_train_config(synthetic_data, out, arch="rt_detr", extra=["train.epochs=1", "train.max_iters=2"])
    metrics = run_training(cfg, progress=False)
    return out / "last.pt", metrics


def test_trainer_trains_and_evaluates_an_rt_detr(teacher):
    path, metrics = teacher
    ckpt = read_checkpoint(path)
    assert ckpt["config"]["model"]["arch"] == "rt_detr" and ckpt["iteration"] == 2
    with open(path.parent / "log.jsonl") as f:
        records = [json.loads(line) for line in f]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert "mAP" in metrics  # the evaluation after the last epoch ran


def test_distilled_rt_detr_student_exports_and_runs(teacher, tmp_path, synthetic_data, make_train_config):
    student_dir = tmp_path / "student"
    cfg = make_train_config(synthetic_data, student_dir, arch="rt_detr", extra=[
        "train.epochs=1", "train.max_iters=2", "distill.method=clock", f"distill.teacher={teacher[0]}",
        "distill.logit.random_queries=5", "model.hidden_dim=16", "model.ffn_dim=32"])
    run_training(cfg, progress=False)
    ckpt = student_dir / "last.pt"
    assert read_checkpoint(ckpt)["config"]["distill"]["method"] == "clock"

    files = Exporter(ckpt, tmp_path / "export").run("fp32", parity_images=2, map_images=0)
    onnx_det, torch_det = Detector.load(files["fp32"], score_threshold=0.0), Detector.load(ckpt, score_threshold=0.0)
    assert onnx_det.backend.name == "onnxruntime"
    images = sorted(str(p) for p in (pathlib.Path(synthetic_data) / "training" / "image_2").iterdir())[:2]
    a, b = onnx_det(images), torch_det(images)
    assert len(a) == 2 and len(a[0]) == len(b[0]) > 0
    np.testing.assert_allclose(np.sort(a[0].scores), np.sort(b[0].scores), atol=1e-4)
