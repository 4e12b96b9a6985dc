"""Build every exported graph family with TensorRT-RTX and report what the engines hold.

Per architecture x precision x sampling mode: whether the ONNX parses and builds through the
project's own engine_from_onnx, the build time, the engine size, the layers per precision
(engine_report) and the INT8 graph's Q/DQ node counts before / after the post-pass. The
models have the demo student's size (configs/demo/student.yaml) with untrained weights:
a build report, not an accuracy one. TensorRT-RTX builds ahead of time without a GPU, so
this runs on a CPU-only machine; engine latency on a GPU is NOT measured here.

    OMP_NUM_THREADS=1 python benchmarks/bench_trt_build.py [--archs dino] [--out benchmarks/results/trt_build.md]
"""
import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from clock_deploy.artifact import batch_spec, build_metadata, input_spec, read_metadata, write_metadata
from clock_deploy.config import load_config
from clock_deploy.data.kitti import class_names
from clock_deploy.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from clock_deploy.errors import UserError, one_line
from clock_deploy.export.onnx import export_onnx
from clock_deploy.export.precision import convert_fp16, quantize_int8
from clock_deploy.export.tensorrt import engine_from_onnx
from clock_deploy.io import write_text
from clock_deploy.models.build import build_model
from clock_deploy.models.deform_attn import set_sampling

ARCHS = ("dab_detr", "deformable_detr", "dino")
SAMPLINGS = ("grid_sample", "gather")
PRECISIONS = ("fp32", "fp16", "int8")


def demo_model(arch, sampling):
    cfg = load_config("configs/demo/student.yaml")
    cfg.model.arch = arch
    if arch == "dab_detr":  # single scale, as DAB-DETR is
        cfg.model.num_feature_levels, cfg.model.backbone.return_levels = 1, [3]
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    set_sampling(model, sampling)
    return model, cfg


def calibration_images(folder, count, size):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"calib{i}.png")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def export_family(folder, arch, sampling, calib):
    """{precision: (onnx path, Q/DQ counts or None)} of one graph family."""
    model, cfg = demo_model(arch, sampling)
    height, width = cfg.data.img_size
    spec = input_spec(height, width, IMAGENET_MEAN, IMAGENET_STD)
    fp32 = os.path.join(folder, f"{arch}-{sampling}.onnx")
    export_onnx(model, fp32, height=height, width=width, topk=cfg.export.topk, opset=cfg.export.opset,
                simplify=cfg.export.simplify)
    out = {"fp32": (fp32, None)}
    out["fp16"] = (fp32.replace(".onnx", ".fp16.onnx"), None)
    convert_fp16(fp32, out["fp16"][0])
    int8 = fp32.replace(".onnx", ".int8.onnx")
    info = quantize_int8(fp32, int8, calib, spec)
    out["int8"] = (int8, info["qdq"])
    for precision, (path, _) in out.items():
        write_metadata(path, build_metadata(kind="onnx", arch=arch, classes=class_names("kitti3"), height=height,
                                            width=width, mean=IMAGENET_MEAN, std=IMAGENET_STD, precision=precision,
                                            topk=cfg.export.topk, batch=batch_spec(True), sampling=sampling))
    return out, (height, width)


def build_row(arch, sampling, precision, onnx_path, qdq):
    row = {"arch": arch, "sampling": sampling if arch != "dab_detr" else "-", "precision": precision}
    if qdq:
        row["qdq"] = (f"{qdq['before']['QuantizeLinear']}/{qdq['before']['DequantizeLinear']} -> "
                      f"{qdq['after']['QuantizeLinear']}/{qdq['after']['DequantizeLinear']}")
    try:
        engine = engine_from_onnx(onnx_path, builder="tensorrt-rtx")
    except UserError as e:
        return {**row, "ok": f"FAILED: {one_line(e)[:120]}"}
    build = read_metadata(engine, verify=False)["tensorrt"]
    layers = build["layers"]
    row.update(ok="yes", seconds=build["build_seconds"], mb=os.path.getsize(engine) / 2**20, version=build["version"],
               layers=f"{layers['int8']} / {layers['fp16']} / {layers['fp32']} / {layers['other']}",
               unexplained=layers.get("fp32_unexplained", "-"))
    return row


