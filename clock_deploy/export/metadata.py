"""The sidecar `<artifact>.json` written next to every exported model.

It is everything a runtime needs to use the artifact without the training code: the
input size and normalization, the class names, the precision and batch profile, and
where the file came from (checkpoint sha256, toolkit / opset / onnxruntime / TensorRT
versions, calibration manifest, parity results). This module is torch-free because
the runtime reads it.
"""
import datetime
import os

from clock_deploy import __version__
from clock_deploy.errors import UserError
from clock_deploy.io import read_json, write_json

FORMAT = "clock-deploy-artifact-v1"

# the ONNX / TensorRT I/O contract (DESIGN.md, "Export contract")
INPUT_NAME = "images"
OUTPUT_NAMES = ("scores", "labels", "boxes")
OUTPUT_DOC = {
    "scores": "[N, K] float32, sorted high to low",
    "labels": "[N, K] int64, index into classes",
    "boxes": "[N, K, 4] float32 x1, y1, x2, y2 in network-input pixels",
}
PRECISIONS = ("fp32", "fp16", "int8")
REQUIRED_KEYS = ("format", "classes", "input", "topk", "batch", "precision")


def sidecar_path(artifact):
    return os.fspath(artifact) + ".json"


def package_versions():
    """Versions of the export toolchain that are importable here (absent ones are left out)."""
    versions = {"clock_deploy": __version__}
    for name in ("torch", "onnx", "onnxruntime", "onnxslim", "tensorrt"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        versions[name] = getattr(module, "__version__", "unknown")
    return versions


def input_spec(height, width, mean, std):
    """How raw RGB pixels become the network input: (pixel / divisor - mean) / std after resizing."""
    return {
        "name": INPUT_NAME,
        "layout": "NCHW",
        "dtype": "float32",
        "height": int(height),
        "width": int(width),
        "color": "RGB",
        "resize": "PIL bilinear to height x width, aspect ratio not kept",
        "divisor": 255.0,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }


def batch_spec(dynamic, batch):
    """Batch sizes an artifact accepts. Dynamic: 1..batch (TensorRT profile min 1, opt = max = batch)."""
    batch = int(batch)
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    return {"dynamic": bool(dynamic), "min": 1 if dynamic else batch, "opt": batch, "max": batch}


def build_metadata(*, kind, arch, classes, height, width, mean, std, precision, topk, batch,
                   source=None, opset=None, sampling=None, calibration=None, parity=None, **extra):
    """The sidecar dict; `extra` adds sections such as `tensorrt` for engines."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {list(PRECISIONS)}, got '{precision}'")
    meta = {
        "format": FORMAT,
        "kind": kind,
        "arch": arch,
        "classes": list(classes),
        "input": input_spec(height, width, mean, std),
        "outputs": dict(OUTPUT_DOC),
        "topk": int(topk),
        "batch": batch,
        "precision": precision,
        "opset": opset,
        "sampling": sampling,
        "source": source,
        "calibration": calibration,
        "parity": parity,
        "versions": package_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(extra)
    return meta


def write_metadata(artifact, meta):
    write_json(sidecar_path(artifact), meta)


def read_metadata(artifact):
    """Read and check the sidecar of `artifact`; every problem is a UserError naming the file."""
    path = sidecar_path(artifact)
    if not os.path.isfile(path):
        raise UserError(f"{artifact}: metadata sidecar {path} is missing; it is written by "
                        "`clock-deploy export` next to the model and must travel with it")
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a clock-deploy metadata file (expected format '{FORMAT}')")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise UserError(f"{path}: missing keys {missing}")
    for key in ("height", "width", "mean", "std", "divisor"):
        if key not in meta["input"]:
            raise UserError(f"{path}: input.{key} is missing")
    return meta
