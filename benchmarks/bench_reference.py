"""The project's models against the transformers reference implementations, side by side in one run.

Per architecture (Deformable DETR with box refinement, DAB-DETR) at the published size (ResNet-50,
hidden 256, 6 + 6 layers, 300 queries, 91 COCO classes; RT-DETRv2: ResNet-50-vd, hybrid encoder,
6 decoder layers, 300 queries, 80 classes, transformers' defaults) with random weights (transformer and head
tensors perturbed, so no head is trivially zero): the transformers model is saved with
save_pretrained and imported with `clock-deploy import`'s code; then, at each input size, both run
the same image:

- parity: max abs difference of the logits and of the boxes;
- CPU latency: median of --runs forwards at batch 1, the two implementations interleaved;
- peak memory of one forward: peak RSS growth during the first forward, in a fresh process per
  measurement (Linux: VmHWM reset through /proc/self/clear_refs);
- ONNX (at the first size): exported (opset 17, TorchScript exporter) and run in onnxruntime,
  with the max difference to eager.

    python benchmarks/bench_reference.py [--sizes 128x416,384x1248] [--runs 10] [--threads N] [--small]

--small builds tiny models (for a smoke run). Writes benchmarks/results/reference.md.
"""
import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from clock_deploy.errors import one_line

ARCHS = ["deformable_detr", "dab_detr", "rt_detr"]
HF_CLASSES = {"deformable_detr": "DeformableDetrForObjectDetection", "dab_detr": "DabDetrForObjectDetection",
              "rt_detr": "RTDetrV2ForObjectDetection"}


# ---------------------------------------------------------------- models

def hf_rt_detr_config(small):
    import transformers

    if small:
        backbone = transformers.RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64],
                                                   depths=[2, 2, 2, 2], layer_type="basic", out_indices=[2, 3, 4])
        return transformers.RTDetrV2Config(backbone_config=backbone, encoder_in_channels=[16, 32, 64],
                                           encoder_hidden_dim=32, d_model=32, decoder_in_channels=[32, 32, 32],
                                           encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=4,
                                           decoder_attention_heads=4, decoder_layers=2, num_queries=20, num_labels=3)
    backbone = transformers.RTDetrResNetConfig(out_indices=[2, 3, 4])  # ResNet-50-vd
    return transformers.RTDetrV2Config(backbone_config=backbone, num_labels=80)


def hf_config(arch, small):
    import transformers

    if arch == "rt_detr":
        return hf_rt_detr_config(small)
    stages = ["stage4"] if arch == "dab_detr" else ["stage2", "stage3", "stage4"]
    if small:
        backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[2, 2, 2, 2],
                                             layer_type="basic", out_features=stages)
        size = dict(encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                    encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=20, num_labels=3)
    else:  # ResNet-50 as the released checkpoints, everything else the transformers defaults
        backbone = transformers.ResNetConfig(out_features=stages)
        size = dict(num_labels=91)
    common = dict(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False, **size)
    if arch == "dab_detr":
        if small:
            common["hidden_size"] = 32
        return transformers.DabDetrConfig(**common)
    if small:
        common.update(d_model=32, two_stage_num_proposals=20)
    return transformers.DeformableDetrConfig(with_box_refine=True, two_stage=False, **common)


