"""The bench's export cache: which checkpoints are measured, where their exports live, whether an
export can be reused, and exporting the missing ones."""
import os
from dataclasses import dataclass

from clock_deploy.artifact import read_metadata, sidecar_path
from clock_deploy.checkpoint import checkpoint_config, read_checkpoint
from clock_deploy.errors import UserError, one_line
from clock_deploy.export.exporter import Exporter


@dataclass
class Model:
    """A checkpoint to benchmark, with what the parent needs to know about it."""
    name: str
    checkpoint: str
    data: dict          # format / classes of its training data (the root and split come from the bench)
    weights_mb: float   # tensors the torch backend loads (a checkpoint file also holds optimizer state)
    arch: str = ""      # model.arch, for the report's row labels
    params: int = 0     # parameters: the state without normalization statistics (frozen BN affine terms, <0.2%, count)
    method: str = ""    # distill.method the checkpoint was trained with ("none": plain training)


NOT_PARAMETERS = ("running_mean", "running_var", "num_batches_tracked")


def read_model(name, path):

    ckpt = read_checkpoint(path)
    cfg = checkpoint_config(ckpt, path)
    state = ckpt["ema"] if "ema" in ckpt else ckpt["model"]  # the weights runtime.load_model uses
    size = sum(t.numel() * t.element_size() for t in state.values())
    params = sum(t.numel() for k, t in state.items() if not k.endswith(NOT_PARAMETERS))
    return Model(name, os.fspath(path), {"format": cfg.data.format, "classes": cfg.data.classes}, size / 2**20,
                 cfg.model.arch, params, cfg.distill.method)


def artifact_path(artifacts_dir, model, backend):
    """Where the artifact of `model` on `backend` is cached; a DLA engine gets a folder of its own
    because the exporter names engines by precision only."""
    if backend.runtime == "torch":
        return model.checkpoint
    folder = os.path.join(artifacts_dir, model.name)
    if backend.dla_core >= 0:
        folder = os.path.join(folder, f"dla{backend.dla_core}")
    return os.path.join(folder, f"{model.name}.{backend.suffix}")


def is_fresh(path, inputs, batch):
    """An exported artifact can be reused: it and its sidecar exist, it is newer than every input
    file, and it was exported for this batch size."""
    if not (os.path.isfile(path) and os.path.isfile(sidecar_path(path))):
        return False
    if any(os.path.getmtime(p) > os.path.getmtime(path) for p in inputs if p):
        return False
    try:
        return read_metadata(path)["batch"]["max"] == batch
    except (UserError, KeyError, TypeError):
        return False


def export_artifacts(model, backends, artifacts_dir, calib, batch):
    """Export the artifacts of `backends` that are missing or stale; returns {backend name: error}."""
    stale = [b for b in backends if b.runtime != "torch" and not is_fresh(
        artifact_path(artifacts_dir, model, b), [model.checkpoint, calib if b.precision == "int8" else None], batch)]
    folders = {}
    for b in stale:
        folders.setdefault(os.path.dirname(artifact_path(artifacts_dir, model, b)), []).append(b)
    errors = {}
    for folder, group in folders.items():
        errors.update(_export_folder(model, group, folder, calib, batch))
    return errors


def _export_folder(model, backends, folder, calib, batch):
    """One Exporter.run per precision: it writes the FP32 ONNX, the FP16 / INT8 ONNX made from
    it and, when a TensorRT backend of that precision is asked for, its engine."""
    try:
        # a folder holds GPU or one DLA core's engines
        exporter = Exporter(model.checkpoint, folder, model.name, batch=batch,
                            overrides={"calib": calib, "dla_core": backends[0].dla_core})
    except UserError as e:
        return {b.name: f"export failed: {e}" for b in backends}
    runs = {}  # precision of a run -> the backends it provides
    for b in backends:
        runs.setdefault(b.precision, []).append(b)
    if len(runs) > 1 and all(b.runtime == "onnxruntime" for b in runs.get("fp32", [])):
        fp32 = runs.pop("fp32", [])  # every run writes the FP32 ONNX first: no run of its own needed
        runs[next(iter(runs))] += fp32
    errors = {}
    for precision, group in runs.items():
        trt = any(b.runtime == "tensorrt" and b.precision == precision for b in group)
        try:
            exporter.run(precision, trt=trt, map_images=0)
        except Exception as e:  # one failing precision must not stop the others
            errors.update({b.name: f"export failed: {one_line(e)}" for b in group})
    return errors
