"""The end-to-end pipeline on tiny models: every stage runs, a re-run skips them all (the bench
too), and README section 5's snippet runs on what it leaves behind."""
import contextlib
import dataclasses
import json
import logging
import os
import re

import pytest
import yaml
from click.testing import CliRunner

from clock_deploy.measure.report import NotRun
from clock_deploy.data.kitti import read_split
from clock_deploy.errors import UserError
from clock_deploy.export.calibration import choose_calibration_set, write_manifest
from clock_deploy.pipeline import Pipeline
from clock_deploy.pipeline import pipeline as pipeline_command

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


@contextlib.contextmanager
def logged_lines():
    """The messages the library logs (at INFO and above) while the block runs."""
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("clock_deploy")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory, tiny_model_overrides):
    tmp = tmp_path_factory.mktemp("pipeline")  # laid out as the demo: tmp/data/synth_kitti, tmp/runs/demo
    data_root = str(tmp / "data" / "synth_kitti")
    common = {"device": "cpu", "data": {"root": data_root, "img_size": [64, 96],
                                        "synth": {"num_images": 12, "height": 64, "width": 192}},
              "train": {"batch_size": 3, "epochs": 1, "eval_every": 0, "log_every": 1}, "export": {"topk": 10}}
    write_yaml(tmp / "teacher.yaml", {**common, "model": {"arch": "dino"}})
    write_yaml(tmp / "student.yaml", {**common, "model": {"arch": "deformable_detr"}})
    write_yaml(tmp / "distill.yaml", {"_base_": "student.yaml", "distill": {"method": "clock"}})
    manifest = tmp / "calib.json"
    cfg = write_yaml(tmp / "pipeline.yaml", {
        "output_dir": str(tmp / "runs" / "demo"), "calib": str(manifest), "overrides": tiny_model_overrides,
        "bench": {"backends": ["torch", "onnx", "onnx-int8", "trt-fp16"], "warmup": 1, "runs": 2}})
    pipeline = Pipeline(cfg)
    with logged_lines() as lines:
        pipeline.synthesize(pipeline.stage_config("teacher").data)  # the data stage, so a manifest can be made
        assert len(read_split(data_root, "trainval")) == 12
        write_manifest(str(manifest), choose_calibration_set(data_root, "train", 4))
        result = pipeline.run()
    return cfg, result, lines, tmp


def runs(tmp):
    return tmp / "runs" / "demo"


def test_every_stage_writes_its_output(tiny_pipeline):
    cfg, result, lines, tmp = tiny_pipeline
    for stage in ("teacher", "student", "distill"):
        assert os.path.exists(runs(tmp) / stage / "last.pt")
    distill_cfg = yaml.safe_load((runs(tmp) / "distill" / "config.yaml").read_text())
    assert distill_cfg["distill"]["teacher"] == str(runs(tmp) / "teacher" / "last.pt")
    int8 = runs(tmp) / "distill" / "export" / "last.int8.onnx"
    assert json.loads((runs(tmp) / "distill" / "export" / "last.int8.onnx.json").read_text())["precision"] == "int8"
    benched = runs(tmp) / "bench" / "artifacts" / "distilled" / "distilled.int8.onnx"
    assert benched.read_bytes() == int8.read_bytes()  # the bench measured the deployable file
    ran = {(r.model, r.backend) for r in result.rows}
    assert ran == {(m, b) for m in ("teacher", "student", "distilled") for b in ("torch", "onnx", "onnx-int8")}
    assert [n.backend for n in result.not_run] == ["trt-fp16"]  # no TensorRT here: listed, with a reason
    assert "TensorRT" in result.not_run[0].reason
    assert set(result.files) == {"md", "csv", "json", "png"}
    assert any(line.startswith("CLoCK distillation: mAP") for line in lines)
    data_root = tmp / "data" / "synth_kitti"  # the data stage says where the scenes are and how many
    assert f"wrote 12 scenes to {data_root} (train 9, val 3)" in lines
    assert f"{data_root} exists (scenes: train 9, val 3): skipped" in lines


def test_rerun_skips_every_stage_and_keeps_bench_md(tiny_pipeline, monkeypatch):
    cfg, first, _, tmp = tiny_pipeline
    watched = [runs(tmp) / s / "last.pt" for s in ("teacher", "student", "distill")]
    watched += [runs(tmp) / "distill" / "export" / "last.int8.onnx", runs(tmp) / "bench" / "bench.md"]
    before = {p: (os.path.getmtime(p), p.read_bytes()) for p in watched}

    def no_bench(*args, **kwargs):
        raise AssertionError("the bench ran again")

    monkeypatch.setattr("clock_deploy.pipeline.run_bench", no_bench)
    with logged_lines() as lines:
        result = Pipeline(cfg).run()
    assert sum("skipped" in line for line in lines) == 6, lines  # data, 3 x train, export, bench
    assert {p: (os.path.getmtime(p), p.read_bytes()) for p in watched} == before
    assert {(r.model, r.backend) for r in result.rows} == {(r.model, r.backend) for r in first.rows}
    assert any(line.startswith("CLoCK distillation: mAP") for line in lines)  # the summary from bench.json


