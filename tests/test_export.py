"""ONNX export of every student family: contract, parity with PyTorch, simplification, CLI."""
import json
import logging
import os
import re
import sys

import numpy as np
import onnx
import pytest

from clock_deploy.cli import cli, run
from clock_deploy.checkpoint import save_checkpoint
from clock_deploy.errors import UserError
from clock_deploy.export.onnx import export_onnx
from clock_deploy.export.parity import ParityError, check_parity, judge_map, parity_report, run_onnx, run_torch, verdict
from clock_deploy.io import file_sha256
from clock_deploy.models.deform_attn import set_sampling
from clock_deploy.models.deploy import ExportWrapper

FAMILIES = [("dab_detr", "grid_sample"), ("deformable_detr", "grid_sample"), ("deformable_detr", "gather"),
            ("dino", "grid_sample"), ("dino", "gather"), ("rt_detr", "grid_sample"), ("rt_detr", "gather")]


def _images(student_io, count, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count, 3, student_io.height, student_io.width)).astype(np.float32)


@pytest.mark.parametrize("arch,sampling", FAMILIES)
def test_export_follows_contract_and_matches_torch(tmp_path, arch, sampling, student_io, make_tiny_student):
    height, width, topk, classes = student_io.height, student_io.width, student_io.topk, student_io.classes
    model, _ = make_tiny_student(arch, sampling)
    path = tmp_path / "model.onnx"
    info = export_onnx(model, path, height=height, width=width, topk=topk, simplify=False)
    proto = onnx.load(path)
    assert info["opset"] == 17 and proto.opset_import[0].version == 17
    (image_input,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in image_input.type.tensor_type.shape.dim]
    assert image_input.name == "images" and dims == ["batch", 3, height, width]
    outputs = {o.name: o.type.tensor_type.elem_type for o in proto.graph.output}
    assert outputs == {"scores": onnx.TensorProto.FLOAT, "labels": onnx.TensorProto.INT64,
                       "boxes": onnx.TensorProto.FLOAT}
    ops = {n.op_type for n in proto.graph.node}
    if arch != "dab_detr":
        assert ("GridSample" in ops) == (sampling == "grid_sample")

    # batch 3 through a graph traced with batch 1; the gather graph is checked against
    # grid_sample PyTorch, so this also shows both sampling modes agree
    images = _images(student_io, 3)
    if arch != "dab_detr":
        set_sampling(model, "grid_sample")
    ref = run_torch(ExportWrapper(model, topk, (height, width)), images)
    out = run_onnx(path, images)
    report = parity_report(ref, out, "fp32", height, width)
    assert report["passed"], report
    assert report["scores_max_abs"] <= 1e-4 and report["boxes_max_abs"] <= 1e-4 * width
    assert report["topk_common"] == 3 * topk and report["topk_unmatched"] == 0

    # the in-graph post-processing, recomputed by hand from the raw tensors
    num_classes = len(classes)
    for i in range(3):
        index = out["parity_index"][i]
        np.testing.assert_array_equal(out["labels"][i], index % num_classes)
        np.testing.assert_allclose(out["scores"][i], out["parity_scores"][i][index], rtol=0, atol=1e-7)
        cx, cy, w, h = out["parity_boxes"][i][index // num_classes].T
        xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1) * [width, height, width, height]
        np.testing.assert_allclose(out["boxes"][i], xyxy, rtol=0, atol=1e-4)
        assert np.all(np.diff(out["scores"][i]) <= 0)


