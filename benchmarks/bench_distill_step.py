"""Cost of a distillation training step for every student family, against plain training + a teacher forward.

Each student family gets a teacher of its own family (the demo's teacher and student configs: teacher.yaml /
student.yaml with model.arch set, rt_detr_teacher.yaml / rt_detr_student.yaml for RT-DETR; random weights, the
cost does not depend on them); each distiller's `distill` section comes from its demo config. Timed on one
fixed batch, runners interleaved, median of --steps: the plain student step, the teacher forward (inference
mode) per dtype, and the step of every distiller (forward + backward + AdamW step).
Goal: CLoCK step / (plain step + teacher forward) <= 1.15.

    python benchmarks/bench_distill_step.py [--families dino ...] [--steps 10]

Writes benchmarks/results/distill_step.md.
"""
import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch

from clock_deploy.config import load_config
from clock_deploy.distill import build_distiller
from clock_deploy.io import write_text
from clock_deploy.measure.devices import detect
from clock_deploy.models.build import build_criterion, build_model
from clock_deploy.training.trainer import TrainStep
from random_batch import random_batch  # benchmarks/ is on sys.path when run as a script

RESULTS = "benchmarks/results/distill_step.md"
FAMILIES = ["dino", "deformable_detr", "dab_detr", "rt_detr"]
# family -> (teacher config, student config, overrides of both); RT-DETR has demo configs of its own
FAMILY_CONFIGS = {"rt_detr": ("rt_detr_teacher.yaml", "rt_detr_student.yaml", [])}
DEFAULT_CONFIGS = ("teacher.yaml", "student.yaml")
GOAL = 1.15  # CLoCK step / (plain step + teacher forward), issue 42
# timed distillers: name -> (demo config, overrides)
STEP_VARIANTS = {"clock": ("distill.yaml", []),
                 "clock_bf16_teacher": ("distill.yaml", ["distill.teacher_dtype=bf16"]),
                 "kd_detr": ("distill_kd_detr.yaml", []),
                 "fgd": ("distill_fgd.yaml", []),
                 "gt_denoise": ("distill_gt_denoise.yaml", [])}


def training_step(step_module, lr):
    """A closure running one full training step of `step_module` on a fixed batch."""
    params = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)

    def run(images, targets):
        losses = step_module(images, targets)
        total = sum(v for k, v in losses.items() if k.startswith("loss"))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    return run


def teacher_forward(teacher, dtype):
    """A closure running the teacher as the Distiller does (inference mode, optional autocast)."""
    def run(images, targets):
        with torch.inference_mode(), torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            teacher(images)
    return run