def build_pair(arch, small, folder):
    """Random transformers model saved to folder/hf, imported to folder/project.pt; both in eval mode."""
    import transformers

    from clock_deploy.convert.importer import import_to_checkpoint
    from clock_deploy.checkpoint import load_model

    torch.manual_seed(0)
    hf_model = getattr(transformers, HF_CLASSES[arch])(hf_config(arch, small)).eval()
    with torch.no_grad():  # zero-initialized heads would hide differences; the ResNet keeps its init
        for name, tensor in hf_model.state_dict().items():
            # (RT-DETRv2's n_points_scale is a constant 1 / points, derived on import, not a weight)
            if tensor.is_floating_point() and ".backbone." not in name and not name.endswith("n_points_scale"):
                tensor.add_(torch.randn_like(tensor) * 0.02)
        if arch == "rt_detr":  # its BatchNorm scales start at N(0, 0.01): near-equal features tie the top-k
            for module in hf_model.modules():
                if "BatchNorm" in type(module).__name__:
                    module.weight.uniform_(0.5, 1.5)
                    module.running_var.uniform_(0.5, 1.5)
    hf_dir, ckpt = os.path.join(folder, "hf"), os.path.join(folder, "project.pt")
    hf_model.save_pretrained(hf_dir)
    import_to_checkpoint(hf_dir, ckpt)
    model, _, _ = load_model(ckpt)
    return hf_model, model, hf_dir, ckpt


def forward(impl, model, images):
    """(logits, boxes) of either implementation."""
    if impl == "transformers":
        out = model(pixel_values=images)
        return out.logits, out.pred_boxes
    last = model(images).stages[-1]
    return last.logits, last.boxes


def load_for(impl, arch, path):
    if impl == "transformers":
        import transformers
        return getattr(transformers, HF_CLASSES[arch]).from_pretrained(path).eval()
    from clock_deploy.checkpoint import load_model
    model = load_model(path)[0]
    if impl == "project-runtime":  # as the torch backend runs a checkpoint (fused, packed CPU convs)
        from clock_deploy.runtime.backend_torch import inference_model
        return inference_model(model)
    return model


# ---------------------------------------------------------------- measurements

def latencies(models, images, runs, warmup=2):
    """Median seconds per forward of each model, runs interleaved so load drift hits all alike."""
    times = {name: [] for name in models}
    with torch.inference_mode():
        for i in range(warmup + runs):
            for name, (impl, model) in models.items():
                start = time.perf_counter()
                forward(impl, model, images)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_peak_memory(impl, arch, path, height, width):
    """Run in a fresh process: MB of RSS growth at the peak of the first forward."""
    torch.manual_seed(0)
    model = load_for(impl, arch, path)
    images = torch.randn(1, 3, height, width)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark to the current RSS
        base, peak_of = _status_kb("VmRSS"), lambda: _status_kb("VmHWM")
    except OSError:  # no clear_refs: the lifetime peak (an upper bound when loading peaked higher)
        base, peak_of = _status_kb("VmRSS"), lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        forward(impl, model, images)
    print(json.dumps({"peak_mb": (peak_of() - base) / 1024}))


def peak_memory(impl, arch, path, height, width, threads):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, arch, path, str(height), str(width),
           "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def onnx_check(impl, model, height, width, folder):
    """'ok (max diff to eager X)' or the first line of what failed, for export then onnxruntime."""
    import onnxruntime as ort

    path = os.path.join(folder, f"{impl}.onnx")
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(5))
    try:
        if impl == "project":
            from clock_deploy.export.onnx import export_onnx
            from clock_deploy.models.deploy import ExportWrapper
            export_onnx(model, path, height=height, width=width, topk=100, simplify=False)
            with torch.no_grad():
                expected = ExportWrapper(model, 100, (height, width)).eval()(images)[0]
        else:
            class Raw(torch.nn.Module):
                def __init__(self, m):
                    super().__init__()
                    self.m = m

                def forward(self, x):
                    out = self.m(pixel_values=x)
                    return out.logits, out.pred_boxes

            with torch.no_grad():
                torch.onnx.export(Raw(model), (images,), path, opset_version=17, dynamo=False,
                                  input_names=["images"])
                expected = model(pixel_values=images).logits
    except Exception as e:  # noqa: BLE001 - the failure is the result
        return f"export fails: {one_line(e)[:160]}"
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    except Exception as e:  # noqa: BLE001
        return f"exports; onnxruntime fails: {one_line(e)[:160]}"
    diff = np.abs(got - expected.numpy()).max()
    return f"ok (max diff to eager {diff:.1e})" if diff <= 1e-3 else f"runs, but differs from eager by {diff:.1e}"


