"""Engine precision report: parsing both layer-information sources and judging FP32 layers."""
import json

from clock_deploy.export.engine_report import (describe, dtype_precision, layer_precision, parse_inspector_json,
                                               parse_layer_listing, summarize)

LISTING = """Layers:
Name: conv_myl0_2, LayerType: correlation, Inputs: [ { Name: a, Dimensions: [-1,4,64,128], Datatype: Int8, Format: (NHWC) }], Constants: [ { Name: w, Datatype: Int8 }], Outputs: [ { Name: b, Datatype: Half, Format: x }], TacticName: __myelin_CASK_STUB, StreamId: 0, Metadata: [ONNX Layer: /backbone/conv1/Conv][ONNX Layer: images_DequantizeLinear]
Name: norm_myl0_3, LayerType: runtime_function, Inputs: [ { Name: b, Datatype: Float }], Constants: [], Outputs: [ { Name: c, Datatype: Float }], TacticName: , StreamId: 0, Metadata: [ONNX Layer: /neck/InstanceNormalization]
Name: add_myl0_4, LayerType: kgen, Inputs: [ { Name: c, Datatype: Float }], Constants: [], Outputs: [ { Name: d, Datatype: Float }], TacticName: , StreamId: 0, Metadata: [ONNX Layer: /decoder/Add]
Name: shape_myl0_5, LayerType: shape_call, Inputs: [], Constants: [], Outputs: [], TacticName: , StreamId: 0, Metadata: 

I/O Tensors:
 Name: images, IOMode: Input, DataType: Float
"""
OP_TYPES = {"/backbone/conv1/Conv": "Conv", "/neck/InstanceNormalization": "InstanceNormalization",
            "/decoder/Add": "Add"}


def test_precision_of_data_types_and_layers():
    assert [dtype_precision(t) for t in ("Int8", "Half", "Float", "Int64", "Row major linear FP16 format",
                                         "Channel major FP32 format", "BFloat16")] == \
        ["int8", "fp16", "fp32", "other", "fp16", "fp32", "other"]
    assert layer_precision(["Float", "Int8"]) == "int8" and layer_precision(["Float", "Half"]) == "fp16"
    assert layer_precision(["Int64"]) == "other" and layer_precision([]) == "other"


def test_builder_listing_and_inspector_json_give_the_same_layers():
    listing = parse_layer_listing(LISTING)
    assert [(l["type"], l["precision"]) for l in listing] == [
        ("correlation", "int8"), ("runtime_function", "fp32"), ("kgen", "fp32"), ("shape_call", "other")]
    assert listing[0]["onnx"] == ["/backbone/conv1/Conv", "images_DequantizeLinear"]
    inspector = json.dumps({"Layers": [
        {"Name": "conv", "LayerType": "CaskConvolution", "Inputs": [{"Format/Datatype": "Channel major INT8 format"}],
         "Outputs": [{"Format/Datatype": "Channel major FP16 format"}], "Metadata": "[ONNX Layer: /backbone/conv1/Conv]"},
        {"Name": "norm", "LayerType": "PluginV2", "Inputs": [{"Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Format/Datatype": "Row major linear FP32"}], "Metadata": "[ONNX Layer: /neck/InstanceNormalization]"},
    ], "Bindings": ["images"]})
    assert [(l["type"], l["precision"], l["onnx"]) for l in parse_inspector_json(inspector)] == [
        ("CaskConvolution", "int8", ["/backbone/conv1/Conv"]),
        ("PluginV2", "fp32", ["/neck/InstanceNormalization"])]
    assert parse_inspector_json(json.dumps({"Layers": ["conv", "norm"]})) == []  # built without DETAILED


def test_fp32_layers_are_kept_only_with_a_reason(monkeypatch):
    import clock_deploy.export.engine_report as report_module

    monkeypatch.setattr(report_module, "_onnx_op_types", lambda path: OP_TYPES)
    report = summarize(parse_layer_listing(LISTING), "builder log", "model.onnx", keep_ops=["InstanceNormalization"])
    assert report["int8"] == 1 and report["fp32"] == 2 and report["other"] == 1 and report["total"] == 4
    assert report["int8_types"] == {"correlation": 1}
    reasons = {l["onnx"][0]: l["reason"] for l in report["fp32_layers"]}
    assert "InstanceNormalization" in reasons["/neck/InstanceNormalization"]
    assert reasons["/decoder/Add"] is None and report["fp32_unexplained"] == 1  # an FP32 Add is not explained
    assert describe(report) == "1 int8, 0 fp16, 2 fp32 (1 kept in float, 1 unexplained), 1 other layers"
    assert describe({"source": None}) == "layer precisions unavailable"