def test_onnxslim_keeps_outputs_and_failures_fall_back(tmp_path, monkeypatch, caplog, student_io, make_tiny_student):
    height, width, topk = student_io.height, student_io.width, student_io.topk
    model, _ = make_tiny_student("dab_detr")
    images = _images(student_io, 2)
    ref = run_torch(ExportWrapper(model, topk, (height, width)), images)
    slim_path = tmp_path / "slim.onnx"
    info = export_onnx(model, slim_path, height=height, width=width, topk=topk, simplify=True)
    assert info["simplified"] and info["simplify_error"] is None
    assert parity_report(ref, run_onnx(slim_path, images), "fp32", height, width)["passed"]

    import onnxslim

    def broken(model):
        raise RuntimeError("boom")

    monkeypatch.setattr(onnxslim, "slim", broken)
    path = tmp_path / "fallback.onnx"
    with caplog.at_level(logging.WARNING, logger="clock_deploy"):
        info = export_onnx(model, path, height=height, width=width, topk=topk, simplify=True)
    warned = [r for r in caplog.records if r.name.startswith("clock_deploy")]
    assert [r.levelname for r in warned] == ["WARNING"]
    assert re.search("onnxslim simplification skipped.*boom", warned[0].getMessage())
    assert not info["simplified"] and "boom" in info["simplify_error"]
    assert info["nodes"] > len(onnx.load(slim_path).graph.node)  # the traced, unsimplified graph
    assert parity_report(ref, run_onnx(path, images), "fp32", height, width)["passed"]


def _outputs(scores, index, boxes_raw, num_classes=2):
    """A hand-made output dict: raw scores [1, Q*K], top-k by index, boxes in a 10 x 10 image."""
    scores_raw = np.asarray([scores], np.float32)
    index = np.asarray([index])
    boxes_raw = np.asarray([boxes_raw], np.float32)
    cx, cy, w, h = boxes_raw[0][index[0] // num_classes].T
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)[None] * 10
    return {"scores": scores_raw[:, index[0]], "labels": index % num_classes, "boxes": boxes.astype(np.float32),
            "parity_scores": scores_raw, "parity_index": index, "parity_boxes": boxes_raw}


def test_parity_compares_by_index_so_near_ties_may_swap():
    boxes = [[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1], [0.7, 0.7, 0.3, 0.3]]
    ref = _outputs([0.9, 0.1, 0.50001, 0.2, 0.5, 0.3], [0, 2, 4], boxes)
    # 2 and 4 are nearly tied and swap places: same detections, other order
    out = _outputs([0.9, 0.1, 0.49999, 0.2, 0.50002, 0.3], [0, 4, 2], boxes)
    report = parity_report(ref, out, "fp32", 10, 10)
    assert report["passed"]
    assert report["scores_max_abs"] == pytest.approx(2e-5, abs=1e-7)
    assert report["topk_common"] == 3 and report["topk_unmatched"] == 0

    # a box moved by 0.01 (normalized) = 0.1 px is beyond 1e-4 * 10 px; scores are untouched
    moved = [list(b) for b in boxes]
    moved[1][0] += 0.01
    report = parity_report(ref, _outputs([0.9, 0.1, 0.50001, 0.2, 0.5, 0.3], [0, 2, 4], moved), "fp32", 10, 10)
    assert not report["passed"]
    assert report["boxes_max_abs"] == pytest.approx(0.1, abs=1e-5)
    assert report["queries_changed"] == 1
    assert report["failed"] == "box max abs difference 0.1 px (limit <= 0.001 px, 1 random images)"
    with pytest.raises(ParityError, match=r"fp32 export failed its accuracy gate: box max abs difference 0\.1 px "
                                          r"\(limit <= 0\.001 px, 1 random images\)$"):
        check_parity(report, "model.onnx")


def test_fp16_verdict_matches_detections_not_slots_and_names_its_gate():
    boxes = [[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1], [0.7, 0.7, 0.3, 0.3]]
    ref = _outputs([0.9, 0.1, 0.6, 0.2, 0.5, 0.3], [0, 2, 4], boxes)
    # the same detections in other query slots (DINO's proposal order moved): slot by slot all differs
    out = _outputs([0.2, 0.5, 0.3, 0.9, 0.1, 0.6], [3, 5, 1], [boxes[1], boxes[0], boxes[2]])
    out["labels"], out["scores"], out["boxes"] = ref["labels"], ref["scores"], ref["boxes"]
    report = parity_report(ref, out, "fp16", 10, 10)
    assert report["queries_changed"] == 3 and report["det_matched_fraction"] == 1.0 and report["passed"]
    assert verdict(report).startswith("OK (gate: detections >= 0.3 matched >= 0.9, matched boxes' p95 error")
    assert report["det_ref"] == 2  # the k-th (last) entry is a cutoff near-tie candidate: not counted
    # the second detection lands elsewhere: 1 of 2 matched each way, FAILED by the detection gate
    moved = {**out, "boxes": out["boxes"].copy()}
    moved["boxes"][0, 1] += 5.0
    report = parity_report(ref, moved, "fp16", 10, 10)
    assert report["det_unmatched"] == 2 and report["det_matched_fraction"] == 0.5
    assert not report["passed"]
    assert verdict(report) == "FAILED: detections >= 0.3 matched 0.5 (limit >= 0.9, 1 random images)"
    with pytest.raises(ParityError, match=r"detections >= 0.3 matched 0.5 \(limit >= 0.9, 1 random images\)$"):
        check_parity(report, "model.fp16.onnx")


