"""Which precision each layer of a built TensorRT engine runs in.

Two sources give the same per-layer information (name, type, input / output data types,
the ONNX nodes it was made from), both needing ProfilingVerbosity.DETAILED at build time:
- the engine inspector's JSON, which needs the engine deserialized, so a GPU;
- the builder's verbose log, whose "Layers:" listing TensorRT-RTX prints at the end of
  every build, also on a machine without a GPU (the project's CI).

A layer's precision: int8 when it reads or writes an INT8 tensor (quantized convolutions,
GEMMs, quantize steps), else fp16 when it touches a half tensor, else fp32 when it touches
a float tensor, else other (shape and index arithmetic). FP32 layers of a reduced-precision
engine are "kept" when they hold a node the FP16 conversion deliberately leaves in float
(precision.FP16_KEEP_FP32_OPS: sigmoid / top-k ranking, normalizations, softmax, log, sin /
cos, grid sampling) or a Cast to float32 feeding one (or the float32 graph outputs); any
other FP32 layer is listed as unexplained.
"""
import json
import re

import onnx

from clock_deploy.export.precision import FP16_KEEP_FP32_OPS

LAYER_LISTING_HEADER = "Layers:"
PRECISION_ORDER = ("int8", "fp16", "fp32", "other")
MAX_LISTED = 40  # FP32 layers listed by name in the sidecar


def dtype_precision(text):
    """'Half' / 'Row major linear FP16 format' / 'Int8' ... -> 'fp16' / 'int8' / 'fp32' / 'other'."""
    text = text.lower()
    if "int8" in text:
        return "int8"
    if "half" in text or "fp16" in text:
        return "fp16"
    if "bfloat" in text or "bf16" in text:
        return "other"
    if "float" in text or "fp32" in text:
        return "fp32"
    return "other"


def layer_precision(dtypes):
    """Precision of a layer from the data types of its inputs and outputs (module docstring)."""
    found = {dtype_precision(t) for t in dtypes}
    return next((p for p in PRECISION_ORDER if p in found), "other")


def _onnx_nodes(metadata):
    return re.findall(r"ONNX Layer: ([^\]]+)", metadata or "")


def parse_layer_listing(text):
    """Layers of the builder's verbose "Layers:" message: [{name, type, precision, onnx}]."""
    layers = []
    for line in text.splitlines():
        match = re.match(r"\s*Name: (.*?), LayerType: (\w+), Inputs: (.*), Constants: .*, Outputs: (.*), "
                         r"TacticName: .*?Metadata: ?(.*)$", line)
        if match is None:
            continue
        name, kind, inputs, outputs, metadata = match.groups()
        dtypes = re.findall(r"Datatype: (\w+)", inputs + outputs)
        layers.append({"name": name, "type": kind, "precision": layer_precision(dtypes),
                       "onnx": _onnx_nodes(metadata)})
    return layers


def parse_inspector_json(text):
    """Layers of the engine inspector's JSON (LayerInformationFormat.JSON, DETAILED verbosity)."""
    layers = []
    for layer in json.loads(text).get("Layers", []):
        if not isinstance(layer, dict):  # names only: the engine was built without DETAILED verbosity
            return []
        tensors = layer.get("Inputs", []) + layer.get("Outputs", [])
        dtypes = [t.get("Format/Datatype", "") for t in tensors if isinstance(t, dict)]
        layers.append({"name": layer.get("Name", ""), "type": layer.get("LayerType", ""),
                       "precision": layer_precision(dtypes), "onnx": _onnx_nodes(layer.get("Metadata", ""))})
    return layers


def inspect_engine(trt, serialized):
    """Inspector JSON of a serialized engine, or None when it cannot be deserialized here (no GPU)."""
    if not hasattr(trt, "Runtime"):
        return None
    try:
        engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(serialized)
        if engine is None:
            return None
        return engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    except Exception:  # no CUDA device or driver: the report says it is unavailable
        return None


def kept_float_reason(onnx_nodes, op_types, keep_ops):
    """Why a layer made of `onnx_nodes` may run in FP32, or None when nothing explains it."""
    kinds = {op_types.get(n) for n in onnx_nodes}
    kept = sorted(kinds & set(keep_ops))
    if kept:
        return f"holds {', '.join(kept)} (kept in float)"
    if any(op_types.get(n) == "Cast->float" for n in onnx_nodes):
        return "casts to float32 for a kept op or a float32 output"
    return None


def _onnx_op_types(onnx_path):
    """{node name: op type} of the ONNX the engine was built from ('Cast->float' for casts to float32)."""
    types = {}
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        to_float = node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT
                                                  for a in node.attribute)
        types[node.name] = "Cast->float" if to_float else node.op_type
    return types


def summarize(layers, source, onnx_path=None, keep_ops=None):
    """The sidecar's `layers` section: counts per precision, and for an engine with any
    reduced-precision layer, its FP32 layers with the reason each is kept (or none)."""
    counts = {p: sum(1 for layer in layers if layer["precision"] == p) for p in PRECISION_ORDER}
    report = {"source": source, "total": len(layers), **counts}
    if counts["int8"]:  # which kinds of layer run in INT8 (convolutions, GEMMs, quantize steps)
        kinds = [layer["type"] for layer in layers if layer["precision"] == "int8"]
        report["int8_types"] = {kind: kinds.count(kind) for kind in sorted(set(kinds))}
    if counts["int8"] + counts["fp16"] == 0:
        return report
    if keep_ops is None:
        keep_ops = FP16_KEEP_FP32_OPS
    op_types = _onnx_op_types(onnx_path) if onnx_path else {}
    fp32 = []
    for layer in layers:
        if layer["precision"] == "fp32":
            fp32.append({"name": layer["name"], "type": layer["type"], "onnx": layer["onnx"][:8],
                         "reason": kept_float_reason(layer["onnx"], op_types, keep_ops)})
    report["fp32_unexplained"] = sum(1 for layer in fp32 if layer["reason"] is None)
    report["fp32_layers"] = fp32[:MAX_LISTED]
    return report


def layer_precisions(trt, serialized, layer_listing=None, onnx_path=None):
    """Precision report of a just-built engine: from the inspector where the engine loads here,
    else from the builder's layer listing; {"source": None, ...} when neither is available."""
    text = inspect_engine(trt, serialized) if layer_listing is None else None
    if text is not None:
        return summarize(parse_inspector_json(text), "engine inspector", onnx_path)
    if layer_listing is not None:
        return summarize(parse_layer_listing(layer_listing), "builder log", onnx_path)
    return {"source": None, "note": "no layer information: the engine cannot be inspected without a GPU here"}


def describe(report):
    """'12 int8, 40 fp16, 5 fp32 (5 kept in float), 3 other layers' for printouts and tables."""
    if not report or not report.get("source"):
        return "layer precisions unavailable"
    text = ", ".join(f"{report[p]} {p}" for p in PRECISION_ORDER[:3])
    if "fp32_unexplained" in report:
        kept = report["fp32"] - report["fp32_unexplained"]
        text += f" ({kept} kept in float, {report['fp32_unexplained']} unexplained)"
    return f"{text}, {report['other']} other layers"
