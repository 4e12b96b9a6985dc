"""Checkpoint model -> ONNX file that follows the export contract (DESIGN.md).

The graph holds the detector and its post-processing: input `images` [N, 3, H, W]
(normalized as the metadata says), outputs `scores` [N, K], `labels` [N, K] int64 and
`boxes` [N, K, 4] x1y1x2y2 in input pixels, with a dynamic batch axis. It is traced with
the TorchScript exporter (torch.onnx.export(dynamo=False)), checked with onnx.checker,
and optionally simplified with onnxslim; the simplified graph is kept only if it gives
the same detections as the traced one on a random input.
"""
import contextlib
import copy
import logging
import os
import warnings
from typing import Union

import numpy as np
import onnx
import torch

from clock_deploy.artifact import INPUT_NAME, OUTPUT_NAMES
from clock_deploy.errors import one_line
from clock_deploy.export.parity import compare, run_onnx
from clock_deploy.io import atomic_path
from clock_deploy.models.deploy import ExportWrapper
from clock_deploy.models.fuse import fuse_for_inference

log = logging.getLogger(__name__)
DEFAULT_OPSET = 17


@contextlib.contextmanager
def expected_tracing_notes_silenced():
    """Silence the notes torch prints on every TorchScript ONNX export of these models, so that
    an unexpected warning stands out; every torch.onnx.export here (and in the tests) runs in it."""
    with warnings.catch_warnings():
        # shape arithmetic on Python ints is intended: spatial sizes (and the image size the boxes
        # are scaled to) are fixed per export, so the tracer's "treated as a constant" notes are expected
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated, still supported
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # strided slices stay in the graph
        yield


def _trace(wrapper, path, batch, height, width, opset, dynamic):
    example = torch.randn(batch, 3, height, width)
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)} if dynamic else None
    with expected_tracing_notes_silenced():
        torch.onnx.export(wrapper, (example,), path, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False)


def _simplify(model_proto, batch, height, width, tol=1e-5):
    """(onnxslim-simplified copy, None), or (None, reason) when it fails or changes the outputs."""
    import onnxslim  # start-up: half a second to import, and only export.simplify needs it

    try:
        slim = onnxslim.slim(model_proto)
        onnx.checker.check_model(slim)
        images = np.random.default_rng(0).standard_normal((batch, 3, height, width)).astype(np.float32)
        diff = compare(run_onnx(model_proto, images), run_onnx(slim, images), height, width, tol,
                       tol * max(height, width))
    except Exception as e:  # onnxslim is an optimization: any failure keeps the traced graph
        return None, one_line(e)
    worst_score = max(diff["scores_max_abs"], diff["topk_scores_max_abs"])
    worst_box = max(diff["boxes_max_abs"], diff["topk_boxes_max_abs"])
    if worst_score > tol or worst_box > tol * max(height, width) or diff["topk_unmatched"] or diff["label_mismatch"]:
        return None, f"the simplified graph changes the outputs ({diff})"
    return slim, None


def export_onnx(model: torch.nn.Module, path: Union[str, os.PathLike], *, height: int, width: int, topk: int,
                opset: int = DEFAULT_OPSET, dynamic: bool = True, batch: int = 1, simplify: bool = True) -> dict:
    """Write the contract ONNX of `model` (traced in eval mode) to `path` atomically.

    The graph is of a fused copy (models/fuse.py: BatchNorm folded into convs, RepVGG branches merged);
    `model` itself is left as it was. Returns {"opset", "simplified", "simplify_error", "nodes"}; the
    traced graph is kept (with a warning) when onnxslim fails or changes the outputs.
    """
    wrapper = ExportWrapper(fuse_for_inference(copy.deepcopy(model).eval()), topk, (height, width)).eval()
    with atomic_path(path) as tmp, torch.no_grad():
        _trace(wrapper, tmp, batch, height, width, opset, dynamic)
        proto = onnx.load(tmp)
        onnx.checker.check_model(proto, full_check=True)
        error = None
        if simplify:
            slim, error = _simplify(proto, batch, height, width)
            if slim is None:
                log.warning(f"onnxslim simplification skipped for {path}: {error}")
            else:
                proto = slim
                onnx.save(proto, tmp)
    return {"opset": opset, "simplified": simplify and error is None, "simplify_error": error,
            "nodes": len(proto.graph.node)}
