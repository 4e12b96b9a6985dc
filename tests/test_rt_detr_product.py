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


@pytest.mark.slow  # ~2 min on 2 cores: three trainings, INT8 exports and a bench in subprocesses
def test_rt_detr_demo_pipeline_runs_end_to_end_at_tiny_size(tmp_path, tiny_model_overrides):
    """configs/demo/rt_detr_pipeline.yaml's stage configs (RT-DETR teacher, student, CLoCK distill), shrunk by
    overrides: every stage runs and the bench table has the three RT-DETR models."""
    import os

    import yaml

    from clock_deploy.config import PipelineConfig, load_config
    from clock_deploy.data.kitti import read_split
    from clock_deploy.export.calibration import choose_calibration_set, write_manifest
    from clock_deploy.pipeline import Pipeline

    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo")
    shipped = load_config(os.path.join(demo, "rt_detr_pipeline.yaml"), cls=PipelineConfig)
    stages = {name: os.path.join(demo, getattr(shipped, name)) for name in ("teacher", "student", "distill")}
    assert all(os.path.exists(p) for p in stages.values())
    data_root = tmp_path / "data"
    manifest = tmp_path / "calib.json"
    overrides = tiny_model_overrides + [
        "device=cpu", f"data.root={data_root}", "data.img_size=[64, 96]", "data.synth.num_images=12",
        "data.synth.height=64", "data.synth.width=192", "train.batch_size=3", "train.epochs=1", "train.log_every=1",
        "export.topk=10", "distill.logit.random_queries=5"]
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump({**stages, "output_dir": str(tmp_path / "runs"), "calib": str(manifest),
                                   "overrides": overrides,
                                   "bench": {"backends": ["torch", "onnx", "onnx-int8"], "warmup": 1, "runs": 2}}))
    pipeline = Pipeline(str(cfg))
    pipeline.synthesize(pipeline.stage_config("teacher").data)
    assert len(read_split(str(data_root), "trainval")) == 12
    write_manifest(str(manifest), choose_calibration_set(str(data_root), "train", 4))
    pipeline.run()
    for stage in ("teacher", "student", "distill"):
        assert read_checkpoint(tmp_path / "runs" / stage / "last.pt")["config"]["model"]["arch"] == "rt_detr"
    table = (tmp_path / "runs" / "bench" / "bench.md").read_text()
    assert "RT-DETR" in table and "distill" in table
