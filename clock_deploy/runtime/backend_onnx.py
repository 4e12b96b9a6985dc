"""onnxruntime backend (no torch): CPU, CUDA or TensorRT execution providers."""
import os

import numpy as np
import onnxruntime as ort

from clock_deploy.artifact import INPUT_NAME, OUTPUT_NAMES
from clock_deploy.errors import UserError, one_line

# tried in this order on a GPU; onnxruntime falls back along the list for unsupported nodes
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
OUTPUT_TYPES = {"scores": ("tensor(float)", 2), "labels": ("tensor(int64)", 2), "boxes": ("tensor(float)", 3)}


def choose_providers(device="cpu", providers=None):
    """Execution providers for `device` ("cpu", "cuda", "cuda:N"), or check an explicit list."""
    available = ort.get_available_providers()
    if providers:
        missing = [p for p in providers if p not in available]
        if missing:
            raise UserError(f"onnxruntime providers {missing} are not available here (available: {available})")
        return list(providers)
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if not device.startswith("cuda"):
        raise UserError(f"device must be 'cpu', 'cuda' or 'cuda:N' for onnxruntime, got '{device}'")
    chosen = [p for p in GPU_PROVIDERS if p in available]
    if "CUDAExecutionProvider" not in chosen:
        raise UserError(f"device '{device}' needs onnxruntime-gpu (CUDAExecutionProvider); "
                        f"this onnxruntime has {available}: `pip install clock-deploy[gpu]` in a separate environment")
    index = int(device.split(":")[1]) if ":" in device else 0
    return [(p, {"device_id": index}) if p != "CPUExecutionProvider" else p for p in chosen]


def check_contract(session, path, meta):
    """The session's inputs / outputs must follow the export contract and agree with the metadata."""
    inputs = session.get_inputs()
    if (len(inputs) != 1 or inputs[0].name != INPUT_NAME or inputs[0].type != "tensor(float)"
            or len(inputs[0].shape) != 4):
        found = [(i.name, i.type, i.shape) for i in inputs]
        raise UserError(f"{path}: expected one float input '{INPUT_NAME}' [N, 3, H, W], found {found}")
    _, channels, height, width = inputs[0].shape
    expected = (3, meta["input"]["height"], meta["input"]["width"])
    if (channels, height, width) != expected:
        raise UserError(f"{path}: input is [N, {channels}, {height}, {width}] but its metadata says "
                        f"[N, {expected[0]}, {expected[1]}, {expected[2]}]")
    outputs = {o.name: o for o in session.get_outputs()}
    if set(outputs) != set(OUTPUT_NAMES):
        raise UserError(f"{path}: outputs are {sorted(outputs)}, expected {list(OUTPUT_NAMES)}")
    for name, (dtype, rank) in OUTPUT_TYPES.items():
        if outputs[name].type != dtype or len(outputs[name].shape) != rank:
            raise UserError(f"{path}: output '{name}' is {outputs[name].type} of rank {len(outputs[name].shape)}, "
                            f"expected {dtype} of rank {rank}")


class OnnxBackend:
    name = "onnxruntime"

    def __init__(self, path, meta, device="cpu", providers=None, threads=0):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise UserError(f"model file not found: {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: e.g. constant-folding notes on an INT8 graph's fp16 parts
        try:
            self.session = ort.InferenceSession(path, options, providers=choose_providers(device, providers))
        except Exception as e:  # onnxruntime raises its own exception types for corrupt / invalid models
            if isinstance(e, UserError):
                raise
            raise UserError(f"{path}: onnxruntime cannot load it ({one_line(e)})") from None
        check_contract(self.session, path, meta)
        batch = self.session.get_inputs()[0].shape[0]
        self.static = isinstance(batch, int)  # a static-batch graph takes exactly max_batch images
        self.max_batch = batch if self.static else None
        self.providers = self.session.get_providers()

    def __call__(self, images):
        """images [N, 3, H, W] float32 -> (scores, labels, boxes) numpy arrays."""
        scores, labels, boxes = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(images)})
        return scores, labels, boxes
