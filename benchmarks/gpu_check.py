"""GPU check, one prepared script for a lent GPU machine (issue 41, done-when item 8).

On synthetic scenes the project generates (clock_deploy.data.synthetic.generate), for each family
(dab_detr, deformable_detr, dino, rt_detr):
  1. trains a teacher one epoch (configs/demo/teacher.yaml with model.arch set; AMP as the trainer does on CUDA);
  2. distils a student from it one epoch with CLoCK (configs/demo/distill.yaml with model.arch set; the
     RT-DETR student R18vd-like, CCFF expansion 0.5), the teacher in autocast (distill.teacher_dtype=fp16
     on CUDA; bf16 on a CPU, where fp16 autocast is refused);
  3. times the distilled student's torch forward at 384x1248, batch 1, in fp32 and in fp16 autocast
     (CUDA events on the GPU's clock; bf16 autocast and the host clock on a CPU).
Needs torch (with CUDA) and the project only: no TensorRT, no network, no package index.

    python benchmarks/gpu_check.py [--device cuda] [--images 96] [--runs 50] [--out benchmarks/results/gpu_check.md]
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gpu_check.md   # CPU smoke run (tests)

--tiny: tiny models and images, 2 iterations per stage, latency at 64x192 with 2 runs.
Writes the .md and a .json beside it, with the command and the machine (GPU, driver, torch / CUDA).
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

from clock_deploy.checkpoint import load_model
from clock_deploy.config import load_config
from clock_deploy.data.synthetic import generate
from clock_deploy.io import write_json, write_text
from clock_deploy.measure.devices import detect
from clock_deploy.measure.latency import measure
from clock_deploy.training.commands import run_training

FAMILIES = ["dab_detr", "deformable_detr", "dino", "rt_detr"]
STUDENT = {"rt_detr": ["model.rt_detr.expansion=0.5"]}  # R18vd-like CCFF width, as bench_realtime.py's student
TINY_MODEL = ["model.backbone.width=8", "model.hidden_dim=32", "model.ffn_dim=64", "model.num_queries=20",
              "model.dn.num_queries=10", "model.nheads=4", "model.enc_layers=1", "model.dec_layers=2",
              "distill.logit.random_queries=10"]
TINY_RUN = ["data.img_size=[64,192]", "train.batch_size=2", "train.max_iters=2"]
HALF = {"cuda": torch.float16, "cpu": torch.bfloat16}  # autocast dtype of the teacher and of the timed half forward


def last_record(output_dir, key):
    """The last log.jsonl record of a run that has `key`."""
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return next(r for r in reversed(records) if key in r)


def run_stage(config, overrides, output_dir, device):
    """Train (or distill) one epoch as `config` + overrides; its seconds, iterations, last loss (and the
    terms it summed), peak GPU MB."""
    cfg = load_config(config, overrides + [f"output_dir={output_dir}", f"device={device}"])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run_training(cfg, progress=False, overwrite=True)
    seconds = time.perf_counter() - start
    done, loss = last_record(output_dir, "seconds"), last_record(output_dir, "loss")
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"seconds": round(seconds, 1), "iterations": done["iterations"], "last_loss": round(loss["loss"], 4),
            "peak_gpu_mb": peak and round(peak), "loss_terms": sorted(k for k in loss if k.startswith("loss_"))}


def forward_latency(checkpoint, device, height, width, warmup, runs):
    """ms (LatencyStats as a dict) of the student's forward in fp32 and in half autocast, and whether the
    half outputs are finite (not compared box by box: half precision may select other queries)."""
    model = load_model(checkpoint, map_location=device)[0].to(device).eval()
    images = torch.randn(1, 3, height, width, device=device, generator=torch.Generator(device).manual_seed(0))
    sync = torch.cuda.synchronize if device == "cuda" else None
    results = {}
    with torch.inference_mode():
        results["fp32"] = vars(measure(lambda: model(images), warmup, runs, sync=sync, cuda_events=device == "cuda"))
        with torch.autocast(device, dtype=HALF[device]):
            last = model(images).stages[-1]
            results["half_finite"] = bool(torch.isfinite(last.logits).all() and torch.isfinite(last.boxes).all())
            results["half"] = vars(measure(lambda: model(images), warmup, runs, sync=sync,
                                           cuda_events=device == "cuda"))
    return results


def check_family(family, data_root, folder, args):
    """Teacher training, distillation and student latency of one family."""
    device = args.device
    common = [f"model.arch={family}", f"data.root={data_root}", "train.epochs=1", "train.eval_every=-1",
              "train.log_every=1", "train.lr_drop_epochs=[]"] + (TINY_MODEL + TINY_RUN if args.tiny else [])
    teacher_dir, student_dir = os.path.join(folder, family, "teacher"), os.path.join(folder, family, "student")
    teacher = run_stage("configs/demo/teacher.yaml", common, teacher_dir, device)
    dtype = "fp16" if device == "cuda" else "bf16"
    distill = run_stage("configs/demo/distill.yaml", common + STUDENT.get(family, []) + [
        f"distill.teacher={os.path.join(teacher_dir, 'last.pt')}", f"distill.teacher_dtype={dtype}"],
        student_dir, device)
    height, width = args.size
    latency = forward_latency(os.path.join(student_dir, "last.pt"), device, height, width, args.warmup, args.runs)
    print(f"{family}: teacher {teacher['seconds']} s, distill {distill['seconds']} s, student forward "
          f"{latency['fp32']['p50']:.2f} ms fp32 / {latency['half']['p50']:.2f} ms {dtype}", flush=True)
    return {"teacher_train": teacher, "student_distill": dict(distill, teacher_dtype=dtype), "latency_ms": latency}


def machine(device):
    """(label, value) rows: GPU, driver, CUDA and torch versions (CPU model and cores on a CPU)."""
    facts = detect(device).facts
    rows = [(k, facts[k]) for k in ("gpu", "driver", "CUDA (torch)", "GPU memory", "SM clock", "cpu", "physical cores")
            if k in facts]
    return rows + [("torch", torch.__version__), ("cuDNN", str(torch.backends.cudnn.version()))]


def report(command, args, rows, families):
    """Markdown of the check: header (GPU or not), machine, one row per family."""
    gpu = args.device == "cuda"
    half = "fp16" if gpu else "bf16"
    status = ("Run on a GPU." if gpu else "**Not run on a GPU yet**: no GPU was lent to this work; this file is the "
              "CPU smoke mode's (`--device cpu`), which shows the script works, not GPU numbers. On a GPU machine run "
              "`PYTHONPATH=. python benchmarks/gpu_check.py` (add `--out DIR/gpu_check.md` to write elsewhere).")
    lines = ["# GPU check: train, distil and time every family\n", status + "\n", f"`{command}`\n",
             "| machine | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
             f"Synthetic scenes ({args.images} images, clock_deploy.data.synthetic), one epoch each"
             f"{' (2 iterations: --tiny)' if args.tiny else ''}: teacher = configs/demo/teacher.yaml, student = "
             f"CLoCK distillation with configs/demo/distill.yaml, `model.arch` per row, teacher in {half} autocast. "
             f"Latency: the distilled student's torch forward, batch 1 at {args.size[0]}x{args.size[1]}, median "
             f"(p90) of {args.runs} runs after {args.warmup} warm-up "
             f"({'CUDA events' if gpu else 'host clock'}). Stage seconds include building the model and data "
             "loader and writing the checkpoint.\n",
             f"| family | teacher train s | teacher last loss | distill s | distill last loss | peak GPU MB "
             f"(distill) | fp32 ms | {half} autocast ms | {half} speed-up | {half} outputs finite |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for family, r in families.items():
        t, d, lat = r["teacher_train"], r["student_distill"], r["latency_ms"]
        lines.append(f"| {family} | {t['seconds']} | {t['last_loss']} | {d['seconds']} | {d['last_loss']} | "
                     f"{d['peak_gpu_mb'] if d['peak_gpu_mb'] is not None else '-'} | "
                     f"{lat['fp32']['p50']:.2f} ({lat['fp32']['p90']:.2f}) | "
                     f"{lat['half']['p50']:.2f} ({lat['half']['p90']:.2f}) | "
                     f"{lat['fp32']['p50'] / lat['half']['p50']:.2f}x | {'yes' if lat['half_finite'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny models and images, 2 iterations (CPU smoke run)")
    parser.add_argument("--images", type=int, default=None, help="synthetic images (default 96; --tiny 8)")
    parser.add_argument("--size", default=None, help="HxW of the latency input (default 384x1248; --tiny 64x192)")
    parser.add_argument("--runs", type=int, default=None, help="timed forwards (default 50; --tiny 2)")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--out", default="benchmarks/results/gpu_check.md")
    args = parser.parse_args(argv)
    args.images = args.images or (8 if args.tiny else 96)
    args.size = tuple(int(v) for v in (args.size or ("64x192" if args.tiny else "384x1248")).split("x"))
    args.runs = args.runs or (2 if args.tiny else 50)
    args.warmup = 1 if args.tiny else 10
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = machine(args.device)  # fails with one clear line when the device is not there
    command = " ".join(["python benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        data_root = os.path.join(folder, "data")
        height, width = (94, 310) if args.tiny else (188, 620)  # the KITTI aspect ratio, as the demo's scenes
        generate(data_root, args.images, height=height, width=width, val_fraction=0.25, progress=False)
        families = {f: check_family(f, data_root, folder, args) for f in args.families.split(",")}
    rows += [("whole check", f"{time.perf_counter() - start:.0f} s"),
             ("load average (1 min, at the end)", f"{os.getloadavg()[0]:.1f}")]
    write_text(args.out, report(command, args, rows, families))
    write_json(os.path.splitext(args.out)[0] + ".json", {"command": command, "device": args.device,
                                                          "machine": dict(rows), "families": families})
    print(f"wrote {args.out}")
    return families


if __name__ == "__main__":
    main()