def time_steps(runners, images, targets, steps, warmup=2):
    """Median seconds per step of every runner; runners take turns so load drift hits all alike."""
    times = {name: [] for name in runners}
    for i in range(warmup + steps):
        for name, run in runners.items():
            start = time.perf_counter()
            run(images, targets)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def step_costs(args):
    low = "fp16" if torch.cuda.is_available() else "bf16"
    low_dtype = torch.float16 if low == "fp16" else torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for arch in args.families:
        default = DEFAULT_CONFIGS + ([f"model.arch={arch}"],)
        teacher_file, student_file, arch_overrides = FAMILY_CONFIGS.get(arch, default)
        teacher_cfg = load_config(os.path.join(args.configs, teacher_file), arch_overrides)
        cfg = load_config(os.path.join(args.configs, student_file), arch_overrides)
        torch.manual_seed(0)
        teacher = build_model(teacher_cfg.model).to(device).eval()
        student = build_model(cfg.model).to(device).train()
        criterion = build_criterion(cfg.loss, cfg.model)
        images, targets = random_batch(cfg, torch.Generator().manual_seed(0))
        images = images.to(device)
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        runners = {"plain": training_step(TrainStep(student, criterion), cfg.train.lr),
                   "teacher_fp32": teacher_forward(teacher, None),
                   f"teacher_{low}": teacher_forward(teacher, low_dtype)}
        for name, (config, overrides) in STEP_VARIANTS.items():
            overrides = [o.replace("bf16", low) for o in overrides]
            # the student's own config with the distiller's `distill` section (demo configs build on student.yaml)
            distill_cfg = load_config(os.path.join(args.configs, config), overrides).distill
            method_cfg = dataclasses.replace(cfg, distill=distill_cfg)
            distiller = build_distiller(method_cfg, teacher, student)
            runners[name] = training_step(TrainStep(student, criterion, distiller).train(), cfg.train.lr)
        medians = time_steps(runners, images, targets, args.steps)
        rows.append((arch, medians))
        print(f"{arch}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in medians.items()), flush=True)

    names = list(STEP_VARIANTS)
    size = f"{cfg.train.batch_size} x {cfg.data.img_size[0]}x{cfg.data.img_size[1]}"
    lines = [f"Teachers and students: the demo's configs in {args.configs} (teacher.yaml / student.yaml with "
             "model.arch set per row, rt_detr_teacher.yaml / rt_detr_student.yaml for rt_detr; a teacher of the "
             f"student's own family); each distiller's `distill` section from its demo config; batch {size}, "
             f"median of {args.steps} interleaved steps (forward + backward + AdamW step), "
             f"{device}, {machine()}.", "",
             f"| student | plain ms/step | teacher fwd fp32 ms | teacher fwd {low} ms | "
             + " | ".join(f"{m} ms/step" for m in names)
             + f" | clock / (plain + teacher fp32) | clock_{low}_teacher / (plain + teacher {low}) | clock / plain |",
             "|---" * (7 + len(names)) + "|"]
    for arch, m in rows:
        plain, fp32, lowms = m["plain"], m["teacher_fp32"], m[f"teacher_{low}"]
        lines.append(f"| {arch} | {plain * 1000:.0f} | {fp32 * 1000:.0f} | {lowms * 1000:.0f} | "
                     + " | ".join(f"{m[n] * 1000:.0f}" for n in names)
                     + f" | {m['clock'] / (plain + fp32):.2f} | {m['clock_bf16_teacher'] / (plain + lowms):.2f}"
                     f" | {m['clock'] / plain:.2f} |")
    ratios = {arch: m["clock"] / (m["plain"] + m["teacher_fp32"]) for arch, m in rows}
    within = [f"{arch} {r:.2f}" for arch, r in ratios.items() if r <= GOAL]
    above = [f"{arch} {r:.2f}" for arch, r in ratios.items() if r > GOAL]
    lines += ["", f"Within the goal (fp32 teacher): {', '.join(within) or 'none'}; "
              f"above it: {', '.join(above) or 'none'}."]
    lines += ["", "Goal: CLoCK step / (plain step + teacher forward) <= 1.15: the teacher forward is a floor no "
              f"distiller avoids, the rest is CLoCK's own cost. clock_bf16_teacher runs the teacher in {low} "
              f"autocast (distill.teacher_dtype={low}); on a CPU without native bf16 this can be slower than fp32."]
    return "\n".join(lines)


def machine():
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpu = f"{detect('cpu').facts['cpu']} ({torch.backends.cpu.get_cpu_capability()} kernels)"
    return (f"torch {torch.__version__}, {cpu}, "
            f"{torch.get_num_threads()} threads, 1-minute load average {load:.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="configs/demo",
                        help="folder with teacher.yaml, student.yaml, distill*.yaml")
    parser.add_argument("--families", nargs="+", default=FAMILIES)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per runner")
    parser.add_argument("--results", default=RESULTS)
    args = parser.parse_args()
    body = step_costs(args)
    print(body)
    write_text(args.results, "\n".join(["# Distillation step cost", "", "Written by benchmarks/bench_distill_step.py.",
                                        "", body, "", f"Command: `python {' '.join(sys.argv)}`", ""]))


if __name__ == "__main__":
    main()
