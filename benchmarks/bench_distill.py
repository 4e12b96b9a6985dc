"""Distillation: cost per training step and accuracy gain, each measured side by side in one run.

(a) Step time of distillation / plain training for every student family (same batch, same
    student, same teacher; full step = forward, backward, optimizer step; steps of all methods
    interleaved, median of --steps). Goal for CLoCK: <= 1.3. The teacher is built from the
    teacher config with random weights (the cost does not depend on them).
(b) A/B on the synthetic KITTI data with a fixed budget and seeds: baseline student vs CLoCK,
    KD-DETR, FGD, LCMD-only and TCLD-only, each trained with the real `run_training`; COCO mAP and
    KITTI Moderate AP (R40) on the validation split. Reuses the teacher checkpoint at --teacher
    (default <teacher output_dir>/last.pt; trained with the teacher config when missing) and
    continues interrupted runs from their last.pt.

    python benchmarks/bench_distill.py --part a [--steps 10]
    python benchmarks/bench_distill.py --part b [--seeds 0 1] [--epochs N]

Each part rewrites its own section of benchmarks/results/distill.md.
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch

from clock_deploy.config import load_config
from clock_deploy.distill import build_distiller
from clock_deploy.engine.trainer import TrainStep
from clock_deploy.io import write_text
from clock_deploy.models.build import build_criterion, build_model
from random_batch import random_batch  # benchmarks/ is on sys.path when run as a script

DEMO = "configs/demo"
RESULTS = "benchmarks/results/distill.md"
ARCHS = ["dab_detr", "deformable_detr", "dino"]
# (a) timed variants: name -> (demo config, overrides); the configs the A/B trains with
STEP_VARIANTS = {"clock": ("distill.yaml", []),
                 "clock_gt_only": ("distill.yaml", ["distill.logit.random_queries=0"]),
                 "kd_detr": ("distill_kd_detr.yaml", []),
                 "fgd": ("distill_fgd.yaml", [])}
# (name, run folder, config, overrides): the A/B variants of part (b)
VARIANTS = [
    ("baseline", "baseline", "student.yaml", []),
    ("CLoCK", "clock_lmem1", "distill.yaml", []),
    ("KD-DETR", "kddetr", "distill_kd_detr.yaml", []),
    ("FGD", "fgd", "distill_fgd.yaml", []),
    ("LCMD only", "lcmd_only_lmem1", "distill.yaml", ["distill.use_logit=false"]),
    ("TCLD only", "tcld_only", "distill.yaml", ["distill.use_mem=false"]),
    ("CLoCK, lambda_mem=50", "clock", "distill.yaml", ["distill.lambda_mem=50"]),
    ("LCMD only, lambda_mem=50", "lcmd_only", "distill.yaml", ["distill.use_logit=false", "distill.lambda_mem=50"]),
]


# ---------------------------------------------------------------- (a) step time

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


def part_a(args):
    teacher_cfg = load_config(os.path.join(args.configs, "teacher.yaml"))
    torch.manual_seed(0)
    teacher = build_model(teacher_cfg.model).eval()
    rows = []
    for arch in ARCHS:
        cfg = load_config(os.path.join(args.configs, "student.yaml"), [f"model.arch={arch}"])
        torch.manual_seed(0)
        student = build_model(cfg.model).train()
        criterion = build_criterion(cfg.loss, cfg.model)
        images, targets = random_batch(cfg, torch.Generator().manual_seed(0))
        runners = {"plain": training_step(TrainStep(student, criterion), cfg.train.lr),
                   "teacher": torch.no_grad()(lambda images, targets: teacher(images))}
        for name, (config, overrides) in STEP_VARIANTS.items():
            method_cfg = load_config(os.path.join(args.configs, config), [f"model.arch={arch}"] + overrides)
            distiller = build_distiller(method_cfg, teacher, student)
            runners[name] = training_step(TrainStep(student, criterion, distiller).train(), cfg.train.lr)
        medians = time_steps(runners, images, targets, args.steps)
        rows.append((arch, medians))
        ratios = " ".join(f"{m}={medians[m] / medians['plain']:.2f}" for m in STEP_VARIANTS)
        print(f"{arch}: plain {medians['plain'] * 1000:.0f} ms/step, teacher forward "
              f"{medians['teacher'] * 1000:.0f} ms; distill/plain {ratios}", flush=True)

    lines = [f"Teacher: {teacher_cfg.model.arch} (hidden {teacher_cfg.model.hidden_dim}, ResNet-"
             f"{teacher_cfg.model.backbone.depth} width {teacher_cfg.model.backbone.width}), students from "
             f"{args.configs}/student.yaml with model.arch set per row; batch {cfg.train.batch_size} x "
             f"{cfg.data.img_size[0]}x{cfg.data.img_size[1]}, median of {args.steps} interleaved steps "
             f"(forward + backward + AdamW step), {machine()}.", "",
             "| student | plain ms/step | teacher fwd ms | " + " | ".join(f"{m} ms/step" for m in STEP_VARIANTS)
             + " | " + " | ".join(f"{m} / plain" for m in STEP_VARIANTS) + " | CLoCK beyond the teacher fwd / plain |",
             "|---" * (4 + 2 * len(STEP_VARIANTS)) + "|"]
    for arch, medians in rows:
        plain = medians["plain"]
        lines.append(f"| {arch} | {plain * 1000:.0f} | {medians['teacher'] * 1000:.0f} | "
                     + " | ".join(f"{medians[m] * 1000:.0f}" for m in STEP_VARIANTS) + " | "
                     + " | ".join(f"{medians[m] / plain:.2f}" for m in STEP_VARIANTS)
                     + f" | {(medians['clock'] - medians['teacher']) / plain:.2f} |")
    lines += ["", "Goal: CLoCK / plain <= 1.3. The teacher forward is a floor no distiller avoids; the last "
              "column is the step without it (student with the extra query group + the losses). Variants run "
              "the demo configs (distill.yaml, distill_kd_detr.yaml, distill_fgd.yaml); clock_gt_only drops "
              "CLoCK's general random queries (distill.logit.random_queries=0) and keeps the GT queries."]
    return "\n".join(lines)


# ---------------------------------------------------------------- (b) A/B

def ensure_data(cfg):
    """Generate the synthetic KITTI data the demo configs point at, once."""
    if os.path.isdir(cfg.data.root):
        return
    from clock_deploy.data.synthetic import generate
    s = cfg.data.synth
    generate(cfg.data.root, s.num_images, seed=s.seed, height=s.height, width=s.width,
             val_fraction=s.val_fraction, max_objects=s.max_objects)


def train(cfg):
    """run_training, continuing (or just reading back) the run in cfg.output_dir if it exists."""
    from clock_deploy.engine.commands import run_training
    resume = os.path.isfile(os.path.join(cfg.output_dir, "last.pt"))
    return run_training(cfg, resume=resume, progress=False)


def teacher_checkpoint(args):
    cfg = load_config(os.path.join(args.configs, "teacher.yaml"))
    path = args.teacher or os.path.join(cfg.output_dir, "last.pt")
    if not os.path.isfile(path):
        print(f"no teacher at {path}: training it with {args.configs}/teacher.yaml", flush=True)
        ensure_data(cfg)
        cfg.output_dir = os.path.dirname(path) or "."
        cfg.train.eval_every = cfg.train.epochs
        train(cfg)
    return path, teacher_metrics(path, cfg)


def teacher_metrics(path, cfg):
    """The teacher's arch and validation metrics (evaluated here when its checkpoint has none)."""
    from clock_deploy.data.dataset import build_dataset
    from clock_deploy.engine.checkpoint import load_model
    from clock_deploy.engine.evaluate import evaluate
    model, teacher_cfg, ckpt = load_model(path)
    metrics = ckpt.get("metrics", {})
    if "mAP" not in metrics:
        ensure_data(cfg)
        metrics = evaluate(model, build_dataset(cfg.data, cfg.data.val_split, train=False),
                           batch_size=cfg.train.batch_size, topk=cfg.export.topk, progress=False)
    return {"arch": teacher_cfg.model.arch, "metrics": metrics}