def test_fp16_box_criterion_is_relative_to_box_size():
    boxes = [[0.5, 0.5, 0.5, 0.5], [0.3, 0.3, 0.1, 0.1], [0.7, 0.7, 0.3, 0.3]]
    ref = _outputs([0.9, 0.1, 0.6, 0.2, 0.5, 0.3], [0, 2, 4], boxes)
    out = {**ref, "boxes": ref["boxes"].copy()}
    out["boxes"][0, 0, 2] += 0.15  # the 5 px box's right edge: 3% of its size
    report = parity_report(ref, out, "fp16", 10, 10)
    assert report["det_box_max_abs"] == pytest.approx(0.15, abs=1e-6) and report["passed"]
    assert report["det_box_rel"] == pytest.approx(0.03, abs=1e-3)
    out["boxes"][0, 0, 2] += 0.35  # 0.5 px = 10% of the box: beyond 5% at the 95th percentile
    report = parity_report(ref, out, "fp16", 10, 10)
    assert not report["passed"]
    assert report["failed"].startswith("matched boxes' p95 error / box size 0.09")
    assert report["failed"].endswith("(limit <= 0.05, 1 random images)")


def test_int8_verdict_is_the_map_difference():
    boxes = [[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1], [0.7, 0.7, 0.3, 0.3]]
    ref = _outputs([0.9, 0.1, 0.6, 0.2, 0.5, 0.3], [0, 2, 4], boxes)
    report = parity_report(ref, ref, "int8", 10, 10)
    assert "passed" not in report and verdict(report).startswith("no verdict (INT8 is judged by the mAP")
    ok = judge_map({**report, "mAP_diff": -0.004, "map_images": 200})
    assert ok["passed"] and verdict(ok) == "OK (gate: mAP drop <= 0.5 points)"
    bad = judge_map({**report, "mAP": 0.19, "mAP_ref": 0.20, "mAP_diff": -0.01, "map_images": 200})
    assert not bad["passed"]
    assert verdict(bad) == "FAILED: mAP drop 1 points (limit <= 0.5 points, 200 validation images)"
    with pytest.raises(ParityError, match=r"int8 export failed its accuracy gate: mAP drop 1 points \(limit <= 0.5 "
                                          r"points, 200 validation images\)$"):
        check_parity(bad, "model.int8.onnx")
    few = judge_map({**report, "mAP_diff": -0.05, "map_images": 32})  # 32 images: reported, not judged
    assert "passed" not in few and "fewer than 100" in few["map_note"]


def test_parity_flags_entries_dropped_without_a_near_tie():
    boxes = [[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1], [0.7, 0.7, 0.3, 0.3]]
    ref = _outputs([0.9, 0.1, 0.6, 0.2, 0.5, 0.3], [0, 2, 4], boxes)
    # a broken post-processing keeps entry 5 (0.3) instead of 2 (0.6), although the scores agree
    out = _outputs([0.9, 0.1, 0.6, 0.2, 0.5, 0.3], [0, 4, 5], boxes)
    report = parity_report(ref, out, "fp32", 10, 10)
    assert report["scores_max_abs"] == 0.0
    assert report["topk_unmatched"] == 1 and not report["passed"]


