"""Training throughput (images/s) of every architecture, measured side by side in one run.

Each architecture is built from a demo config with model.arch set per row (same backbone, hidden
size, layers, batch and input size), trained on a fixed random batch; steps of all architectures
are interleaved so load drift on the machine hits them alike. A step = forward + loss + backward +
AdamW step, as the trainer does it.

    python benchmarks/bench_train.py [--config configs/demo/student.yaml] [--steps 10] [--threads N]

Writes benchmarks/results/train.md.
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch

from clock_deploy.config import load_config
from clock_deploy.training.trainer import TrainStep
from clock_deploy.io import write_text
from clock_deploy.models.build import build_criterion, build_model
from random_batch import random_batch  # benchmarks/ is on sys.path when run as a script

ARCHS = ["dab_detr", "deformable_detr", "dino", "rt_detr"]


def step_runner(cfg):
    torch.manual_seed(cfg.seed)
    step = TrainStep(build_model(cfg.model), build_criterion(cfg.loss, cfg.model)).train()
    optimizer = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=cfg.train.lr)

    def run(images, targets):
        total = sum(v for k, v in step(images, targets).items() if k.startswith("loss"))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    return run, sum(p.numel() for p in step.parameters())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo/student.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", default="benchmarks/results/train.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    runners, params = {}, {}
    for arch in ARCHS:
        cfg = load_config(args.config, [f"model.arch={arch}"])
        runners[arch], params[arch] = step_runner(cfg)
    images, targets = random_batch(cfg, torch.Generator().manual_seed(0))
    times = {arch: [] for arch in ARCHS}
    for i in range(args.warmup + args.steps):
        for arch, run in runners.items():
            start = time.perf_counter()
            run(images, targets)
            if i >= args.warmup:
                times[arch].append(time.perf_counter() - start)

    batch = cfg.train.batch_size
    slowest = max(statistics.median(t) for t in times.values())
    lines = ["# Training throughput\n",
             f"`python {' '.join(sys.argv)}`: models from `{args.config}` with `model.arch` set per row; batch "
             f"{batch} x {cfg.data.img_size[0]}x{cfg.data.img_size[1]}, median of {args.steps} interleaved "
             f"steps (forward + backward + AdamW); {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, load average "
             f"{os.getloadavg()[0]:.1f} at the end.\n",
             "| architecture | parameters | ms / step | images / s | speed vs slowest |",
             "|---|---:|---:|---:|---:|"]
    for arch in ARCHS:
        median = statistics.median(times[arch])
        lines.append(f"| {arch} | {params[arch] / 1e6:.2f} M | {median * 1000:.0f} | {batch / median:.1f} | "
                     f"{slowest / median:.2f}x |")
        print(f"{arch}: {median * 1000:.0f} ms/step, {batch / median:.1f} images/s", flush=True)
    write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