def test_bench_reruns_when_forced_or_its_settings_change(tiny_pipeline, monkeypatch):
    cfg, first, _, _ = tiny_pipeline
    calls = []

    def fake_bench(*args, **kwargs):
        calls.append(kwargs["runs"])
        return first

    monkeypatch.setattr("clock_deploy.pipeline.run_bench", fake_bench)
    data = Pipeline(cfg).stage_config("teacher").data
    Pipeline(cfg, force=["bench"]).bench(data)
    Pipeline(cfg, ["bench.runs=3"]).bench(data)
    assert calls == [2, 3]
    Pipeline(cfg).bench(data)  # the stamp now records runs=3: measured again
    assert calls == [2, 3, 2]
    Pipeline(cfg).bench(data)
    assert calls == [2, 3, 2]  # unchanged: skipped

    failing = dataclasses.replace(first, not_run=first.not_run + [NotRun("onnx", "failed: killed", "teacher")])
    monkeypatch.setattr("clock_deploy.pipeline.run_bench", lambda *a, **k: calls.append("x") or failing)
    Pipeline(cfg, force=["bench"]).bench(data)
    Pipeline(cfg).bench(data)
    assert calls[-2:] == ["x", "x"]  # a bench with a failed measurement is not stamped: measured again


def test_force_names_a_stage(tiny_pipeline):
    with pytest.raises(UserError, match="force: unknown stage"):
        Pipeline(tiny_pipeline[0], force=["train"])
    result = CliRunner().invoke(pipeline_command, ["--cfg", tiny_pipeline[0], "--force", "train"])
    assert result.exit_code == 2 and "'train' is not one of 'data', 'teacher'" in result.output


def readme_snippet():
    """The python block of README section 5, as a reader copies it."""
    with open(README) as f:
        text = f.read()
    section = text[text.index("### 5. Run it in your code"):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_section_5_runs_on_the_pipeline_outputs(tiny_pipeline, monkeypatch, capsys):
    tmp = tiny_pipeline[3]
    monkeypatch.chdir(tmp)  # the README's relative paths: runs/demo/..., data/synth_kitti/...
    exec(compile(readme_snippet(), "README.md section 5", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2  # one line per image


RTX = ["--trt", "--builder", "tensorrt-rtx"]  # --builder goes with --trt only (export/formats.py)
EXPORT_COMMANDS = {"fp16": ["--fp16"], "int8": ["--int8", "--calib", "{calib}"],
                   "trt-fp16": [*RTX, "--fp16"], "trt-int8": [*RTX, "--int8", "--calib", "{calib}"]}


@pytest.mark.parametrize("stage", ["distill", pytest.param("teacher", marks=pytest.mark.slow),
                                   pytest.param("student", marks=pytest.mark.slow)])
def test_the_four_export_commands_succeed_on_the_pipeline_models(tiny_pipeline, tmp_path, stage):
    """`export --fp16`, `--int8 --calib`, `--trt --fp16` and `--trt --int8 --calib` (TensorRT-RTX, which
    builds without a GPU) on the pipeline's own checkpoints: every gate passes, every file is written."""
    pytest.importorskip("tensorrt_rtx")
    from clock_deploy.cli import cli, run

    tmp = tiny_pipeline[3]
    for name, flags in EXPORT_COMMANDS.items():
        out = tmp_path / name
        argv = [f.format(calib=tmp / "calib.json") for f in flags]
        # a failed gate or a refused option would exit 2
        run(cli, ["export", "--ckpt", str(runs(tmp) / stage / "last.pt"), "--out", str(out), *argv])
        precision = name.rsplit("-", 1)[-1]
        meta = json.loads((out / f"last.{precision}.onnx.json").read_text())
        assert meta["precision"] == precision and meta["parity"].get("passed", True)
        assert os.path.exists(out / f"last.{precision}.engine") == name.startswith("trt")


def test_a_failed_export_gate_is_a_failed_bench_row_and_the_pipeline_goes_on(tiny_pipeline, tmp_path, monkeypatch):
    """In `pipeline`, an INT8 model that fails its accuracy gate is listed in the bench table as failed, with
    the criterion, and the other rows are still measured; `clock-deploy export` alone exits 2 on it."""
    import shutil

    from clock_deploy.export import parity

    cfg, _, _, tmp = tiny_pipeline
    for name in ("teacher.yaml", "student.yaml", "distill.yaml"):  # a copy: the module's pipeline stays as it is
        shutil.copy(tmp / name, tmp_path / name)
    shutil.copytree(runs(tmp), tmp_path / "runs")
    copied = yaml.safe_load(open(cfg))
    copied["output_dir"] = str(tmp_path / "runs")
    copied["bench"]["backends"] = ["onnx", "onnx-int8"]
    monkeypatch.setattr(parity, "MIN_MAP_IMAGES", 1)  # the tiny val split (3 images) is judged...
    monkeypatch.setattr(parity, "MAX_MAP_DROP", -1.0)  # ...by a gate no model passes (mAP must rise 100 points)
    with logged_lines() as lines:
        result = Pipeline(write_yaml(tmp_path / "pipeline.yaml", copied), force=["export"]).run()
    [failed] = [n for n in result.not_run if n.model == "distilled"]
    assert failed.backend == "onnx-int8" and failed.reason.startswith("export failed: ")
    assert "int8 export failed its accuracy gate: mAP drop" in failed.reason
    assert "(limit <= -100 points, 3 validation images)" in failed.reason
    assert {(r.model, r.backend) for r in result.rows} == {("teacher", "onnx"), ("teacher", "onnx-int8"),
                                                           ("student", "onnx"), ("student", "onnx-int8"),
                                                           ("distilled", "onnx")}
    assert failed.reason in (tmp_path / "runs" / "bench" / "bench.md").read_text()
    assert any("the pipeline goes on" in line for line in lines)
    assert not os.path.exists(tmp_path / "runs" / "bench" / "inputs.json")  # not stamped: measured again next time

    from clock_deploy.cli import cli, run
    with pytest.raises(SystemExit) as e:
        run(cli, ["export", "--ckpt", str(tmp_path / "runs" / "distill" / "last.pt"), "--int8", "--calib",
                  str(tmp / "calib.json"), "--out", str(tmp_path / "alone")])
    assert e.value.code == 2