def test_parity_outputs_need_the_contract_post_processing():
    from onnx import helper

    from clock_deploy.export.parity import with_parity_outputs
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], [name]) for name in ("scores", "labels", "boxes")], "g",
        [helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("scores", "labels", "boxes")])
    with pytest.raises(UserError, match="contract post-processing"):
        with_parity_outputs(helper.make_model(graph))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, student_io, make_tiny_student):
    """A tiny Deformable DETR checkpoint whose config points at a 16-image synthetic KITTI set."""
    from clock_deploy.data.synthetic import generate

    root = tmp_path_factory.mktemp("data") / "synth"
    generate(root, 16, seed=0, height=94, width=310, progress=False)
    model, cfg = make_tiny_student("deformable_detr", data_root=root)
    path = tmp_path_factory.mktemp("ckpt") / "student.pt"
    save_checkpoint(path, model, cfg, student_io.classes, epoch=3, iteration=30)
    return path, root


def _sidecar(path):
    with open(f"{path}.json") as f:
        return json.load(f)


def test_cli_export_fp32_and_fp16_with_sidecars(checkpoint, tmp_path, student_io):
    height, width, topk, classes = student_io.height, student_io.width, student_io.topk, student_io.classes
    ckpt, _ = checkpoint
    out = tmp_path / "export"
    run(cli, ["export", "--ckpt", str(ckpt), "--onnx", "--fp16", "--out", str(out), "--map-images", "2",
              "--sampling", "gather"])
    for name, precision in (("student.onnx", "fp32"), ("student.fp16.onnx", "fp16")):
        meta = _sidecar(out / name)
        assert meta["precision"] == precision and meta["kind"] == "onnx"
        assert meta["classes"] == classes and meta["arch"] == "deformable_detr"
        assert (meta["input"]["height"], meta["input"]["width"]) == (height, width)
        assert meta["input"]["mean"] == [0.485, 0.456, 0.406] and meta["input"]["divisor"] == 255.0
        assert meta["source"]["sha256"] == file_sha256(ckpt) and meta["source"]["epoch"] == 3
        assert meta["batch"] == {"dynamic": True, "min": 1, "opt": 1, "max": 8}  # TensorRT profile default
        assert meta["sampling"] == "gather" and meta["opset"] == 17 and meta["topk"] == topk
        assert "onnxruntime" in meta["versions"] and "onnx" in meta["versions"]
        parity = meta["parity"]
        assert parity["passed"] and parity["image_source"] == "validation"
        # FP32 is judged slot by slot; FP16's mAP difference is reported (2 images: too few to judge it)
        assert ("mAP_diff" in parity) == (precision == "fp16") and parity.get("map_images", 2) == 2
    assert _sidecar(out / "student.onnx")["parity"]["scores_max_abs"] <= 1e-4
    assert "GridSample" not in {n.op_type for n in onnx.load(out / "student.onnx").graph.node}


def test_cli_export_int8_with_a_calibration_manifest(checkpoint, tmp_path):
    ckpt, root = checkpoint
    manifest = tmp_path / "calib.json"
    run(cli, ["calibrate", "--data", str(root), "--num", "4", "--out", str(manifest)])
    out = tmp_path / "export"
    run(cli, ["export", "--ckpt", str(ckpt), "--int8", "--calib", str(manifest), "--out", str(out),
              "--map-images", "2", "--exclude-node", "/model/class_embed.1/MatMul"])
    meta = _sidecar(out / "student.int8.onnx")
    assert meta["precision"] == "int8"
    calibration = meta["calibration"]
    assert calibration["manifest"] == str(manifest) and calibration["manifest_sha256"] == file_sha256(manifest)
    assert calibration["images"] == 4 and calibration["dataset_root"] == str(root)
    assert calibration["nodes_excluded"] == ["/model/class_embed.1/MatMul"] and calibration["quantized_nodes"] > 0
    parity = meta["parity"]
    assert parity["precision"] == "int8" and "passed" not in parity  # 2 val images: too few to judge the mAP
    assert parity["map_note"] == "not judged: fewer than 100 validation images"
    assert {"scores_max_abs", "boxes_max_abs", "mAP_diff"} <= set(parity)
    graph = onnx.load(out / "student.int8.onnx").graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 0


