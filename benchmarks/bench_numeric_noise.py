"""How far one training run moves when only the CPU kernels change: run-to-run noise that paired seeds do not pair.

The A/B pairs its variants by seed (same student initialization, data order, flips and denoising noise), but
its runs were trained on several machines, and the same run trained again on another CPU ended elsewhere
(distill_content.md: seed-1 test mAP -0.019 to +0.027). This script measures that effect on one machine:
the A/B's DINO baseline, seeds 0..N-1, trained twice with the same config and seed, once with PyTorch's
default CPU kernels and once restricted to AVX2 kernels (ATen, oneDNN and MKL), as a CPU without AVX-512
would run it. Any difference is numerical: floating-point sums in another order, amplified by training.

    python benchmarks/bench_numeric_noise.py --jobs 2          # ~10 min per run, two side by side
    python benchmarks/bench_numeric_noise.py --report-only     # rewrite the results file from the run files

Each finished run is a small file in benchmarks/results/numeric_noise_runs/ (commit these): a run is never
trained twice, and the report reads them on any machine.
"""
import argparse
import dataclasses
import math
import os
import statistics
import subprocess
import sys

import bench_distill as ab  # benchmarks/ is on sys.path when run as a script
import bench_distill_confirm as confirm
import bench_distill_content as content
from clock_deploy.config import load_config
from clock_deploy.io import read_json, write_json, write_text

RUNS = "benchmarks/results/numeric_noise_runs"
RESULTS = "benchmarks/results/numeric_noise.md"
FAMILY = "dino"
# Environment that selects each kernel set; it must be set before torch is imported, so each run is its
# own process.
KERNELS = {"default": {},
           "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def ab_args(out):
    """The A/B's data sizes and schedule (bench_distill.py part (b) defaults)."""
    return argparse.Namespace(configs=ab.DEMO, epochs=12, teacher_epochs=16, train_images=800, tuning_images=200,
                              test_images=400, max_iters=0, out=out)


def run_file(runs_dir, kernels, seed):
    return os.path.join(runs_dir, f"{FAMILY}-baseline-{kernels}-{seed}.json")


def train_one(out, runs_dir, kernels, seed):
    """Worker (its own process, KERNELS[kernels] in its environment): train the A/B's baseline of `seed`
    into a folder of its own, score it on the A/B's test split and write its run file."""
    import torch
    torch.set_num_threads(1)  # as the A/B's runs were trained (--jobs 2: one thread each)
    args = ab_args(out)
    config, overrides, _ = ab.VARIANTS["baseline"]
    cfg, _ = ab.run_config(args, "baseline", FAMILY, config, overrides, seed, *ab.schedule(args, FAMILY))
    cfg = dataclasses.replace(cfg, output_dir=os.path.join(out, "numeric_noise", f"{kernels}-{seed}"))
    metrics, resumed = ab.train(cfg)
    test = ab.test_metrics(args, os.path.join(cfg.output_dir, "last.pt"), cfg)
    write_json(run_file(runs_dir, kernels, seed), {
        "kernels": kernels, "environment": KERNELS[kernels], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "seed": seed, "cpu": ab.cpu_model(), "resumed": resumed, "config_hash": ab.config_hash(cfg),
        "metrics": {"tuning": metrics, "test": test}, "versions": ab.versions()})


def run_all(cli, todo):
    """Train each (kernels, seed) of `todo` in a process of its own, cli.jobs at a time."""
    running = []
    for position, (kernels, seed) in enumerate(todo):
        command = [sys.executable, os.path.abspath(__file__), "--worker", kernels, str(seed), "--out", cli.out,
                   "--runs-dir", cli.runs_dir]
        env = {**os.environ, **KERNELS[kernels], "OMP_NUM_THREADS": "1"}
        running.append((kernels, seed, subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)))
        print(f"training {kernels} seed {seed} ({position + 1} of {len(todo)})", flush=True)
        while len(running) >= cli.jobs or (position == len(todo) - 1 and running):
            kernels_done, seed_done, process = running.pop(0)
            _, err = process.communicate()
            if process.returncode:
                raise SystemExit(f"{kernels_done} seed {seed_done} failed:\n{err[-2000:]}")
            print(f"finished {kernels_done} seed {seed_done}", flush=True)


