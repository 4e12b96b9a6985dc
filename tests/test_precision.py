"""FP16 and INT8 Q/DQ graphs: structure TensorRT expects, run on onnxruntime CPU, stay close to FP32.

Bounds below were measured on the tiny spread-score students (two seeds) and set at about
3x the worst value seen: FP16 raw scores 0.0018, boxes 0.033 px; INT8 median query score
error 0.016, 90th percentile 0.043, boxes 0.69 px (DAB-DETR / Deformable DETR). DINO's and
RT-DETR's query slots follow their proposal ranking (query selection), which float16 / int8
rounding reorders on untrained models, so for them only the median-based FP16 verdict
(parity.py) is asserted.
"""
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from clock_deploy.errors import UserError
from clock_deploy.export.onnx import export_onnx
from clock_deploy.export.parity import parity_report, run_onnx
from clock_deploy.export.precision import convert_fp16, count_quantized, int8_sensitivity
from clock_deploy.export.precision import quantize_int8
from clock_deploy.runtime.preprocess import preprocess

ARCHS = [("dab_detr", "grid_sample"), ("deformable_detr", "gather"), ("dino", "grid_sample"), ("rt_detr", "gather")]
SELECTED_QUERIES = ("dino", "rt_detr")  # query slots ordered by the encoder's top-k (see the docstring)


class StandInDetector(nn.Module):
    """A four-layer stand-in with the detector interface (pred_logits / pred_boxes), for fast tests:
    two convolutions, 4 queries pooled from a 2 x 2 grid, a class head and a box head."""

    def __init__(self, num_classes):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.cls = nn.Linear(16, num_classes)
        self.box = nn.Linear(16, 4)

    def forward(self, images):
        features = torch.relu(self.conv2(torch.relu(self.conv1(images))))
        queries = nn.functional.adaptive_avg_pool2d(features, (2, 2)).flatten(2).transpose(1, 2)
        return SimpleNamespace(pred_logits=self.cls(queries), pred_boxes=self.box(queries).sigmoid())


@pytest.fixture(scope="module")
def calibration(tmp_path_factory, student_io, make_random_images):
    folder = tmp_path_factory.mktemp("calib")
    paths = make_random_images(folder, 8)
    return paths, preprocess(paths[:4], student_io.spec)[0]


@pytest.fixture(scope="module")
def fp32_models(tmp_path_factory, student_io, make_tiny_student):
    height, width, topk = student_io.height, student_io.width, student_io.topk
    folder = tmp_path_factory.mktemp("fp32")
    paths = {}
    for arch, sampling in ARCHS:
        model, _ = make_tiny_student(arch, sampling)
        paths[arch] = str(folder / f"{arch}.onnx")
        export_onnx(model, paths[arch], height=height, width=width, topk=topk, simplify=False)
    return paths


def _query_errors(ref, out, student_io):
    """Per-query max abs raw score error and max abs raw box error (pixels)."""
    height, width = student_io.height, student_io.width
    n, q = ref["parity_boxes"].shape[:2]
    scores = np.abs(ref["parity_scores"] - out["parity_scores"]).reshape(n, q, -1).max(-1)
    boxes = (np.abs(ref["parity_boxes"] - out["parity_boxes"]) * [width, height, width, height]).max(-1)
    return scores, boxes


def _producer(graph, name):
    return next((n for n in graph.node if name in n.output), None)


@pytest.mark.parametrize("arch", [a for a, _ in ARCHS])
def test_fp16_graph_keeps_io_and_fragile_ops_fp32_and_stays_close(tmp_path, fp32_models, calibration, arch,
                                                                   student_io):
    height, width = student_io.height, student_io.width
    path = str(tmp_path / "fp16.onnx")
    convert_fp16(fp32_models[arch], path)
    graph = onnx.load(path).graph
    floats = {onnx.TensorProto.FLOAT}
    assert {i.type.tensor_type.elem_type for i in graph.input} == floats
    assert {o.type.tensor_type.elem_type for o in graph.output if o.name != "labels"} == floats
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)  # weights are fp16
    # TopK / Sigmoid run in fp32: their data inputs come from casts to float32
    for node in graph.node:
        if node.op_type in ("TopK", "Sigmoid", "LayerNormalization"):
            cast = _producer(graph, node.input[0])
            assert cast is not None and cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT

    _, images = calibration
    ref, out = run_onnx(fp32_models[arch], images), run_onnx(path, images)
    report = parity_report(ref, out, "fp16", height, width)
    assert report["passed"], report
    if arch not in SELECTED_QUERIES:
        scores, boxes = _query_errors(ref, out, student_io)
        assert scores.max() < 5e-3 and boxes.max() < 0.1
        assert report["label_mismatch"] == 0 and report["topk_unmatched"] == 0


