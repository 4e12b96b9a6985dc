"""Bench backend names ("torch", "onnx-int8", "trt-fp16-dla0" ...) and whether a device can run them."""
import importlib.util
import re
from dataclasses import dataclass

import onnxruntime

from clock_deploy.errors import UserError
from clock_deploy.naming import API, CONFIG, option
from clock_deploy.nvidia import BUILDERS, INSTALL_HINT

DEFAULT_BACKENDS = ("torch", "onnx", "onnx-fp16", "onnx-int8", "trt-fp16", "trt-int8")
BACKEND_PATTERN = re.compile(r"^(torch|onnx(?:-(fp16|int8))?|trt-(fp32|fp16|int8)(?:-dla(\d))?)$")


@dataclass(frozen=True)
class Backend:
    """A backend name (e.g. 'trt-int8-dla0') taken apart."""
    name: str
    runtime: str        # torch | onnxruntime | tensorrt
    precision: str      # fp32 | fp16 | int8
    dla_core: int = -1  # -1: GPU only

    @property
    def suffix(self):
        """File name ending of the exported artifact, as the exporter names it: 'onnx', 'fp16.onnx', 'int8.engine'."""
        if self.runtime == "onnxruntime":
            return "onnx" if self.precision == "fp32" else f"{self.precision}.onnx"
        return f"{self.precision}.engine"


def parse_backend(name):
    m = BACKEND_PATTERN.match(name.strip())
    if not m:
        raise UserError(f"backends: unknown backend '{name}'; choose from {', '.join(DEFAULT_BACKENDS)}, "
                        "trt-fp32, or a TensorRT backend with a DLA core such as trt-fp16-dla0")
    if m.group(1) == "torch":
        return Backend("torch", "torch", "fp32")
    if m.group(1).startswith("onnx"):
        return Backend(m.group(1), "onnxruntime", m.group(2) or "fp32")
    dla = int(m.group(4)) if m.group(4) is not None else -1
    if dla >= 0 and m.group(3) == "fp32":
        raise UserError(f"backends: {name}: DLA runs FP16 or INT8 only (trt-fp16-dla{dla}, trt-int8-dla{dla})")
    return Backend(m.group(1), "tensorrt", m.group(3), dla)


def unavailable_reason(backend, profile, calib=None, via=API):
    """Why `backend` cannot run on `profile`'s device, or None when it can (options named as `via` gives them)."""

    def device(*kinds):
        return " or ".join(option("device", k, via) for k in kinds)

    if backend.precision == "int8" and not calib:
        return (f"INT8 needs a calibration manifest: set {option('calib', via=API if via == CONFIG else via)} "
                "(make one with `clock-deploy calibrate`)")
    if backend.runtime == "onnxruntime":
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime not installed (pip install onnxruntime)"
        if profile.kind != "cpu":
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return ("CUDA EP not available in onnxruntime (install onnxruntime-gpu: pip install "
                        "clock-deploy[gpu], in a separate environment)")
    if backend.runtime == "tensorrt":
        if not any(importlib.util.find_spec(module) for module in BUILDERS.values()):  # TensorRT or TensorRT-RTX
            gpu_note = f"; it also needs an NVIDIA GPU ({device('cuda', 'jetson-orin')})" if profile.kind == "cpu" \
                else ""
            return f"TensorRT not installed: {INSTALL_HINT}{gpu_note}"
        if profile.kind == "cpu":
            return f"TensorRT runs on an NVIDIA GPU only: use {device('cuda', 'jetson-orin')}"
        if backend.dla_core >= 0 and profile.kind != "jetson-orin":
            return f"DLA cores exist on Jetson modules only ({device('jetson-orin')})"
        if backend.dla_core >= profile.dla_cores:
            return f"{profile.name} has {profile.dla_cores} DLA core(s); dla{backend.dla_core} does not exist"
    return None
