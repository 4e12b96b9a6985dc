"""FP32 ONNX -> FP16 ONNX and INT8 Q/DQ ONNX, both runnable by onnxruntime (CPU) and TensorRT.

FP16: onnxruntime's float16 converter stores weights and activations in float16, keeps the
graph inputs / outputs float32 and runs numerically fragile ops in float32 (their inputs
are cast up and their outputs back down): Sigmoid and TopK of the score ranking,
normalizations and softmax (reductions that overflow or lose precision in float16), Log
(inverse sigmoid of the box refinement), sine position embeddings and GridSample.

INT8: explicit quantization in the form TensorRT's explicit-quantization builder expects,
then FP16 for everything else (TensorRT 11 and TensorRT-RTX are strongly typed: what the
graph says is what runs). onnxruntime writes QuantizeLinear / DequantizeLinear pairs (QDQ),
int8 symmetric activations and per-channel weights, float bias, on Conv / MatMul / Gemm
inputs; the activation ranges come from calibration images listed in a manifest
(calibration.py), preprocessed exactly as the runtime does, and are stored in the Q/DQ
scales (TensorRT needs no calibration cache). A post-pass (finish_qdq) then
- lets only the weighted layers read quantized activations, plus the shortcut input of
  residual Adds after a convolution, which NVIDIA's Q/DQ placement guide quantizes so the
  Add fuses into the convolution (ResNet blocks; a downsampling shortcut has no quantized
  tensor to reuse and stays float);
- drops the Q/DQ pairs nobody reads any more (onnxruntime also quantizes every Conv / MatMul
  output: a third of all Q/DQ nodes);
- converts the rest of the graph to FP16 with the FP16 export's exclusions, at opset 19 so
  the Q/DQ scales are float16 too (no float32 islands around every quantized layer).
The sensitivity analysis calibrates once and reuses the ranges for every node it tries.
"""
import contextlib
import inspect
import logging
import os
import tempfile

import onnx
from onnx import version_converter
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from clock_deploy.artifact import INPUT_NAME
from clock_deploy.errors import UserError
from clock_deploy.export.parity import compare, run_onnx
from clock_deploy.io import atomic_path
from clock_deploy.runtime.preprocess import preprocess

log = logging.getLogger(__name__)

FP16_KEEP_FP32_OPS = ["Sigmoid", "TopK", "Softmax", "LayerNormalization", "InstanceNormalization", "ReduceMean",
                      "Log", "Sin", "Cos", "GridSample"]
INT8_OP_TYPES = ["Conv", "MatMul", "Gemm"]
INT8_OPTIONS = {
    "ActivationSymmetric": True,  # TensorRT supports only symmetric (zero point 0) int8
    "WeightSymmetric": True,
    "QuantizeBias": False,        # TensorRT fuses float bias into int8 convolutions itself
}


def to_fp16(model, keep_fp32_ops=FP16_KEEP_FP32_OPS):
    """FP16 copy of `model`: the one FP16 rule of the FP16 export and of the INT8 export's remainder.
    Graph inputs / outputs stay float32, and so do onnxruntime's default blocked ops and `keep_fp32_ops`."""
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops))
    fp16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    sort_nodes(fp16.graph)  # the converter appends its input casts at the end
    return fp16


def convert_fp16(src, dst, keep_fp32_ops=FP16_KEEP_FP32_OPS):
    """Write the FP16 version of ONNX `src` to `dst` (float32 inputs / outputs kept)."""
    fp16 = to_fp16(onnx.load(os.fspath(src)), keep_fp32_ops)
    onnx.checker.check_model(fp16)
    with atomic_path(dst) as tmp:
        onnx.save(fp16, tmp)
    return {"keep_fp32_ops": list(keep_fp32_ops)}


def sort_nodes(graph):
    """Reorder graph.node topologically (producers before consumers), keeping the order otherwise."""
    produced_by = {out: i for i, node in enumerate(graph.node) for out in node.output}
    done, order = set(), []

    def visit(i):
        stack = [(i, False)]
        while stack:
            j, expanded = stack.pop()
            if j in done:
                continue
            if expanded:
                done.add(j)
                order.append(graph.node[j])
                continue
            stack.append((j, True))
            stack.extend((produced_by[name], False) for name in reversed(graph.node[j].input)
                         if name in produced_by and produced_by[name] not in done)

    for i in range(len(graph.node)):
        visit(i)
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in order]
    del graph.node[:]
    graph.node.extend(nodes)


