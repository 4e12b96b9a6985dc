"""Runs per hour on a small CPU: one training run on all threads vs two side by side, one thread each.

Decides `python -m studies.distill_ab --jobs`. Each round times the same real training (`run_training` on a run
config of the A/B: its data, teacher and model) alone on --threads threads, then as two copies side
by side on one thread each; rounds alternate so drift in the machine's speed hits both alike. A run
stops after --iters timed iterations (the first 5 are warm-up), before any evaluation.

    python benchmarks/bench_parallel_runs.py --config bench_out/distill_ab/runs/dino-clock-0/config.yaml

Writes benchmarks/results/parallel_runs.md.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

RESULTS = "benchmarks/results/parallel_runs.md"
WARMUP = 5


def child(config, threads, iters, out):
    """Train until `iters` iterations after warm-up are timed, print their mean seconds as json, exit."""
    import time

    import torch
    torch.set_num_threads(threads)
    import clock_deploy.training.trainer as trainer
    from clock_deploy.config import load_config
    from clock_deploy.training.commands import run_training

    class TimedLoader:  # stands in for the trainer's tqdm bar: one time stamp per batch
        def __init__(self, loader, **_):
            self.loader = loader

        def set_postfix(self, **_):
            pass

        def __iter__(self):
            stamps = []
            for batch in self.loader:
                stamps.append(time.perf_counter())
                if len(stamps) > WARMUP + iters:
                    steps = [b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1:])]
                    print(json.dumps({"mean_s": statistics.mean(steps)}), flush=True)
                    os._exit(0)  # the timing is all this process is for: skip the rest of training
                yield batch

    trainer.tqdm = TimedLoader
    cfg = load_config(config, [f"output_dir={out}"])
    run_training(cfg, resume=False, progress=False)
    sys.exit("the run ended before the timed iterations: raise train.epochs or lower --iters")


def start(args, threads, out):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, __file__, "--child", str(threads), "--config", args.config,
                             "--iters", str(args.iters), "--out", out], env=env, stdout=subprocess.PIPE, text=True)


def seconds_per_iteration(process):
    out, _ = process.communicate()
    if process.returncode != 0:
        sys.exit(f"a timed run failed (exit {process.returncode}); see its output above")
    return json.loads(out.strip().splitlines()[-1])["mean_s"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a run's config.yaml (e.g. one of the A/B's runs)")
    parser.add_argument("--iters", type=int, default=40, help="timed iterations per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of the run alone")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--results", default=RESULTS)
    args = parser.parse_args()
    if args.child:
        return child(args.config, args.child, args.iters, args.out)
    if not os.path.isfile(args.config):
        sys.exit(f"{args.config}: no such config (run python -m studies.distill_ab first, or pass any run's "
                 f"config.yaml)")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            alone = seconds_per_iteration(start(args, args.threads, os.path.join(tmp, f"alone{r}")))
            pair = [start(args, 1, os.path.join(tmp, f"pair{r}_{i}")) for i in range(2)]
            side = [seconds_per_iteration(p) for p in pair]
            ratio = alone / (statistics.mean(side) / 2)  # iterations per second, two side by side vs alone
            rows.append((alone, side, ratio))
            print(f"round {r + 1}: alone {alone * 1000:.0f} ms/it, side by side {side[0] * 1000:.0f} + "
                  f"{side[1] * 1000:.0f} ms/it -> {ratio:.2f}x the iterations per second", flush=True)

    import torch

    from clock_deploy.io import write_text
    lines = ["# Runs per hour: one run on all threads vs two side by side", "",
             "Written by benchmarks/bench_parallel_runs.py. Same training (config below) timed alone on "
             f"{args.threads} threads, then as two copies side by side on one thread each; rounds alternate; "
             f"mean of {args.iters} iterations after {WARMUP} warm-up (forward, backward, optimizer, data loading).",
             "", f"Config: `{args.config}`. Machine: {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}, nothing else running.", "",
             "| round | alone ms/it | side by side ms/it (each) | iterations/s, two side by side / alone |",
             "|---:|---:|---|---:|"]
    lines += [f"| {i + 1} | {a * 1000:.0f} | {s[0] * 1000:.0f}, {s[1] * 1000:.0f} | {x:.2f} |"
              for i, (a, s, x) in enumerate(rows)]
    lines += ["", f"Median ratio: {statistics.median(x for _, _, x in rows):.2f}x the runs per hour with "
              "`python -m studies.distill_ab --jobs 2`.", "", f"Command: `python {' '.join(sys.argv)}`", ""]
    write_text(args.results, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
