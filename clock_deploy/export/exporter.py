"""Checkpoint -> deployable artifacts, the library side of `clock-deploy export`.

<name>.onnx (FP32, always: the other artifacts are made from it) [-> <name>.fp16.onnx |
<name>.int8.onnx] [-> <name>.<precision>.engine], each with its <file>.json sidecar. Each ONNX must
pass its accuracy gate against PyTorch (parity.py: FP32 slot by slot, FP16 on matched detections
and the mAP, INT8 on the mAP of the whole validation split) or the export fails naming the one
criterion it missed. Which options go with which export: formats.py, checked before any work.
"""
import logging
import os

import numpy as np

from clock_deploy.artifact import batch_spec, build_metadata, embed_metadata, input_spec, read_metadata, write_metadata
from clock_deploy.checkpoint import load_model
from clock_deploy.data.dataset import build_dataset
from clock_deploy.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from clock_deploy.errors import UserError
from clock_deploy.eval.loop import evaluate_detector
from clock_deploy.eval.units import ap_text
from clock_deploy.export.calibration import manifest_images, read_manifest
from clock_deploy.export.formats import check_options
from clock_deploy.export.onnx import export_onnx
from clock_deploy.export.parity import (check_parity, judge_map, map_difference, parity_report, run_onnx, run_torch,
                                        verdict)
from clock_deploy.export.precision import convert_fp16, int8_sensitivity, quantize_int8
from clock_deploy.export.tensorrt import describe_build, engine_from_onnx
from clock_deploy.io import file_sha256, plain_file_name, write_json
from clock_deploy.models.deform_attn import model_sampling, set_sampling
from clock_deploy.models.deploy import ExportWrapper
from clock_deploy.naming import API, option
from clock_deploy.nvidia import import_tensorrt
from clock_deploy.runtime import Detector
from clock_deploy.runtime.backend_onnx import OnnxBackend
from clock_deploy.runtime.preprocess import preprocess

log = logging.getLogger(__name__)


def _val_dataset(cfg):
    """The validation split of the checkpoint's data config, or None when the data is not here."""
    if not os.path.isdir(cfg.data.root):
        return None
    try:
        return build_dataset(cfg.data, cfg.data.val_split, train=False)
    except UserError:
        return None


def map_image_count(dataset, map_images):
    """Validation images the mAP difference is computed on: map_images None = the whole split, 0 = none."""
    if dataset is None or map_images == 0:
        return 0
    return len(dataset) if map_images is None else min(map_images, len(dataset))


def _parity_images(dataset, count, input_spec, seed=0):
    """(batch, source): the first `count` validation images, or random pixels when there is no data."""
    if dataset is not None and len(dataset) >= count:
        return preprocess([dataset.image_path(i) for i in range(count)], input_spec)[0], "validation"
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (count, input_spec["height"], input_spec["width"], 3), dtype=np.uint8)
    return preprocess(list(pixels), input_spec)[0], "random"


