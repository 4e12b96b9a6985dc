"""Confirmation A/B for the DINO student: a CLoCK configuration chosen on the tuning split, reported on a
fresh test split that no run of the A/B has been scored on (a follow-up to bench_distill.py part (b)).

PLAN below was written before this script produced a number; the rule in it is fixed. Finished runs
and evaluations are json files in --runs-dir, reused when they still match, so it resumes after an
interruption. It needs the checkpoints of the A/B's DINO rows under the second teacher
(<out>/runs/dino-<variant>-t1-<seed>/last.pt, on the machine that trained them) and the committed teacher.

    python benchmarks/bench_distill_confirm.py [--jobs 2]
    python benchmarks/bench_distill_confirm.py --report-only    # rewrite the results file from the run files
"""
import argparse
import contextlib
import json
import os
import statistics
import sys

import torch

import bench_distill as ab  # benchmarks/ is on sys.path when run as a script
from clock_deploy.config import load_config
from clock_deploy.io import file_sha256, read_json, write_json, write_text

RESULTS = "benchmarks/results/distill_confirm.md"
RUNS = "benchmarks/results/distill_confirm_runs"
FAMILY = "dino"
TEACHER_SEED = 1                  # the second DINO teacher: its weights are committed, its students' checkpoints kept
FRESH_SEED = 2                    # scenes of the fresh test split (seed 0: training + tuning, seed 1: the A/B's test)
SEEDS = 8
CANDIDATES = ["clock", "tcld_only", "lcmd_only", "clock_kl"]  # CLoCK configurations; the first wins a tie
REUSED = CANDIDATES + ["fgd"]     # trained by the A/B under the second teacher: evaluated again, not retrained
TRAINED = ["baseline", "kd_detr"]  # trained here (baseline checkpoints were lost; KD-DETR never ran under teacher 2)
PLAN = """\
Why this follow-up: the A/B (distill.md) did not establish CLoCK's gain on DINO, and its ablation rows
(test split, scenes of seed 1) put LCMD alone and FGD ahead of the full CLoCK. Picking a CLoCK
configuration after reading those numbers and reporting it on the same split would be tuning on the test
split. Here the configuration is chosen on the tuning split and reported on a split no run has been
scored on.

Protocol, written before any number of this follow-up was computed and not changed after (it was
committed after a smoke test, 2 training iterations of baseline and KD-DETR on seed 0, had printed the
choice below and the seed-0 scores on the fresh split):
1. Candidates: the four CLoCK configurations the A/B trained under the second DINO teacher for seeds 0-7:
   the full CLoCK, TCLD only, LCMD only and CLoCK with the softmax-KL class term (the `-t1` rows of
   distill.md, coefficients as there). Chosen: the best mean tuning-split mAP over the 8 seeds (tuning
   split: the 200 validation images of the training scenes, seed 0); a tie goes to the full CLoCK. No
   test number plays a part.
2. Fresh test split: 400 images generated with seed 2, used for nothing else.
3. Rows: baseline seeds 0-7, trained again here with the A/B's config (the checkpoints of the A/B's
   baselines were lost with the first machine; each retrained baseline's seed-1 test mAP is set beside its
   record); the four candidates and FGD from the A/B's checkpoints (each must reproduce its record's
   seed-1 test mAP, or it is not used); KD-DETR under the second teacher, seeds 0-7, trained here (the A/B
   ran KD-DETR under the first teacher only).
4. Every row is reported on the fresh split: minus the baseline of its seed (same student initialization
   and data order), mean, sd, 95% CI (t) and two-sided paired t-test p.
5. Pass rule, on the fresh split: the chosen configuration's 95% CI lower bound above 0 and its mean gain
   at least KD-DETR's. The full CLoCK's row is reported beside it whichever configuration is chosen; a
   chosen configuration other than the full CLoCK is named by what it is (e.g. "CLoCK, LCMD only"), and
   the issue's rule about CLoCK itself reads the full CLoCK's row."""