# ---------------------------------------------------------------- report

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="128x416,384x1248", help="comma-separated HxW input sizes")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--small", action="store_true", help="tiny models (smoke run)")
    parser.add_argument("--out", default="benchmarks/results/reference.md")
    parser.add_argument("--child", nargs=5, metavar=("IMPL", "ARCH", "PATH", "H", "W"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        impl, arch, path, height, width = args.child
        return child_peak_memory(impl, arch, path, int(height), int(width))

    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    threads = torch.get_num_threads()
    rows, onnx_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            folder = os.path.join(tmp, arch)
            hf_model, model, hf_dir, ckpt = build_pair(arch, args.small, folder)
            params = sum(p.numel() for p in model.parameters())
            for height, width in sizes:
                images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(1))
                with torch.inference_mode():
                    (ref_logits, ref_boxes), (logits, boxes) = (forward("transformers", hf_model, images),
                                                                forward("project", model, images))
                times = latencies({"transformers": ("transformers", hf_model), "project": ("project", model)},
                                  images, args.runs)
                memory = {impl: peak_memory(impl, arch, path, height, width, threads)
                          for impl, path in (("transformers", hf_dir), ("project", ckpt))}
                rows.append((arch, params, f"{height}x{width}", (ref_logits - logits).abs().max().item(),
                             (ref_boxes - boxes).abs().max().item(), times, memory))
                print(f"{arch} {height}x{width}: latency project {times['project'] * 1e3:.1f} ms, transformers "
                      f"{times['transformers'] * 1e3:.1f} ms; memory {memory['project']:.0f} / "
                      f"{memory['transformers']:.0f} MB", flush=True)
            height, width = sizes[0]
            onnx_rows.append((arch, f"{height}x{width}", onnx_check("project", model, height, width, folder),
                              onnx_check("transformers", hf_model, height, width, folder)))

    import transformers
    models = ("tiny models (smoke run)" if args.small
              else "Deformable DETR / DAB-DETR: ResNet-50, hidden 256, 6 + 6 layers, 300 queries, 91 classes; "
              "RT-DETRv2: ResNet-50-vd, hidden 256, 1 AIFI + 6 decoder layers, 300 queries, 80 classes")
    lines = ["# Project models vs transformers\n",
             f"`python {' '.join(sys.argv)}`; {platform.processor() or platform.machine()}, {threads} torch "
             f"threads, torch {torch.__version__}, transformers {transformers.__version__}, load average "
             f"{os.getloadavg()[0]:.1f} at the end. Random weights (transformer and head tensors perturbed), "
             f"{models}"
             f"; batch 1; latency = median of {args.runs} interleaved forwards; memory = peak RSS growth during "
             f"the first forward in a fresh process. Deformable DETR is the box-refine variant.\n",
             "| architecture | input | max abs diff logits | max abs diff boxes | project ms | transformers ms "
             "| latency project / transformers | project peak MB | transformers peak MB "
             "| memory transformers / project |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arch, params, size, dl, db, times, memory in rows:
        lines.append(f"| {arch} ({params / 1e6:.1f} M) | {size} | {dl:.1e} | {db:.1e} | {times['project'] * 1e3:.1f} | "
                     f"{times['transformers'] * 1e3:.1f} | {times['project'] / times['transformers']:.2f}x | "
                     f"{memory['project']:.0f} | {memory['transformers']:.0f} | "
                     f"{memory['transformers'] / max(memory['project'], 1e-9):.2f}x |")
    lines += ["\nONNX (opset 17, TorchScript exporter; the project's graph includes its top-k post-processing):\n",
              "| architecture | input | project | transformers |", "|---|---|---|---|"]
    lines += [f"| {arch} | {size} | {own} | {ref} |" for arch, size, own, ref in onnx_rows]
    from clock_deploy.io import write_text
    write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