class ImageReader(CalibrationDataReader):
    """onnxruntime calibration reader over image files, preprocessed like the runtime.

    batch: images per feed (a static-batch model needs exactly its batch; an incomplete
    last group is dropped).
    """

    def __init__(self, paths, input_spec, batch=1):
        if len(paths) < batch:
            raise UserError(f"{len(paths)} calibration images are fewer than the model's batch of {batch}")
        self.paths, self.input_spec, self.batch = list(paths), input_spec, batch
        self._feeds = None

    def __len__(self):
        return len(self.paths) // self.batch

    def _generate(self):
        for i in range(len(self)):
            chunk = self.paths[i * self.batch:(i + 1) * self.batch]
            yield {INPUT_NAME: preprocess(chunk, self.input_spec)[0]}

    def get_next(self):
        if self._feeds is None:
            self._feeds = self._generate()
        return next(self._feeds, None)

    def rewind(self):
        self._feeds = None

    def __iter__(self):
        return self._generate()


def _supports_calibration_cache():
    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


@contextlib.contextmanager
def onnxruntime_logs_at_debug():
    """onnxruntime's quantizer logs through the root logger (`logging.info(...)`), whose first use
    installs a stderr handler (logging.basicConfig): every later record of clock_deploy was printed
    twice, once as "INFO:clock_deploy...". While the block runs, the root logger has a handler that
    passes other libraries' records to this module's logger at debug level instead."""
    class ToDebug(logging.Handler):
        def emit(self, record):
            if not record.name.startswith("clock_deploy"):  # ours reach the root too: not again
                log.debug(f"{record.name}: {record.getMessage()}")

    root, handler = logging.getLogger(), ToDebug()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


def preprocess_for_quantization(src, dst):
    """onnxruntime's quant_pre_process: shape inference + standard-op graph cleanup before quantizing.

    Symbolic shape inference gives the most shapes but rejects some traced reshapes
    (unsimplified graphs); ONNX's own shape inference is used then.
    """
    with onnxruntime_logs_at_debug():
        try:
            quant_pre_process(os.fspath(src), os.fspath(dst))
        except Exception:  # symbolic_shape_infer asserts on shapes it cannot follow
            quant_pre_process(os.fspath(src), os.fspath(dst), skip_symbolic_shape=True)


def _quantize(src, dst, reader, nodes_to_exclude=(), nodes_to_quantize=None, cache=None):

    # ranges computed once are reused where onnxruntime can (>= 1.26); older versions recalibrate
    kwargs = {"calibration_cache_path": cache} if cache and _supports_calibration_cache() else {}
    with onnxruntime_logs_at_debug():
        quantize_static(os.fspath(src), os.fspath(dst), reader, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=INT8_OP_TYPES, per_channel=True, reduce_range=False,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_quantize=nodes_to_quantize, nodes_to_exclude=list(nodes_to_exclude),
                        extra_options=dict(INT8_OPTIONS), **kwargs)


def quantize_int8(src, dst, image_paths, input_spec, batch=1, nodes_to_exclude=()):
    """Write the INT8 Q/DQ version of FP32 ONNX `src` to `dst`, calibrated on `image_paths`."""
    with tempfile.TemporaryDirectory(prefix="clock-deploy-int8-") as tmp_dir:
        pre = os.path.join(tmp_dir, "pre.onnx")
        preprocess_for_quantization(src, pre)
        names = {n.name for n in onnx.load(pre).graph.node}
        unknown = [n for n in nodes_to_exclude if n not in names]
        if unknown:
            raise UserError(f"nodes to keep in float not found in {src}: {unknown} "
                            "(names come from the ONNX graph, e.g. as listed by the INT8 sensitivity report: "
                            "Exporter.run(sensitivity=True))")
        reader = ImageReader(image_paths, input_spec, batch)
        with atomic_path(dst) as tmp:
            _quantize(pre, tmp, reader, nodes_to_exclude)
            model, qdq = finish_qdq(onnx.load(tmp))
            onnx.save(model, tmp)
    return {"images": len(reader) * batch, "op_types": INT8_OP_TYPES, "options": INT8_OPTIONS,
            "nodes_excluded": list(nodes_to_exclude), "quantized_nodes": count_quantized(dst),
            "remainder": "fp16", "keep_fp32_ops": list(FP16_KEEP_FP32_OPS), "qdq": qdq}


def finish_qdq(model):
    """onnxruntime's Q/DQ model -> (TensorRT-ready INT8 + FP16 model, Q/DQ node counts before / after)."""
    before = qdq_counts(model.graph)
    float_for_other_readers(model.graph)
    drop_orphan_qdq(model.graph)
    model = fp16_remainder(model)
    onnx.checker.check_model(model)
    return model, {"before": before, "after": qdq_counts(model.graph)}