def run_args(cli):
    """The A/B's settings (bench_distill.py part (b) defaults) with this follow-up's folders."""
    return argparse.Namespace(configs=ab.DEMO, epochs=12, teacher_epochs=16, train_images=800, tuning_images=200,
                              test_images=400, max_iters=cli.max_iters, report_only=cli.report_only, jobs=cli.jobs,
                              out=cli.out, runs_dir=cli.runs_dir, teachers_dir=ab.TEACHERS_DIR, results=cli.results,
                              seeds=cli.seeds)


def reading(args, runs_dir=None):
    """args that only read run files (of `runs_dir`, default args.runs_dir), never train."""
    return argparse.Namespace(**{**vars(args), "runs_dir": runs_dir or args.runs_dir, "report_only": True})


def reading_full_budget(args, runs_dir):
    """reading(args, runs_dir) for rows trained at the full budget, also when this run is a smoke test."""
    return argparse.Namespace(**{**vars(reading(args, runs_dir)), "max_iters": 0})


def follow_up_parser(description, seeds, runs, results):
    """The arguments every DINO follow-up takes; a follow-up adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--jobs", type=int, default=1, help="runs trained side by side, one thread each")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the results file")
    parser.add_argument("--seeds", type=int, default=seeds, help="paired seeds 0..N-1 (fewer: a smoke test)")
    parser.add_argument("--max-iters", type=int, default=0, help="stop every new run after N iterations (smoke test)")
    parser.add_argument("--out", default="bench_out/distill", help="the A/B's data and run folders (checkpoints)")
    parser.add_argument("--ab-runs", default=ab.RUNS, help="the A/B's run files (read only)")
    parser.add_argument("--runs-dir", default=runs, help="this follow-up's run files (commit these)")
    parser.add_argument("--results", default=results)
    return parser


def ab_dino_rows(args, ab_runs):
    """(reader of the A/B's run files, run_once calls of its DINO rows as the A/B made them): the teachers'
    records and the coefficients the A/B chose on the tuning split, read from its run files."""
    read_ab = reading_full_budget(args, ab_runs)
    first, second = ab.family_teacher(read_ab, FAMILY), ab.family_teacher(read_ab, FAMILY, seed=TEACHER_SEED)
    if first is None or second is None:
        raise SystemExit(f"{ab_runs}: the DINO teachers' records are missing (run bench_distill.py part (b) first)")
    return read_ab, ab_calls(args, second, ab.choose_coefficients(read_ab, first)[0])


def fresh_root(args, seed=FRESH_SEED):
    return os.path.join(args.out, "data", f"synth_test{args.test_images}_s{seed}")


def ensure_fresh_split(args, img_cfg, seed=FRESH_SEED):
    ab.ensure_test_split(fresh_root(args, seed), args.test_images, seed, img_cfg.data.synth)


def ab_calls(args, teacher, chosen):
    """run_once calls of the A/B's rows under the second teacher, as bench_distill.py made them: {name: calls}."""
    calls = {}
    for variant in REUSED + ["kd_detr"]:
        config, overrides, _ = ab.VARIANTS[variant]
        extra = overrides + (chosen if variant in ab.TUNED else [])
        calls[variant] = [(ab.run_name(variant, TEACHER_SEED), FAMILY, config, extra, seed,
                           *ab.schedule(args, FAMILY), teacher) for seed in range(args.seeds)]
    config, overrides, _ = ab.VARIANTS["baseline"]
    calls["baseline"] = [("baseline", FAMILY, config, overrides, seed, *ab.schedule(args, FAMILY), None)
                         for seed in range(args.seeds)]
    return calls


def choose(records):
    """The candidate with the best mean tuning-split mAP (all seeds finished), and every candidate's mean."""
    means = {name: statistics.mean(r["metrics"]["tuning"]["mAP"] for r in records[name]) for name in CANDIDATES}
    return max(CANDIDATES, key=lambda name: (means[name], -CANDIDATES.index(name))), means


@contextlib.contextmanager
def threads_of(record):
    """Torch at the thread count of `record`'s run (the order of float sums follows it), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(record.get("threads", threads))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def trained_to_end(run_dir):
    """Whether the run in run_dir finished training (the trainer logs "done" last): a run stopped partway,
    e.g. a restore interrupted, leaves a last.pt that must not be scored."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    return bool(lines) and json.loads(lines[-1]).get("event") == "done"


def fresh_file(runs_dir, name, seed):
    """The file that holds the fresh-split score of one run."""
    return os.path.join(runs_dir, f"fresh-{FAMILY}-{name}-{seed}.json")


def evaluate(args, call, record, seed_of_split=FRESH_SEED, verified=None, trained_again=False):
    """Metrics of a finished run's checkpoint on the fresh split of `seed_of_split` (and again on the A/B's
    test split, unless `verified`, an earlier score of the same checkpoint, has that), reused from its json
    while it scores the run of `record` (same config hash). A checkpoint of the same run trained again
    later, by another follow-up or on another machine, never replaces a score: the first one is the
    committed result. trained_again: the checkpoint is restore()'s, not the record's."""
    name, seed = call[0], call[4]
    run_dir = ab.run_dir_of(args.out, FAMILY, name, seed)
    checkpoint = os.path.join(run_dir, "last.pt")
    path = fresh_file(args.runs_dir, name, seed)
    stored = read_json(path) if os.path.isfile(path) else None
    if stored is not None and stored["config_hash"] == record["config_hash"]:
        return stored
    if not os.path.isfile(checkpoint) or not trained_to_end(run_dir) or args.report_only:
        return None  # not trained here, not to the end, or only reading
    sha = file_sha256(checkpoint)
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    fresh = ab.metric_subset(ab.test_metrics(args, checkpoint, cfg, fresh_root(args, seed_of_split)))
    if verified is not None and verified["checkpoint_sha256"] == sha:
        again = verified["test_again"]
    else:
        with threads_of(record):  # another thread count moves the mAP by ~3e-5
            again = ab.metric_subset(ab.test_metrics(args, checkpoint, cfg))
    # checkpoints never leave the machine that trained them, so the CPU scoring one is the CPU that trained it
    result = {"name": name, "seed": seed, "checkpoint_sha256": sha, "config_hash": record["config_hash"],
              "fresh": fresh, "test_again": again, "test_recorded": record["metrics"]["test"], "cpu": ab.cpu_model()}
    if trained_again:
        result.update(trained_again=True, versions=ab.versions())
    write_json(path, result)
    print(f"{name} seed {seed}: fresh mAP {result['fresh']['mAP']:.4f} (test again "
          f"{result['test_again']['mAP']:.4f}, recorded {record['metrics']['test']['mAP']:.4f})", flush=True)
    return result


def restore(args, call, record, seed_of_split=FRESH_SEED, verified=None):
    """Train a finished run again here from its call (same config, seed, student initialization and data
    order) when its checkpoint was lost with the machine that trained it, at the thread count of its
    record, then evaluate() it. Training does not reproduce across CPUs: the score keeps the retrained
    checkpoint's own test-split mAP beside the record's."""
    cfg, _ = ab.run_config(args, *call)
    with threads_of(record):
        ab.train(cfg)  # continues a restore that was interrupted on this machine
    return evaluate(args, call, record, seed_of_split, verified, trained_again=True)


def reproduces(result):
    return abs(result["test_again"]["mAP"] - result["test_recorded"]["mAP"]) < 1e-5


def as_records(scored):
    """{seed: record} with the fresh metrics where bench_distill's tables read the test split."""
    return {r["seed"]: {"metrics": {"test": r["fresh"]}, "resumed": True} for r in scored}


def report(args, chosen, means, scored, retrained, original, records):
    lines = ["# Distillation: confirmation on a fresh test split (DINO)", "",
             "Written by benchmarks/bench_distill_confirm.py.", "", "## Plan (pre-registered)", "", PLAN, "",
             "## Results", "", f"{ab.machine()}.", ""]
    lines += ab.recorded_code(records)
    lines.append("Tuning-split mAP of the candidates (mean over the seeds; the choice): "
                 + ", ".join(f"{name} {mean:.4f}" for name, mean in means.items()) + f" -> **{chosen}**.")
    unusable = [f"{r['name']} seed {r['seed']}" for rows in scored.values() for r in rows
                if r["name"] != "baseline" and not reproduces(r)]
    lines += ["", "Checkpoints that do not reproduce their record's test mAP (left out): "
              + (", ".join(unusable) if unusable else "none") + "."]
    if retrained:
        diffs = [retrained[s]["metrics"]["test"]["mAP"] - original[s]["metrics"]["test"]["mAP"]
                 for s in sorted(retrained) if s in original]
        lines += ["", f"Baselines retrained here, seed-1 test mAP minus the A/B's record ({len(diffs)} seeds): "
                  + ", ".join(f"{d:+.4f}" for d in diffs) + " (0 where training reproduces across machines)."]
    rows = {name: as_records([r for r in scored.get(name, []) if r["name"] == "baseline" or reproduces(r)])
            for name in ["baseline", *REUSED, "kd_detr"]}
    rows = {ab.run_name(name, 0 if name == "baseline" else TEACHER_SEED): per_seed
            for name, per_seed in rows.items() if per_seed}
    baseline = rows.get("baseline", {})
    lines += ["", f"Every number below is on the **fresh test split** (400 images, scenes of seed {FRESH_SEED}).", ""]
    lines += ab.variant_table(baseline, rows)
    lines += ["", verdict(baseline, rows, chosen, args.seeds)]
    lines += unchosen_at_bar(baseline, rows, chosen, args.seeds)
    lines += exploratory(baseline, rows, chosen)
    lines += ["", "delta: row minus the baseline of the same seed; 95% CI: mean +- t(0.975, n-1) sd / sqrt(n); "
              "p: two-sided paired t-test. min/run is left out here (distill.md times every variant). Per-run files: "
              f"{args.runs_dir}/ (dino-*: runs trained here, fresh-*: scores on the fresh split)."]
    command = " ".join(a for a in sys.argv if a != "--report-only")
    write_text(args.results, "\n".join(lines) + f"\n\nCommand: `python {command}`\n")


def verdict(baseline, rows, chosen, seeds):
    """The pass rule of PLAN (5), computed from the fresh-split rows."""
    name = ab.run_name(chosen, TEACHER_SEED)
    gain, kd = (ab.paired_delta(baseline, rows.get(n, {})) for n in (name, ab.run_name("kd_detr", TEACHER_SEED)))
    if gain is None or gain["n"] < seeds or kd is None or kd["n"] < seeds:
        return (f"Pass rule: not read yet ({gain['n'] if gain else 0} of {seeds} seeds of {name}, "
                f"{kd['n'] if kd else 0} of {seeds} of KD-DETR scored on the fresh split).")
    met = gain["ci"][0] > 0 and gain["mean"] >= kd["mean"]
    return (f"Pass rule (the chosen configuration's lower bound above 0 and its mean gain at least KD-DETR's): "
            f"{'met' if met else '**not met**'}: {name} {gain['mean']:+.4f}, 95% CI [{gain['ci'][0]:+.4f}, "
            f"{gain['ci'][1]:+.4f}]; KD-DETR {kd['mean']:+.4f}.")


def holm(pvalues):
    """Holm step-down adjusted p-values, in the order given (family-wise error across the comparisons)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def unchosen_at_bar(baseline, rows, chosen, seeds):
    """Rows the tuning split did not choose that clear the pass rule's bar anyway. They decide nothing (the
    choice was made before any test number); the line exists so a reader who scans the table for the best
    interval sees the multiplicity too: Holm-adjusted p across every row compared with the baseline."""
    kd = ab.paired_delta(baseline, rows.get(ab.run_name("kd_detr", TEACHER_SEED), {}))
    gains = {name: ab.paired_delta(baseline, per_seed) for name, per_seed in rows.items() if name != "baseline"}
    gains = {name: g for name, g in gains.items() if g is not None and g["n"] == seeds}
    if kd is None or kd["n"] < seeds or not gains:
        return []
    names = list(gains)
    adjusted = dict(zip(names, holm([gains[n]["p"] for n in names])))
    chosen_name = ab.run_name(chosen, TEACHER_SEED)
    clear = [f"{name} {g['mean']:+.4f}, 95% CI [{g['ci'][0]:+.4f}, {g['ci'][1]:+.4f}], p {ab.p_text(g['p'])} "
             f"(Holm {ab.p_text(adjusted[name])})" for name, g in gains.items()
             if name != chosen_name and g["ci"][0] > 0 and g["mean"] >= kd["mean"]]
    return ["", f"Rows not chosen that clear the same bar ({len(names)} rows compared with the baseline; "
            "exploratory, they decide nothing): " + ("; ".join(clear) if clear else "none") + "."]


def exploratory(baseline, rows, chosen, extra_pairs=()):
    """Paired comparisons read off the same run files that the plan did not name: they inform, never decide.
    extra_pairs: more (label, reference, per_seed, key) after the standard ones."""
    kd_detr = rows.get(ab.run_name("kd_detr", TEACHER_SEED), {})
    lines = ["", "## Exploratory (not in the plan)", "",
             "| comparison | metric | seeds | delta (mean +- sd) | 95% CI | p |", "|---|---|---:|---:|---|---:|"]
    pairs = [(f"{name} minus baseline", baseline, per_seed, key)
             for name, per_seed in rows.items() if name != "baseline" for key in ("AP50", "AP75")]
    pairs += [(f"{name} minus KD-DETR", kd_detr, rows.get(name, {}), key)
              for name in (ab.run_name(chosen, TEACHER_SEED), ab.run_name("fgd", TEACHER_SEED))
              for key in ("mAP", "kitti_moderate")]
    for label, reference, per_seed, key in [*pairs, *extra_pairs]:
        st = ab.paired_delta(reference, per_seed, key)  # None when no seed pairs (no KD-DETR runs yet)
        if st is None or st["n"] < 2:
            continue
        lines.append(f"| {label} | {key} | {st['n']} | {st['mean']:+.4f} +- {st['sd']:.4f} | "
                     f"[{st['ci'][0]:+.4f}, {st['ci'][1]:+.4f}] | {ab.p_text(st['p'])} |")
    return lines


def main():
    cli = follow_up_parser(__doc__.split("\n")[0], SEEDS, RUNS, RESULTS).parse_args()
    args = run_args(cli)
    ab.versions()  # the commit now, at the start
    read_ab, calls = ab_dino_rows(args, cli.ab_runs)
    records = {name: ab.run_all(read_ab, calls[name]) for name in REUSED}
    missing = [f"{name} seed {seed}" for name in REUSED for seed, r in enumerate(records[name]) if r is None]
    if missing:
        raise SystemExit(f"{cli.ab_runs}: the A/B's runs under the second teacher are unfinished or stale: {missing}")
    chosen, means = choose(records)
    print(f"chosen on the tuning split: {chosen} ({', '.join(f'{n} {m:.4f}' for n, m in means.items())})", flush=True)
    original = {r["seed"]: r for r in ab.run_all(read_ab, calls["baseline"]) if r is not None}
    if not args.report_only:
        img_cfg = load_config(os.path.join(args.configs, "student.yaml"))
        ab.ensure_data(args, img_cfg)
        ensure_fresh_split(args, img_cfg)
    for stage in [None, *TRAINED]:  # score what exists, then train the baselines, then KD-DETR, scoring after each
        if stage:
            ab.run_all(args, calls[stage])
        for name in TRAINED:
            records[name] = ab.run_all(reading(args), calls[name])
        scored = {name: [s for s in (evaluate(args, call, r) for call, r in zip(calls[name], records[name])
                                     if r is not None) if s is not None] for name in REUSED + TRAINED}
        retrained = {r["seed"]: r for r in records["baseline"] if r is not None}
        report(args, chosen, means, scored, retrained, original,
               [*(r for rows in records.values() for r in rows), *original.values()])
        if args.report_only:
            break
    print(open(args.results).read())


if __name__ == "__main__":
    main()