def markdown(rows, command, size):
    version = next((r["version"] for r in rows if "version" in r), "?")
    lines = [
        "# TensorRT engine builds of every exported graph family (TensorRT-RTX, CPU only)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.node()} — {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"no GPU; Python {platform.python_version()}, torch {torch.__version__}, TensorRT-RTX {version}. "
        f"Load average {os.getloadavg()[0]:.1f} at the end (build seconds grow with load).",
        "",
        f"Models: the demo student's size (configs/demo/student.yaml, input {size[0]} x {size[1]}, untrained "
        "weights), exported by the project's own code (export_onnx, convert_fp16, quantize_int8 with 8 random "
        "calibration images) and built by `engine_from_onnx(..., builder='tensorrt-rtx')` with the default "
        "dynamic batch profile 1 / 1 / 8. TensorRT-RTX builds ahead of time without a GPU: **latency on a GPU "
        "is not measured here**, and stock TensorRT (data-center GPUs, Jetson) may choose other kernels.",
        "",
        "Layers: the engine's layers per precision (INT8 / FP16 / FP32 / other = shape and index arithmetic), "
        "from the builder's layer listing (engine_report.py). FP32 unexplained: FP32 layers that hold no op "
        "the FP16 conversion keeps in float on purpose (must be 0 for FP16 and INT8). Q/DQ: QuantizeLinear / "
        "DequantizeLinear nodes as onnxruntime writes them -> after the post-pass (orphans dropped).",
        "",
        "Reading it: a layer that reads or writes an INT8 tensor counts as INT8, so the FP16 work TensorRT fuses "
        "into quantized convolutions / GEMMs (bias, activation, residual add, the next quantize step) is in the "
        "INT8 column. The models hold about 1 M parameters (4 MB in FP32), so the engine size is mostly "
        "compiled kernels, not weights: the INT8 engines are larger than the FP16 ones here.",
        "",
        "| architecture | sampling | precision | build OK | build s | engine MB | layers INT8 / FP16 / FP32 / other "
        "| FP32 unexplained | Q/DQ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['sampling']} | {r['precision']} | {r['ok']} | "
                     f"{r['seconds']:.1f} | {r['mb']:.1f} | {r['layers']} | {r['unexplained']} | {r.get('qdq', '-')} |"
                     if r["ok"] == "yes" else
                     f"| {r['arch']} | {r['sampling']} | {r['precision']} | {r['ok']} | - | - | - | - | "
                     f"{r.get('qdq', '-')} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--samplings", default=",".join(SAMPLINGS))
    parser.add_argument("--out", default="benchmarks/results/trt_build.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="trt-build-") as folder:
        size = None
        calib = None
        for arch in args.archs.split(","):
            for sampling in args.samplings.split(",") if arch != "dab_detr" else ["grid_sample"]:
                _, cfg = demo_model(arch, sampling)
                size = cfg.data.img_size
                calib = calib or calibration_images(folder, 8, (188, 620))
                start = time.perf_counter()
                family, size = export_family(folder, arch, sampling, calib)
                print(f"{arch} {sampling}: exported in {time.perf_counter() - start:.0f} s", flush=True)
                for precision in PRECISIONS:
                    path, qdq = family[precision]
                    rows.append(build_row(arch, sampling, precision, path, qdq))
                    print(rows[-1], flush=True)
    command = "OMP_NUM_THREADS=1 python benchmarks/bench_trt_build.py " + " ".join(sys.argv[1:])
    write_text(args.out, markdown(rows, command.strip(), size))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
