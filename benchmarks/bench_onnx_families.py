"""ONNX Runtime CPU latency of every student family, measured side by side in one run.

Each family is built from a demo config with model.arch set per row (same backbone, hidden size,
decoder layers and queries; random weights, the latency does not depend on them), exported with the
project's exporter code (FP32, post-processing in the graph) and run in onnxruntime on the CPU at
batch 1; runs of all families are interleaved so load drift on the machine hits them alike.

    python benchmarks/bench_onnx_families.py [--config configs/demo/student.yaml] [--sizes 128x416,384x1248]
                                             [--runs 10] [--threads N]

Writes benchmarks/results/onnx_families.md.
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
import torch

from clock_deploy.config import load_config
from clock_deploy.export.onnx import export_onnx
from clock_deploy.io import write_text
from clock_deploy.models.build import build_model

ARCHS = ["dab_detr", "deformable_detr", "dino", "rt_detr"]


def session(path, threads):
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo/student.yaml")
    parser.add_argument("--sizes", default="128x416,384x1248", help="comma-separated HxW input sizes")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = its default)")
    parser.add_argument("--out", default="benchmarks/results/onnx_families.md")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for height, width in sizes:
            sessions, params = {}, {}
            for arch in ARCHS:
                torch.manual_seed(0)
                cfg = load_config(args.config, [f"model.arch={arch}"])
                model = build_model(cfg.model).eval()
                params[arch] = sum(p.numel() for p in model.parameters())
                path = os.path.join(tmp, f"{arch}-{height}x{width}.onnx")
                export_onnx(model, path, height=height, width=width, topk=cfg.export.topk, simplify=False)
                sessions[arch] = session(path, args.threads)
            images = np.random.default_rng(0).standard_normal((1, 3, height, width)).astype(np.float32)
            times = {arch: [] for arch in ARCHS}
            for i in range(args.warmup + args.runs):
                for arch, sess in sessions.items():
                    start = time.perf_counter()
                    sess.run(None, {"images": images})
                    if i >= args.warmup:
                        times[arch].append(time.perf_counter() - start)
            fastest = min(statistics.median(t) for t in times.values())
            for arch in ARCHS:
                median = statistics.median(times[arch])
                rows.append((arch, params[arch], f"{height}x{width}", median, median / fastest))
                print(f"{arch} {height}x{width}: {median * 1e3:.1f} ms", flush=True)
    lines = ["# ONNX Runtime CPU latency per family\n",
             f"`python {' '.join(sys.argv)}`: models from `{args.config}` with `model.arch` set per row, FP32 ONNX "
             f"with in-graph post-processing, batch 1, median of {args.runs} interleaved runs; "
             f"{platform.processor() or platform.machine()}, onnxruntime {ort.__version__} "
             f"({args.threads or 'default'} threads), load average {os.getloadavg()[0]:.1f} at the end.\n",
             "| architecture | parameters | input | ms | vs fastest |", "|---|---:|---|---:|---:|"]
    lines += [f"| {arch} | {p / 1e6:.2f} M | {size} | {ms * 1e3:.1f} | {ratio:.2f}x |"
              for arch, p, size, ms, ratio in rows]
    write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