def float_for_other_readers(graph):
    """Let only Conv / MatMul / Gemm (and residual shortcuts) read quantized activations.

    onnxruntime gives a quantized tensor one Q/DQ pair shared by all its readers, so a
    Shape or a transformer's residual Add next to a projection would read the int8-rounded
    value too. Those readers are rewired to the float tensor; the shortcut input of a
    residual Add after a convolution keeps its quantized value (module docstring).
    """
    producers = {out: node for node in graph.node for out in node.output}
    float_of = {}
    for node in graph.node:
        quantize = producers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if quantize is not None and quantize.op_type == "QuantizeLinear":
            float_of[node.output[0]] = quantize.input[0]
    quantized = {value: dq for dq, value in float_of.items()}
    constants = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type in INT8_OP_TYPES:
            continue
        for i, name in enumerate(node.input):
            node.input[i] = float_of.get(name, name)
        shortcut = residual_shortcut(node, producers, constants)
        if shortcut is not None and node.input[shortcut] in quantized:
            node.input[shortcut] = quantized[node.input[shortcut]]


def residual_shortcut(node, producers, constants):
    """Index of the shortcut input when `node` is a residual Add of a convolution branch, else None.

    The convolution branch is a Conv output, possibly through a frozen batch norm (Mul / Add
    with a constant); the other input is the shortcut.
    """
    if node.op_type != "Add" or len(node.input) != 2 or any(i in constants for i in node.input):
        return None

    def from_conv(name):
        step = producers.get(name)
        while step is not None and step.op_type in ("Mul", "Add", "DequantizeLinear", "QuantizeLinear"):
            inputs = [i for i in step.input if i not in constants]
            if step.op_type in ("Mul", "Add") and len(inputs) != 1:
                return False
            step = producers.get(inputs[0]) if inputs else None
        return step is not None and step.op_type == "Conv"

    branches = [from_conv(name) for name in node.input]
    if branches.count(True) != 1:
        return None  # two convolution branches (downsampling shortcut) or none: not a plain residual
    return branches.index(False)


def drop_orphan_qdq(graph):
    """Remove Q / DQ nodes whose outputs nobody reads (repeatedly: a Q may feed only orphan DQs)."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        orphans = [n for n in graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in read for o in n.output)]
        if not orphans:
            break
        for node in orphans:
            graph.node.remove(node)
    used = {i for n in graph.node for i in n.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)


def qdq_counts(graph):
    return {op: sum(1 for n in graph.node if n.op_type == op) for op in ("QuantizeLinear", "DequantizeLinear")}


def fp16_remainder(model, keep_fp32_ops=FP16_KEEP_FP32_OPS):
    """FP16 copy of a Q/DQ model: everything but the quantized values and the kept ops in float16.

    Q/DQ take float16 scales from opset 19 on, so the model is raised to opset 19 first.
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 19:
        model = version_converter.convert_version(model, 19)
    return to_fp16(model, keep_fp32_ops)


def count_quantized(path):
    """Number of DequantizeLinear nodes feeding a Conv / MatMul / Gemm activation or weight."""
    graph = onnx.load(os.fspath(path)).graph
    dq_outputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return sum(1 for n in graph.node if n.op_type in INT8_OP_TYPES and any(i in dq_outputs for i in n.input))


def int8_sensitivity(src, image_paths, input_spec, num_images=4, nodes_to_exclude=(), top=10):
    """Output error of quantizing ONE Conv / MatMul / Gemm node at a time, worst first.

    Ranges are calibrated once on `image_paths`; the error is measured on the first
    `num_images` of them against the FP32 model with parity.compare: max abs difference
    of all raw scores, and of all raw boxes in pixels. `error` = scores + boxes / max(H, W).
    The fully quantized model's error is given too, for scale.
    Returns {"images", "full": {...}, "nodes": [{"node", "op_type", "error", ...}, ...], "top": [names]}.
    """
    height, width = input_spec["height"], input_spec["width"]
    images = preprocess(image_paths[:num_images], input_spec)[0]

    def error(path, reference):
        diff = compare(reference, run_onnx(path, images), height, width)
        return {**diff, "error": diff["scores_max_abs"] + diff["boxes_max_abs"] / max(height, width)}

    with tempfile.TemporaryDirectory(prefix="clock-deploy-sens-") as tmp_dir:
        pre = os.path.join(tmp_dir, "pre.onnx")
        preprocess_for_quantization(src, pre)
        reference = run_onnx(pre, images)
        cache = os.path.join(tmp_dir, "ranges.json")
        reader = ImageReader(image_paths, input_spec)
        full = os.path.join(tmp_dir, "full.onnx")
        _quantize(pre, full, reader, nodes_to_exclude, cache=cache)
        result = {"images": len(images), "full": error(full, reference), "nodes": []}
        skip = set(nodes_to_exclude)
        candidates = [n for n in onnx.load(pre).graph.node if n.op_type in INT8_OP_TYPES and n.name not in skip]
        one = os.path.join(tmp_dir, "one.onnx")
        for node in candidates:
            reader.rewind()
            _quantize(pre, one, reader, nodes_to_quantize=[node.name], cache=cache)
            result["nodes"].append({"node": node.name, "op_type": node.op_type, **error(one, reference)})
    result["nodes"].sort(key=lambda r: r["error"], reverse=True)
    result["top"] = [r["node"] for r in result["nodes"][:top]]
    return result