@pytest.mark.parametrize("arch", [a for a, _ in ARCHS])
def test_int8_graph_is_symmetric_per_channel_qdq_on_weighted_ops(tmp_path, fp32_models, calibration, arch,
                                                                  student_io):
    paths, images = calibration
    path = str(tmp_path / "int8.onnx")
    info = quantize_int8(fp32_models[arch], path, paths, student_io.spec)
    assert info["images"] == 8 and info["quantized_nodes"] > 0
    graph = onnx.load(path).graph
    init = {t.name: t for t in graph.initializer}
    dq_outputs = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    readers = [n for n in graph.node for i in n.input if i in dq_outputs]
    assert {"Conv", "MatMul", "Add"} <= {n.op_type for n in readers} <= {"Conv", "MatMul", "Gemm", "Add"}
    residual_adds = [n.name for n in readers if n.op_type == "Add"]
    assert residual_adds and all("/backbone/" in name for name in residual_adds)  # ResNet shortcuts only
    # no orphan Q/DQ pairs: every DequantizeLinear is read, and fewer Q/DQ than onnxruntime wrote
    assert len(readers) >= len(dq_outputs)
    qdq = info["qdq"]
    assert qdq["after"]["QuantizeLinear"] < qdq["before"]["QuantizeLinear"]
    assert qdq["after"]["DequantizeLinear"] == len(dq_outputs)
    # the rest is FP16 (opset 19: Q/DQ scales in float16 too), the outputs stay float32
    assert any(o.domain in ("", "ai.onnx") and o.version == 19 for o in onnx.load(path).opset_import)
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    assert {o.type.tensor_type.elem_type for o in graph.output if o.name != "labels"} == {onnx.TensorProto.FLOAT}
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            zero_point = onnx.numpy_helper.to_array(init[node.input[2]])
            assert zero_point.dtype == np.int8 and not zero_point.any()  # symmetric int8
    convs = [n for n in graph.node if n.op_type == "Conv" and n.input[1] in dq_outputs]
    assert convs
    for conv in convs:
        weight_dq = dq_outputs[conv.input[1]]
        scale = onnx.numpy_helper.to_array(init[weight_dq.input[1]])
        assert scale.ndim == 1 and scale.size > 1  # one scale per output channel
        if len(conv.input) > 2:
            assert conv.input[2] in init and init[conv.input[2]].data_type == onnx.TensorProto.FLOAT16  # float bias
    assert info["quantized_nodes"] == count_quantized(path)

    ref, out = run_onnx(fp32_models[arch], images), run_onnx(path, images)
    assert out["scores"].shape == ref["scores"].shape and out["labels"].dtype == np.int64
    if arch not in SELECTED_QUERIES:
        scores, boxes = _query_errors(ref, out, student_io)
        assert 0 < np.median(scores) < 0.05 and np.percentile(scores, 90) < 0.15 and boxes.max() < 2.0


def test_int8_excluded_nodes_stay_float(tmp_path, fp32_models, calibration, student_io):
    paths, _ = calibration
    everything = str(tmp_path / "all.onnx")
    quantize_int8(fp32_models["dab_detr"], everything, paths[:2], student_io.spec)
    graph = onnx.load(everything).graph
    dq_outputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    victim = next(n.name for n in graph.node if n.op_type == "Conv" and n.input[0] in dq_outputs)
    kept = str(tmp_path / "kept.onnx")
    info = quantize_int8(fp32_models["dab_detr"], kept, paths[:2], student_io.spec, nodes_to_exclude=[victim])
    assert info["quantized_nodes"] == count_quantized(everything) - 1
    graph = onnx.load(kept).graph
    dq_outputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    node = next(n for n in graph.node if n.name == victim)
    assert not any(i in dq_outputs for i in node.input)
    with pytest.raises(UserError, match="not found in .*no_such_node"):
        quantize_int8(fp32_models["dab_detr"], str(tmp_path / "x.onnx"), paths[:2], student_io.spec,
                      nodes_to_exclude=["no_such_node"])


def test_int8_sensitivity_ranks_every_weighted_node(tmp_path, calibration, student_io):
    height, width, topk, spec = student_io.height, student_io.width, student_io.topk, student_io.spec
    paths, _ = calibration
    path = str(tmp_path / "standin.onnx")
    standin = StandInDetector(len(student_io.classes))
    export_onnx(standin, path, height=height, width=width, topk=topk, simplify=False)
    nodes = [n.name for n in onnx.load(path).graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    assert len(nodes) == 4
    result = int8_sensitivity(path, paths[:4], spec, num_images=2, nodes_to_exclude=[nodes[0]], top=2)
    ranked = [r["node"] for r in result["nodes"]]
    assert sorted(ranked) == sorted(nodes[1:])  # the excluded node is not tried
    errors = [r["error"] for r in result["nodes"]]
    assert errors == sorted(errors, reverse=True) and min(errors) > 0
    assert result["top"] == ranked[:2] and result["images"] == 2
    for r in result["nodes"]:
        assert r["error"] == pytest.approx(r["scores_max_abs"] + r["boxes_max_abs"] / width)
    assert result["full"]["error"] > 0


def test_calibration_feeds_are_runtime_preprocessing(calibration, student_io):
    from clock_deploy.export.precision import ImageReader
    paths, images = calibration
    reader = ImageReader(paths[:4], student_io.spec, batch=2)
    feeds = [reader.get_next() for _ in range(3)]
    assert feeds[2] is None and len(reader) == 2
    np.testing.assert_array_equal(np.concatenate([f["images"] for f in feeds[:2]]), images)
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["images"], images[:2])
    with pytest.raises(UserError, match="fewer than the model's batch"):
        ImageReader(paths[:1], student_io.spec, batch=2)