class Exporter:
    """The exports of one checkpoint: its model, its settings (the checkpoint's ExportConfig with the
    caller's overrides) and the artifacts written so far. Everything the settings decide (batch
    profile, input spec, validation data) is fixed here; `run` writes one precision's artifacts."""

    def __init__(self, ckpt_path, out_dir=None, name=None, *, overrides=None, img_size=None, sampling=None,
                 batch=None, exclude_nodes=(), via=API):
        """overrides: {ExportConfig key: value} replacing the checkpoint's export settings (None = keep);
        img_size: [H, W] instead of the checkpoint's data.img_size; sampling: deformable attention
        sampling in the graph; batch: N or (MIN, OPT, MAX) (artifact.batch_spec: None = 1..8 when
        export.dynamic_batch, else 1); exclude_nodes: nodes kept in float besides export.exclude_nodes;
        via: how the caller's options are named in messages (naming.CLI / CONFIG / API)."""
        self.ckpt_path = os.fspath(ckpt_path)
        self.via = via
        self.model, self.cfg, self.ckpt = load_model(self.ckpt_path)
        check_options("fp32", False, None, {"sampling": sampling}, self.cfg.model.arch, via)
        self.source = {"checkpoint": self.ckpt_path, "sha256": file_sha256(self.ckpt_path),
                       "epoch": self.ckpt.get("epoch"), "iteration": self.ckpt.get("iteration")}
        self.out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(self.ckpt_path)), "export")
        stem = os.path.splitext(os.path.basename(self.ckpt_path))[0]
        self.name = plain_file_name(name, "--name") if name is not None else stem
        exp = self.cfg.export
        for key, value in (overrides or {}).items():
            if not hasattr(exp, key):
                raise UserError(f"export.{key} is not an export setting")
            if value is not None:
                setattr(exp, key, value)
        exp.exclude_nodes = list(exp.exclude_nodes) + list(exclude_nodes)
        if img_size:
            self.cfg.data.img_size = [int(v) for v in img_size]
        if sampling:
            set_sampling(self.model, sampling)
            self.cfg.model.sampling = sampling
        self.batch = batch_spec(exp.dynamic_batch, batch)
        height, width = self.cfg.data.img_size
        self.input_spec = input_spec(height, width, IMAGENET_MEAN, IMAGENET_STD)
        self.dataset = _val_dataset(self.cfg)
        self.reference_metrics = {}  # image count -> the PyTorch model's metrics, computed once
        self.summary = {}

    def check_options(self, precision, trt, builder, given):
        """Refuse options that do not go with this export (export/formats.py), before any work starts."""
        check_options(precision or self.cfg.export.precision, trt, builder, given, self.cfg.model.arch, self.via)

    def path(self, suffix):
        return os.path.join(self.out_dir, f"{self.name}{suffix}")

    def metadata(self, kind, precision, calibration=None, **extra):
        height, width = self.cfg.data.img_size
        return build_metadata(kind=kind, arch=self.cfg.model.arch, classes=self.ckpt["classes"], height=height,
                              width=width, mean=IMAGENET_MEAN, std=IMAGENET_STD, precision=precision,
                              topk=self.cfg.export.topk, batch=self.batch, source=self.source,
                              opset=self.cfg.export.opset, sampling=model_sampling(self.model),
                              calibration=calibration, **extra)

    def check(self, path, meta, parity_images, map_images):
        """Parity of ONNX `path` (metadata `meta`) against the PyTorch model (+ mAP difference on validation images)."""
        height, width = self.cfg.data.img_size
        wrapper = ExportWrapper(self.model, self.cfg.export.topk, (height, width)).eval()
        count = self.batch["max"] if not self.batch["dynamic"] else parity_images
        images, source = _parity_images(self.dataset, count, self.input_spec)
        report = parity_report(run_torch(wrapper, images), run_onnx(path, images), meta["precision"], height, width,
                               self.cfg.export.parity_tol, source)
        # FP32 is judged slot by slot: an mAP difference would cost two evaluations and decide nothing
        count = map_image_count(self.dataset, 0 if meta["precision"] == "fp32" else map_images)
        if count:
            if count not in self.reference_metrics:
                torch_detector = Detector.for_model(self.model, self.ckpt["classes"], (height, width),
                                                    self.cfg.export.topk)
                self.reference_metrics[count] = evaluate_detector(torch_detector, self.dataset, count)
            metrics = evaluate_detector(Detector(OnnxBackend(path, meta), meta), self.dataset, count)
            report["map_images"] = count
            report.update(map_difference(self.reference_metrics[count], metrics))
            judge_map(report)
        log.info(_describe(path, report))
        try:
            check_parity(report, path)
        except UserError:
            os.remove(path)  # a model that does not match must not be picked up by mistake
            raise
        return report

    def run(self, precision=None, trt=False, calib_root=None, sensitivity=False, sensitivity_images=4,
            parity_images=4, map_images=None, timing_cache=None, builder=None):
        """Write the FP32 ONNX and, for precision "fp16" / "int8" (default export.precision), the ONNX of
        that precision, each checked against PyTorch; trt: also its engine, built by `builder`
        ("tensorrt" | "tensorrt-rtx", default the first installed). Returns {kind: path} so far."""
        if parity_images < 1:
            raise UserError(f"parity_images must be at least 1, got {parity_images}")
        exp = self.cfg.export
        precision = precision or exp.precision
        # missing TensorRT or calibration data is reported before the minutes of exporting
        if trt:
            import_tensorrt(builder)
            if model_sampling(self.model) == "grid_sample":
                log.info("note: deformable attention samples with GridSample, which TensorRT has been reported "
                         f"to miscompile; {option('sampling', 'gather', self.via)} avoids it")
        images = None
        if precision == "int8" or sensitivity:
            images = self.calibration_images(exp.calib, calib_root, exp.calib_images)
        dynamic = self.batch["dynamic"]
        trace_batch = self.batch["opt"] if dynamic else self.batch["max"]
        height, width = self.cfg.data.img_size
        os.makedirs(self.out_dir, exist_ok=True)

        fp32 = self.path(".onnx")
        if "fp32" not in self.summary:  # the bench runs one Exporter per precision: export and check FP32 once
            info = export_onnx(self.model, fp32, height=height, width=width, topk=exp.topk, opset=exp.opset,
                               dynamic=dynamic, batch=trace_batch, simplify=exp.simplify)
            self.finish(fp32, self.metadata("onnx", "fp32", export=info), parity_images, map_images)

        if sensitivity:
            self.sensitivity(fp32, images, sensitivity_images)
        artifact = fp32
        if precision == "fp16":
            artifact = self.path(".fp16.onnx")
            info = convert_fp16(fp32, artifact)
            self.finish(artifact, self.metadata("onnx", "fp16", fp16=info), parity_images, map_images)
        elif precision == "int8":
            artifact = self.path(".int8.onnx")
            paths, calibration = images
            info = quantize_int8(fp32, artifact, paths, self.input_spec, batch=1 if dynamic else self.batch["max"],
                                 nodes_to_exclude=list(exp.exclude_nodes))
            before, after = info["qdq"]["before"], info["qdq"]["after"]
            log.info(f"INT8: {info['quantized_nodes']} Conv / MatMul / Gemm quantized; Q/DQ nodes "
                     f"{before['QuantizeLinear']}/{before['DequantizeLinear']} -> "
                     f"{after['QuantizeLinear']}/{after['DequantizeLinear']} (orphan pairs dropped), "
                     f"the rest in FP16")
            self.finish(artifact, self.metadata("onnx", "int8", calibration={**calibration, **info}),
                        parity_images, map_images)
        if trt:
            self.engine(artifact, precision, timing_cache, builder)
        return self.summary

    def finish(self, path, meta, parity_images, map_images):
        """Check parity, then write the sidecar that makes the artifact loadable (and embed it in the ONNX)."""
        meta["parity"] = self.check(path, meta, parity_images, map_images)
        embed_metadata(path, meta)
        write_metadata(path, meta)
        self.summary[meta["precision"]] = path

    def calibration_images(self, manifest, root, limit):
        if not manifest:
            setting = option("calib", "calibration/<name>.json", self.via)
            raise UserError(f"INT8 needs a calibration manifest: {setting} (make one with `clock-deploy calibrate`)")
        paths = manifest_images(manifest, root, limit)
        return paths, {"manifest": manifest, "manifest_sha256": file_sha256(manifest),
                       "dataset_root": root or read_manifest(manifest)["dataset_root"]}

    def sensitivity(self, fp32, images, num_images, top=10):
        paths, calibration = images
        result = int8_sensitivity(fp32, paths, self.input_spec, num_images=num_images,
                                  nodes_to_exclude=list(self.cfg.export.exclude_nodes), top=top)
        path = self.path(".int8.sensitivity.json")
        write_json(path, {"onnx": fp32, "calibration": calibration, **result})
        exclude = option("exclude_nodes", ["NODE"], self.via)
        log.info(f"INT8 sensitivity on {result['images']} images: each score is the output error (largest raw "
                 f"score change + largest box change / image size) with only that node in INT8, the rest in "
                 f"float (all nodes in INT8: {result['full']['error']:.4g}; maxima do not add up, so one node may "
                 f"score above all); keep the top nodes in float with {exclude} and export INT8 again: the mAP "
                 "gate decides whether it helped")
        for row in result["nodes"][:top]:
            log.info(f"  {row['error']:.4g}  {row['op_type']:<6} {row['node']}")
        log.info(f"wrote {path}")
        self.summary["sensitivity"] = path

    def engine(self, onnx_path, precision, timing_cache, builder=None):
        exp = self.cfg.export
        engine = engine_from_onnx(onnx_path, precision, self.path(f".{precision}.engine"),
                                  workspace_gb=exp.workspace_gb, dla_core=exp.dla_core, builder=builder,
                                  timing_cache=timing_cache or os.path.join(self.out_dir, "timing.cache"))
        log.info(describe_build(engine, read_metadata(engine, verify=False)["tensorrt"]))
        self.summary["engine"] = engine

def _describe(path, report):
    """One parity line: slot-by-slot numbers, matched detections, mAP, and the verdict with its gate."""
    text = (f"{os.path.basename(path)}: {report['precision']} vs PyTorch on {report['images']} "
            f"{report['image_source']} images: scores max abs {report['scores_max_abs']:.2g}, "
            f"boxes max abs {report['boxes_max_abs']:.2g} px, "
            f"{report['queries_changed']}/{report['queries']} queries beyond tolerance; detections >= "
            f"{report['det_score_threshold']:g}: {report['det_ref']} vs {report['det_out']}, "
            f"{report['det_matched_fraction']:.0%} matched (box error p95 {report['det_box_rel']:.1%} of box size, "
            f"max {report['det_box_max_abs']:.2g} px), "
            f"{report['det_unmatched']} unmatched")
    if "mAP_diff" in report:
        text += (f"; mAP {ap_text('mAP', report['mAP'])} vs {ap_text('mAP', report['mAP_ref'])} % "
                 f"({report['map_images']} val images" + (f", {report['map_note']}" if "map_note" in report else "")
                 + ")")
    return f"{text} -> {verdict(report)}"