def test_cli_export_fails_loudly_beyond_tolerance(checkpoint, tmp_path, capsys, student_io):
    ckpt, root = checkpoint
    from clock_deploy.checkpoint import load_model
    model, cfg, _ = load_model(ckpt)
    cfg.export.parity_tol = 1e-12  # float32 rounding alone is above this
    strict = tmp_path / "strict.pt"
    save_checkpoint(strict, model, cfg, student_io.classes, epoch=0, iteration=0)
    with pytest.raises(SystemExit) as e:
        run(cli, ["export", "--ckpt", str(strict), "--out", str(tmp_path), "--map-images", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "failed its accuracy gate: score max abs difference" in err and "Traceback" not in err
    assert "(limit <= 1e-12, 4 validation images)" in err
    assert not os.path.exists(tmp_path / "strict.onnx") and not os.path.exists(tmp_path / "strict.onnx.json")


def test_cli_trt_without_tensorrt_is_one_clear_line(checkpoint, tmp_path, capsys, monkeypatch):
    for module in ("tensorrt", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, module, None)  # neither builder installed
    ckpt, _ = checkpoint
    with pytest.raises(SystemExit) as e:
        run(cli, ["export", "--ckpt", str(ckpt), "--trt", "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "TensorRT is not installed" in err and "pip install clock-deploy[trt]" in err
    assert "python3-libnvinfer" in err


def test_cli_bad_options_name_the_problem(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    for argv, message in ((["--imgsz", "64by128"], "--imgsz must look like HEIGHTxWIDTH"),
                          (["--int8"], "INT8 needs a calibration manifest"),
                          (["--int8", "--calib", str(tmp_path / "nope.json")], "calibration manifest not found")):
        with pytest.raises(SystemExit):
            run(cli, ["export", "--ckpt", str(ckpt), "--out", str(tmp_path), "--map-images", "0"] + argv)
        assert message in capsys.readouterr().err


def test_cli_int8_engine_export_prints_each_line_once_and_no_library_noise(checkpoint, tmp_path):
    """In a process of its own, as a user runs it (pytest's own log handlers would hide a doubled line):
    onnxruntime's quantizer must not make every later line print twice, TensorRT's builder notes go to
    the debug log and onnxruntime's session warnings stay quiet."""
    import subprocess

    pytest.importorskip("tensorrt_rtx")
    ckpt, root = checkpoint
    manifest = tmp_path / "calib.json"
    run(cli, ["calibrate", "--data", str(root), "--num", "4", "--out", str(manifest)])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-m", "clock_deploy", "export", "--ckpt", str(ckpt), "--int8", "--calib",
                           str(manifest), "--trt", "--builder", "tensorrt-rtx", "--map-images", "0",
                           "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, check=False)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 0, lines
    assert len(lines) == len(set(lines)), lines  # every line once
    noise = [line for line in lines if line.startswith(("INFO:", "WARNING:", "[TRT]", "TensorRT:"))
             or "onnxruntime" in line and "[W:" in line]
    assert noise == [], noise
    assert sum(line.startswith("INT8:") for line in lines) == 1
    assert os.path.exists(tmp_path / "out" / "student.int8.engine")


def test_sensitivity_says_what_its_score_means_and_what_to_do(checkpoint, tmp_path, monkeypatch, capsys):
    ckpt, root = checkpoint
    manifest = tmp_path / "calib.json"
    run(cli, ["calibrate", "--data", str(root), "--num", "2", "--out", str(manifest)])
    nodes = [{"node": f"/n{i}/Conv", "op_type": "Conv", "error": 2.0 - i} for i in range(2)]
    monkeypatch.setattr("clock_deploy.export.exporter.int8_sensitivity",  # the ranking itself: test_precision
                        lambda *a, **k: {"images": 2, "full": {"error": 1.5}, "nodes": nodes, "top": []})
    run(cli, ["export", "--ckpt", str(ckpt), "--calib", str(manifest), "--sensitivity", "--map-images", "0",
              "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("INT8 sensitivity on 2 images"))
    assert "each score is the output error" in lines[start] and "(all nodes in INT8: 1.5;" in lines[start]
    assert "keep the top nodes in float with --exclude-node NODE and export INT8 again" in lines[start]
    assert lines[start + 1].split() == ["2", "Conv", "/n0/Conv"]
