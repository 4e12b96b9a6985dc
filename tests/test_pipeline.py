"""The end-to-end pipeline on tiny models: every stage runs, a re-run skips them all."""
import json
import os

import pytest
import yaml

from clock_deploy.data.kitti import read_split
from clock_deploy.export.calibration import choose_calibration_set, write_manifest
from clock_deploy.pipeline import Pipeline
from engine_helpers import TINY_MODEL


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    data_root = str(tmp / "data")
    common = {"device": "cpu", "data": {"root": data_root, "img_size": [64, 96],
                                        "synth": {"num_images": 12, "height": 64, "width": 192}},
              "train": {"batch_size": 3, "epochs": 1, "eval_every": 0, "log_every": 1}, "export": {"topk": 10}}
    write_yaml(tmp / "teacher.yaml", {**common, "model": {"arch": "dino"}})
    write_yaml(tmp / "student.yaml", {**common, "model": {"arch": "deformable_detr"}})
    write_yaml(tmp / "distill.yaml", {"_base_": "student.yaml", "distill": {"method": "clock"}})
    manifest = tmp / "calib.json"
    cfg = write_yaml(tmp / "pipeline.yaml", {
        "output_dir": str(tmp / "runs"), "calib": str(manifest), "overrides": TINY_MODEL,
        "bench": {"backends": ["torch", "onnx", "onnx-int8", "trt-fp16"], "warmup": 1, "runs": 2}})
    lines = []
    pipeline = Pipeline(cfg, echo=lines.append)
    pipeline.synthesize(pipeline.stage_config("teacher").data)  # the data stage, so a manifest can be made
    assert len(read_split(data_root, "trainval")) == 12
    write_manifest(str(manifest), choose_calibration_set(data_root, "train", 4))
    result = pipeline.run()
    return cfg, result, lines, tmp


def test_every_stage_writes_its_output(tiny_pipeline):
    cfg, result, lines, tmp = tiny_pipeline
    for stage in ("teacher", "student", "distill"):
        assert os.path.exists(tmp / "runs" / stage / "last.pt")
    distill_cfg = yaml.safe_load((tmp / "runs" / "distill" / "config.yaml").read_text())
    assert distill_cfg["distill"]["teacher"] == str(tmp / "runs" / "teacher" / "last.pt")
    int8 = tmp / "runs" / "bench" / "artifacts" / "distilled" / "distilled.int8.onnx"
    assert int8.exists() and json.loads((tmp / "runs" / "bench" / "artifacts" / "distilled" /
                                         "distilled.int8.onnx.json").read_text())["precision"] == "int8"
    ran = {(r.model, r.backend) for r in result.rows}
    assert ran == {(m, b) for m in ("teacher", "student", "distilled") for b in ("torch", "onnx", "onnx-int8")}
    assert [n.backend for n in result.not_run] == ["trt-fp16"]  # no TensorRT here: listed, with a reason
    assert "TensorRT" in result.not_run[0].reason
    assert set(result.files) == {"md", "csv", "json", "png"}
    assert any(line.startswith("CLoCK distillation: mAP") for line in lines)


def test_rerun_skips_finished_stages(tiny_pipeline):
    cfg, _, _, tmp = tiny_pipeline
    before = {s: os.path.getmtime(tmp / "runs" / s / "last.pt") for s in ("teacher", "student", "distill")}
    lines = []
    pipeline = Pipeline(cfg, echo=lines.append)
    for stage in ("teacher", "student", "distill"):
        pipeline.train(stage, pipeline.stage_config(stage))
    pipeline.export()
    pipeline.synthesize(pipeline.stage_config("teacher").data)
    assert sum("skipped" in line for line in lines) == 5, lines
    after = {s: os.path.getmtime(tmp / "runs" / s / "last.pt") for s in before}
    assert after == before