def stats_lines(runs):
    """The results table and its reading, from {(kernels, seed): run file}."""
    seeds = sorted(seed for kernels, seed in runs if kernels == "default" and ("avx2", seed) in runs)
    lines = ["| seed | test mAP, default kernels | test mAP, AVX2 kernels | AVX2 minus default | "
             "KITTI Mod, default | KITTI Mod, AVX2 |", "|---:|---:|---:|---:|---:|---:|"]
    diffs = []
    for seed in seeds:
        default, avx2 = (runs[(k, seed)]["metrics"]["test"] for k in ("default", "avx2"))
        diffs.append(avx2["mAP"] - default["mAP"])
        lines.append(f"| {seed} | {default['mAP']:.4f} | {avx2['mAP']:.4f} | {diffs[-1]:+.4f} | "
                     f"{default['kitti_moderate']:.2f} | {avx2['kitti_moderate']:.2f} |")
    if len(seeds) < 2:
        return lines + ["", f"Reading: not yet ({len(seeds)} seed(s) with both runs; 2 needed)."]
    st = ab.paired_stats(diffs)
    rms = math.sqrt(statistics.mean(d * d for d in diffs))
    spread = statistics.stdev(runs[("default", s)]["metrics"]["test"]["mAP"] for s in seeds)
    return lines + ["", f"AVX2 minus default, {st['n']} seeds: {st['mean']:+.4f} +- {st['sd']:.4f}, 95% CI "
                        f"[{st['ci'][0]:+.4f}, {st['ci'][1]:+.4f}], p {ab.p_text(st['p'])}; root mean square "
                        f"{rms:.4f}. The baseline's own spread across the seeds (default kernels): sd {spread:.4f}.",
                    "", "A paired delta (variant minus baseline of one seed) holds two runs, so kernel noise of this "
                        f"size alone gives it an sd of about the root mean square above ({rms:.4f}): at that sd, "
                        f"a 95% CI of half width 0.01 mAP needs {seeds_for(rms, 0.01)} paired seeds."]


def repeat_lines(runs, earlier):
    """Whether each default-kernel run repeats the earlier training of the same run on the same CPU model:
    `earlier` maps seed -> that run's fresh-split score file, whose test_again holds its test-split metrics
    as ab.metric_subset rounds them."""
    same_cpu = [seed for seed, record in earlier.items() if record.get("trained_again")
                and ("default", seed) in runs and record["cpu"] == runs[("default", seed)]["cpu"]]
    if not same_cpu:
        return []
    differ = [seed for seed in same_cpu if ab.metric_subset(runs[("default", seed)]["metrics"]["test"])["mAP"]
              != earlier[seed]["test_again"]["mAP"]]
    which = f" (seeds {', '.join(map(str, differ))} differ)" if differ else ""
    return ["", f"Repeatability: the default-kernel run equals the same baseline trained in an earlier session "
                f"on the same CPU model ({content.RUNS}/, test mAP to the 6 digits stored there) on "
                f"{len(same_cpu) - len(differ)} of {len(same_cpu)} seeds{which}."]


def seeds_for(sd, half_width):
    """The fewest paired seeds whose 95% t interval at this sd is narrower than +-half_width."""
    from scipy import stats
    n = 2
    while stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) > half_width and n < 1000:
        n += 1
    return n


def earlier_runs(seeds):
    """The second follow-up's baselines trained again (bench_distill_content.py): the same runs as the
    default-kernel ones here, scored on the same test split, so they show whether training repeats."""
    paths = {seed: confirm.fresh_file(content.RUNS, "baseline", seed) for seed in range(seeds)}
    return {seed: read_json(path) for seed, path in paths.items() if os.path.isfile(path)}


def report(cli, runs):
    lines = ["# Run-to-run noise from the CPU kernels alone (DINO baseline)", "", "Written by "
             "benchmarks/bench_numeric_noise.py.", "", __doc__.split("\n\n")[1].replace("\n", " "), "",
             f"{ab.machine()}. Runs: {cli.runs_dir}/ (their cpu and cpu_capability say where and how each trained).",
             "", *stats_lines(runs), *repeat_lines(runs, earlier_runs(cli.seeds)),
             "", f"Command: `python benchmarks/bench_numeric_noise.py --jobs {cli.jobs} "
             f"--seeds {cli.seeds}`"]
    write_text(cli.results, "\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=4, help="the baseline's seeds 0..N-1")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained side by side, one thread each")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the results file")
    parser.add_argument("--out", default="bench_out/distill", help="the A/B data folder; runs go to OUT/numeric_noise")
    parser.add_argument("--runs-dir", default=RUNS)
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--worker", nargs=2, metavar=("KERNELS", "SEED"), help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        return train_one(cli.out, cli.runs_dir, cli.worker[0], int(cli.worker[1]))
    pairs = [(kernels, seed) for seed in range(cli.seeds) for kernels in KERNELS]
    todo = [pair for pair in pairs if not os.path.isfile(run_file(cli.runs_dir, *pair))]
    if todo and not cli.report_only:
        ab.ensure_data(ab_args(cli.out), load_config(os.path.join(ab.DEMO, "student.yaml")))
        run_all(cli, todo)
    runs = {pair: read_json(run_file(cli.runs_dir, *pair)) for pair in pairs
            if os.path.isfile(run_file(cli.runs_dir, *pair))}
    report(cli, runs)
    print(open(cli.results).read())


if __name__ == "__main__":
    main()