def part_b(args):
    teacher_path, teacher = teacher_checkpoint(args)
    results = {}
    for name, folder, config, overrides in VARIANTS:
        for seed in args.seeds:
            run_dir = os.path.join(args.out, f"{folder}_s{seed}")
            extra = [f"seed={seed}", f"output_dir={run_dir}", f"distill.teacher={teacher_path}"] + overrides
            if args.epochs:
                extra += [f"train.epochs={args.epochs}"]
            if args.max_iters:
                extra += [f"train.max_iters={args.max_iters}"]
            cfg = load_config(os.path.join(args.configs, config), extra)
            cfg.train.eval_every = cfg.train.epochs  # evaluate once, at the end of the budget
            ensure_data(cfg)
            metrics = train(cfg)
            results.setdefault(name, []).append(metrics)
            print(f"{name} seed {seed}: mAP {metrics.get('mAP', float('nan')):.4f} "
                  f"KITTI Mod {metrics.get('kitti_moderate', float('nan')):.2f}", flush=True)

    budget = cfg.train.epochs
    tm = teacher["metrics"]
    lines = [f"Synthetic KITTI ({cfg.data.root}, {cfg.data.img_size[0]}x{cfg.data.img_size[1]}), "
             f"student {cfg.model.arch} from {args.configs}/student.yaml, {budget} epochs per run, "
             f"seeds {args.seeds}; teacher {teacher['arch']} {teacher_path} "
             f"(mAP {tm.get('mAP', float('nan')):.4f}, KITTI Mod {tm.get('kitti_moderate', float('nan')):.2f}). "
             f"{machine()}.", "",
             "| variant | mAP (COCO) | delta +- sd | AP50 | KITTI Moderate AP (R40) | delta +- sd | mAP per seed | "
             "KITTI Mod per seed |",
             "|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        m, mod = mean(runs, "mAP"), mean(runs, "kitti_moderate")
        delta_map = paired_delta(runs, results["baseline"], "mAP", "{:+.4f}")
        delta_mod = paired_delta(runs, results["baseline"], "kitti_moderate", "{:+.2f}")
        seed_map = ", ".join(f"{r.get('mAP', float('nan')):.3f}" for r in runs)
        seed_mod = ", ".join(f"{r.get('kitti_moderate', float('nan')):.1f}" for r in runs)
        lines.append(f"| {name} | {m:.4f} | {delta_map} | {mean(runs, 'AP50'):.4f} | {mod:.2f} | "
                     f"{delta_mod} | {seed_map} | {seed_mod} |")
    lines += ["", "delta +- sd: mean and standard deviation over seeds of (variant - baseline of the same seed; "
              "same student initialization and data order)."]
    return "\n".join(lines)


def paired_delta(runs, baseline, key, fmt):
    deltas = [r.get(key, float("nan")) - b.get(key, float("nan")) for r, b in zip(runs, baseline)]
    spread = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
    return f"{fmt.format(statistics.mean(deltas))} +- {fmt.format(spread)[1:]}"


def mean(runs, key):
    return statistics.mean(r.get(key, float("nan")) for r in runs)


# ---------------------------------------------------------------- report

def machine():
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, load average {load:.1f}")


SECTIONS = {"a": "## (a) Step time: distillation / plain training",
            "b": "## (b) Accuracy on synthetic KITTI, fixed budget"}


def update_report(path, part, body):
    """Replace section `part` of the results file, keeping the other one."""
    sections = {}
    if os.path.isfile(path):
        text = open(path).read()
        for key, title in SECTIONS.items():
            if title in text:
                rest = text.split(title, 1)[1]
                others = [t for t in SECTIONS.values() if t != title and t in rest]
                sections[key] = rest.split(others[0], 1)[0].strip() if others else rest.strip()
    sections[part] = body + f"\n\nCommand: `python {' '.join(sys.argv)}`"
    out = ["# Distillation benchmark", "", "Written by benchmarks/bench_distill.py.", ""]
    for key, title in SECTIONS.items():
        if key in sections:
            out += [title, "", sections[key], ""]
    write_text(path, "\n".join(out))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["a", "b"], required=True)
    parser.add_argument("--configs", default=DEMO, help="folder with teacher.yaml, student.yaml, distill*.yaml")
    parser.add_argument("--steps", type=int, default=10, help="(a) timed steps per method")
    parser.add_argument("--teacher", default=None, help="(b) teacher checkpoint to reuse")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="(b) seeds of every variant")
    parser.add_argument("--epochs", type=int, default=0, help="(b) budget; default: student.yaml train.epochs")
    parser.add_argument("--max-iters", type=int, default=0, help="(b) stop every run after N iterations (smoke test)")
    parser.add_argument("--out", default="bench_out/distill", help="(b) run folders")
    parser.add_argument("--results", default=RESULTS)
    args = parser.parse_args()
    body = part_a(args) if args.part == "a" else part_b(args)
    print(body)
    update_report(args.results, args.part, body)


if __name__ == "__main__":
    main()
