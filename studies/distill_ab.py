"""The distillation A/B: baseline, CLoCK, gt_denoise, KD-DETR and FGD per student family, paired seeds.

Synthetic KITTI; each family distils from a teacher of its own family (configs/demo/teacher.yaml with
model.arch set; RT-DETR from its own demo configs, configs/demo/rt_detr_*.yaml). Every variant of a seed
starts from the same student initialization and sees the same data, so variants pair by seed, and only runs
of one machine type pair (bookkeeping.machine_type). Students train
with the real `run_training` for a fixed budget, are scored on a test split generated with another seed, and
each finished run is a json in --runs-dir (bookkeeping.RunRegistry): rerunning the command skips finished
runs and continues an interrupted one from its last.pt. A teacher's weights are written to --teachers-dir (to
be committed), so its students can train on any machine. A variant or family this code does not know (its
config does not load) is listed in the report as not run.

The CLoCK row is DINO's pre-registered candidate with the best tuning-split mAP (CANDIDATES, trained on
TUNING_SEEDS before any CLoCK or gt_denoise row; studies/distill_ab_preregistration.md): until the choice is
made those two rows wait, the others train.

    python -m studies.distill_ab [--families dino ...] [--seeds N] [--variants ...] [--jobs 2]
    python -m studies.distill_ab --tune-only          # only DINO's candidates on the tuning seeds
    python -m studies.distill_ab --report-only      # rewrite the report from the run files
"""
import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from clock_deploy.config import ConfigError, load_config
from clock_deploy.io import file_sha256, write_json
from studies import bookkeeping as bk

RESULTS = "studies/results/distill_ab.md"
RUNS = "studies/results/distill_ab_runs"
TEACHERS = "studies/results/teachers"
FAMILIES = {"dino": 8, "deformable_detr": 6, "rt_detr": 6, "dab_detr": 6}  # family -> paired seeds
VARIANTS = {  # variant -> (demo config, overrides)
    "baseline": ("student.yaml", []),
    "clock": ("distill.yaml", []),
    "gt_denoise": ("distill.yaml", ["distill.method=gt_denoise"]),
    "kd_detr": ("distill_kd_detr.yaml", []),
    "fgd": ("distill_fgd.yaml", []),
}
# DINO's pre-registered CLoCK candidates (studies/distill_ab_preregistration.md): name -> overrides of
# distill.yaml; C2's are computed from C1's logged gradient share (class_weight_overrides)
CANDIDATES = {"C1": [], "C2": None, "C3": ["distill.mem.weighting=gt_attention"],
              "C4": ["distill.logit.anchors=student"]}
TUNING_SEEDS = (100, 101)  # never used for a reported number
MIN_CLASS_SHARE = 0.1      # C2: the TCLD class term's share of the student's gradient norm it asks for
# family -> prefix of its own demo configs (RT-DETR: ResNet-vd, CCFF expansion, varifocal weight), else the
# DINO demo configs with model.arch set
FAMILY_CONFIG_PREFIX = {"rt_detr": "rt_detr_"}
# family -> (epoch multiplier, overrides) for its teacher and students: DAB-DETR converges as slowly as DETR
FAMILY_SCHEDULE = {"dab_detr": (4, ["train.lr=1e-4"])}
# family -> test mAP its teacher must reach for its students to train (issue 42: DAB-DETR's teacher >= 0.30)
MIN_TEACHER_MAP = {"dab_detr": 0.30}
CODE = ("models", "data", "training", "eval")  # what every run's result depends on; distilled runs add distill/
METRICS = ("mAP", "AP50", "AP75", "kitti_easy", "kitti_moderate", "kitti_hard")
PASS_RULE = ("Pass rule (written before the runs): for at least two families CLoCK - baseline and CLoCK - "
             "gt_denoise both have a 95% CI lower bound above 0, and CLoCK's mean gain over the baseline is at "
             "least KD-DETR's in every family. Reported whichever way it goes, with DINO read against FGD. "
             "Candidates, seeds and the machine rule: studies/distill_ab_preregistration.md.")


# ---------------------------------------------------------------- data and configs

def data_roots(args):
    """(training + tuning scenes of seed 0, test scenes of seed 1), generated once per budget."""
    base = os.path.join(args.out, "data")
    return (os.path.join(base, f"synth_train{args.train_images}_val{args.tuning_images}_s0"),
            os.path.join(base, f"synth_test{args.test_images}_s1"))


def ensure_data(args):
    from clock_deploy.data.synthetic import generate
    synth = load_config(os.path.join(args.configs, "student.yaml")).data.synth
    train_root, test_root = data_roots(args)
    total = args.train_images + args.tuning_images
    # (root, images, seed, val fraction): the test split is all "val" but one, as a split keeps a training image
    for root, num, seed, val in ((train_root, total, 0, args.tuning_images / total),
                                 (test_root, args.test_images + 1, 1, args.test_images / (args.test_images + 1))):
        if not os.path.isdir(root):
            generate(root, num, seed=seed, height=synth.height, width=synth.width, val_fraction=val,
                     max_objects=synth.max_objects, progress=False)


def run_config(args, family, config, overrides, seed, name, teacher=None):
    """The config of one run (raises ConfigError when this code does not know the family or variant)."""
    scale, family_overrides = FAMILY_SCHEDULE.get(family, (1, []))
    epochs = (args.teacher_epochs if name.endswith("teacher") else args.epochs) * scale
    drop = max(1, round(epochs * 10 / 12)) if name.endswith("teacher") else epochs - scale
    extra = [f"model.arch={family}", f"data.root={data_roots(args)[0]}", f"train.epochs={epochs}",
             f"train.lr_drop_epochs=[{drop}]", "train.eval_every=0", *family_overrides, *overrides,
             f"seed={seed}", f"output_dir={os.path.join(args.out, 'runs', name)}"]
    extra += [f"train.max_iters={args.max_iters}"] if args.max_iters else []
    extra += [f"distill.teacher={teacher['checkpoint']}"] if teacher else []
    return load_config(os.path.join(args.configs, FAMILY_CONFIG_PREFIX.get(family, "") + config), extra)


def code_folders(cfg):
    return CODE + (("distill",) if cfg.distill.method != "none" else ())


# ---------------------------------------------------------------- training and scoring

def train_and_score(args, cfg, test_split=True):
    """Train `cfg` (continuing its interrupted run) and score it on the test split (not for a tuning run):
    the record's fields about the result and where it was trained (every part's machine when resumed)."""
    from clock_deploy.training.commands import run_training
    set_aside_other_run(cfg)
    resume = os.path.isfile(os.path.join(cfg.output_dir, "last.pt"))
    os.makedirs(cfg.output_dir, exist_ok=True)
    parts = bk.start_part(cfg.output_dir, resume)
    start = time.time()
    metrics = {"tuning": metric_subset(run_training(cfg, resume=resume, progress=False))}
    if test_split:
        metrics["test"] = metric_subset(score_on_test_split(args, os.path.join(cfg.output_dir, "last.pt"), cfg))
    split = "test" if test_split else "tuning"
    print(f"{cfg.output_dir}: {split} mAP {metrics[split]['mAP']:.4f} ({time.time() - start:.0f} s)", flush=True)
    return {"metrics": metrics, "seconds": round(time.time() - start, 1), "machine": parts[-1], "parts": parts,
            "resumed": len(parts) > 1}


def set_aside_other_run(cfg):
    """Move cfg.output_dir away when it holds a run of other settings, so that run is never continued."""
    saved = os.path.join(cfg.output_dir, "config.yaml")
    if os.path.isfile(saved) and bk.explicit_settings(load_config(saved)) != bk.explicit_settings(cfg):
        aside = f"{cfg.output_dir}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.move(cfg.output_dir, aside)
        print(f"{cfg.output_dir}: trained with other settings, moved to {aside}", flush=True)


def score_on_test_split(args, checkpoint, cfg):
    """Metrics of a checkpoint on the test split (scenes of another seed)."""
    from clock_deploy.checkpoint import load_model
    from clock_deploy.data.dataset import build_dataset
    from clock_deploy.eval.loop import evaluate_model
    model, _, _ = load_model(checkpoint)
    data_cfg = dataclasses.replace(cfg.data, root=data_roots(args)[1])
    return evaluate_model(model, build_dataset(data_cfg, "val", train=False), cfg.data.img_size, cfg.export.topk,
                          batch=cfg.train.batch_size)


def metric_subset(metrics):
    return {k: round(float(metrics[k]), 6) for k in METRICS if k in metrics}


def registry(args):
    """The run files; a run is keyed on what its data is (data_inputs), not on where --out put it."""
    return bk.RunRegistry(args.runs_dir, locations=("data.root",))


def data_inputs(args):
    """What the training + tuning and the test scenes are (their folder names say how they were generated)."""
    return {"data": [os.path.basename(root) for root in data_roots(args)]}


def distilled_inputs(args, teacher):
    """A distilled run's inputs: the data and which teacher (its record's key and weights)."""
    return {**data_inputs(args), "teacher": teacher["key"] + "-" + teacher["weights"]["sha256"][:16]}


# ---------------------------------------------------------------- teachers and runs

def family_teacher(args, family):
    """The family's teacher record (with "checkpoint": its committed weights), trained when it has none;
    None under --report-only when it has none. Raises ConfigError for a family this code does not know."""
    name = f"{family}-teacher"
    cfg = run_config(args, family, "teacher.yaml", [], 0, name)
    record, why = registry(args).find(name, cfg, data_inputs(args), code_folders(cfg), as_recorded=args.report_only)
    if record is None and args.report_only:
        return None
    if record is None:
        print(f"{name}: {why}; training it", flush=True)
        fields = train_and_score(args, cfg)
        os.makedirs(args.teachers_dir, exist_ok=True)
        weights = os.path.join(args.teachers_dir, f"{name}.pt")
        commit_weights(os.path.join(cfg.output_dir, "last.pt"), weights)
        record = registry(args).record(name, cfg, data_inputs(args), code_folders(cfg), family=family,
                                       variant="teacher", seed=0,
                                       **fields, weights={"file": os.path.basename(weights),
                                                          "sha256": file_sha256(weights)})
    weights = os.path.join(args.teachers_dir, record["weights"]["file"])
    if not args.report_only and not (os.path.isfile(weights) and file_sha256(weights) == record["weights"]["sha256"]):
        raise SystemExit(f"{weights}: missing or not the weights recorded in {registry(args).path(name)} "
                         f"(they are committed: restore them from git)")
    return {**record, "checkpoint": weights}


def commit_weights(checkpoint, path):
    """A teacher's last.pt without optimizer and RNG state (a checkpoint load_model reads), to be committed."""
    from clock_deploy.checkpoint import content_sha256, read_checkpoint
    from clock_deploy.io import torch_save
    ckpt = read_checkpoint(checkpoint)
    keep = ("format", "version", "arch", "classes", "config", "model", "ema", "epoch", "iteration", "metrics")
    weights = {k: ckpt[k] for k in keep if k in ckpt}
    weights["checksum"] = content_sha256(weights)  # so every read of the committed file can verify it
    torch_save(weights, path)


def student(args, family, variant, seed, teacher, variants=None):
    """(name, cfg, inputs) of one student run of `variants` (default VARIANTS; inputs None while a distilled
    run's teacher is unknown); raises ConfigError for a variant this code does not know."""
    config, overrides = (variants or VARIANTS)[variant]
    name = f"{family}-{variant}-{seed}"
    teacher = teacher if variant != "baseline" else None
    cfg = run_config(args, family, config, overrides, seed, name, teacher)
    if variant == "baseline":
        return name, cfg, data_inputs(args)
    return name, cfg, distilled_inputs(args, teacher) if teacher is not None else None


def train_student(args, family, variant, seed, teacher, variants=None):
    name, cfg, inputs = student(args, family, variant, seed, teacher, variants)
    return registry(args).record(name, cfg, inputs, code_folders(cfg), family=family, variant=variant, seed=seed,
                                 **train_and_score(args, cfg))


# ---------------------------------------------------------------- DINO's candidates (tuning split only)

def class_share(run_dir):
    """Mean share of TCLD's class term in the student's gradient norm over a run's log (log.jsonl)."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    shares = [row["grad_share_loss_logit_cls"] for row in rows if "grad_share_loss_logit_cls" in row]
    return sum(shares) / len(shares) if shares else None


def class_weight_overrides(share):
    """C2: the TCLD class weight W that gives the class term MIN_CLASS_SHARE of the gradient norm at C1's
    weights, W = ceil(0.1 / 0.9 x (1 - s) / s) (a term scaled by W holds W n / (W n + rest))."""
    weight = math.ceil(MIN_CLASS_SHARE / (1 - MIN_CLASS_SHARE) * (1 - share) / share)
    return [f"distill.logit.w_cls={weight}"]


def candidate_overrides(candidates, name):
    """The overrides of candidate `name`, or None while they are unknown (C2 before C1's seed-100 run)."""
    if CANDIDATES[name] is not None:
        return CANDIDATES[name]
    c1 = candidates["runs"].get("C1", {}).get(TUNING_SEEDS[0])
    return class_weight_overrides(c1["class_share"]) if c1 and c1.get("class_share") else None


def tuning_run(args, name, seed, teacher, candidates):
    """(run name, cfg) of one candidate's tuning run, cfg None while its overrides are unknown; raises
    ConfigError for a candidate this code does not have."""
    overrides = candidate_overrides(candidates, name)
    run = f"dino-tune-{name}-{seed}"
    if overrides is None:
        return run, None
    return run, run_config(args, "dino", "distill.yaml", overrides, seed, run, teacher)


def train_candidate(args, run, cfg, teacher, name, seed):
    inputs = distilled_inputs(args, teacher)
    fields = train_and_score(args, cfg, test_split=False)
    return registry(args).record(run, cfg, inputs, code_folders(cfg), family="dino", variant=f"tune-{name}",
                                 candidate=name, seed=seed, class_share=class_share(cfg.output_dir), **fields)


def tune(args, teacher):
    """{"runs": {candidate: {seed: record}}, "not_run": {candidate: why}, "choice": name or None}: DINO's
    candidates on the tuning seeds (trained when missing, C2 after C1's seed-100 run), scored on the tuning
    split only, and the choice once every candidate this code has is complete."""
    candidates = {"runs": {}, "not_run": {}, "choice": None}
    for _ in range(2):  # the second pass trains C2, whose weight comes from C1's first run
        todo = []
        for name in CANDIDATES:
            for seed in TUNING_SEEDS:
                if seed in candidates["runs"].get(name, {}):
                    continue
                try:
                    run, cfg = tuning_run(args, name, seed, teacher, candidates)
                except ConfigError as e:
                    candidates["not_run"][name] = f"this code does not have it ({e})"
                    break
                if cfg is None:
                    continue
                record, _ = registry(args).find(run, cfg, distilled_inputs(args, teacher), code_folders(cfg),
                                                as_recorded=args.report_only)
                if record is not None:
                    candidates["runs"].setdefault(name, {})[seed] = record
                elif not args.report_only:
                    todo.append((name, seed, run, cfg))
        for (name, seed, _, _), record in zip(todo, in_workers(args.jobs, train_candidate, [
                (args, run, cfg, teacher, name, seed) for name, seed, run, cfg in todo])):
            candidates["runs"].setdefault(name, {})[seed] = record
    c1 = candidates["runs"].get("C1", {}).get(TUNING_SEEDS[0])
    if c1 is not None and not c1.get("class_share") and "C2" in CANDIDATES and CANDIDATES["C2"] is None:
        candidates["not_run"]["C2"] = "C1's first tuning run logged no TCLD class share (distill.grad_share_every)"
    complete = {n: r for n, r in candidates["runs"].items() if len(r) == len(TUNING_SEEDS)}
    if complete and all(n in complete or n in candidates["not_run"] for n in CANDIDATES):
        means = {n: statistics.mean(r["metrics"]["tuning"]["mAP"] for r in complete[n].values()) for n in complete}
        candidates["choice"] = max(complete, key=lambda n: (means[n], -list(CANDIDATES).index(n)))
    return candidates


def chosen_variants(candidates):
    """VARIANTS with the CLoCK row at the chosen candidate and gt_denoise at its distill.logit settings;
    without a choice, the two rows are left out (they wait for it)."""
    if candidates["choice"] is None:
        return {v: row for v, row in VARIANTS.items() if v not in ("clock", "gt_denoise")}
    chosen = candidate_overrides(candidates, candidates["choice"])
    logit = [o for o in chosen if o.startswith(("distill.logit.", "distill.lambda_logit="))]
    # C4's extra group holds only the general queries (its target-aware ones are the student's matching
    # queries, trained on the ground truth anyway): its control is that group alone
    logit = ["distill.logit.repeats=0" if o == "distill.logit.anchors=student" else o for o in logit]
    variants = dict(VARIANTS)
    variants["clock"] = (VARIANTS["clock"][0], VARIANTS["clock"][1] + chosen)
    variants["gt_denoise"] = (VARIANTS["gt_denoise"][0], logit + VARIANTS["gt_denoise"][1])
    return variants


def tuning_lines(candidates):
    """The report's section on DINO's candidates: tuning means per candidate and the choice."""
    lines = ["### DINO's CLoCK candidates (tuning split, seeds "
             + ", ".join(map(str, TUNING_SEEDS)) + "; the test split is not read for the choice)", ""]
    rows = []
    for name in CANDIDATES:
        runs = candidates["runs"].get(name, {})
        if name in candidates["not_run"]:
            rows.append([name, "-", "not run: " + candidates["not_run"][name], "-", "-"])
            continue
        overrides = candidate_overrides(candidates, name)
        maps = [runs[s]["metrics"]["tuning"]["mAP"] for s in TUNING_SEEDS if s in runs]
        shares = [runs[s]["class_share"] for s in TUNING_SEEDS if s in runs and runs[s].get("class_share")]
        rows.append([name, (" ".join(overrides) or "(none: the shipped config)") if overrides is not None
                     else "(after C1's seed-100 run)",
                     ", ".join(f"{m:.4f}" for m in maps) or "-", f"{statistics.mean(maps):.4f}" if maps else "-",
                     f"{statistics.mean(shares):.3f}" if shares else "-"])
    lines += bk.markdown_table(["candidate", "overrides of distill.yaml", "tuning mAP per seed", "mean",
                                "TCLD class share of the gradient"], rows)
    choice = candidates["choice"]
    lines += ["", f"Choice (highest mean tuning mAP, a tie keeps the earlier): **{choice}**, the CLoCK row in every "
              "family." if choice else "Choice: not made yet (a candidate's tuning runs are missing); the CLoCK and "
              "gt_denoise rows wait for it.", ""]
    return lines


def collect(args, variants=None):
    """{family: {"teacher", "runs": {variant: {seed: record}}, "not_run": {what: why}}} of `variants` (default
    VARIANTS); with --report-only only reads, else trains what is missing: family by family (its teacher, then
    its students, so a family's run files land before the next teacher trains), seed-major within a family (so
    finished seeds are complete pairs)."""
    variants = variants or VARIANTS
    results = {}
    for family in args.families:
        todo = []
        entry = results[family] = {"teacher": None, "runs": {}, "not_run": {}}
        try:
            teacher = entry["teacher"] = family_teacher(args, family)
        except ConfigError as e:
            entry["not_run"][family] = f"this code does not train it ({e})"
            continue
        floor = MIN_TEACHER_MAP.get(family, 0.0)
        if teacher is not None and teacher["metrics"]["test"]["mAP"] < floor:
            entry["not_run"]["students"] = (f"the teacher's test mAP {teacher['metrics']['test']['mAP']:.4f} is "
                                            f"below {floor} (MIN_TEACHER_MAP): too little to distill")
            continue
        for seed in range(args.seeds or FAMILIES[family]):
            for variant in args.variants:
                if variant not in variants:
                    entry["not_run"][variant] = "waits for DINO's tuning choice"
                    continue
                try:
                    name, cfg, inputs = student(args, family, variant, seed, teacher, variants)
                except ConfigError as e:
                    entry["not_run"][variant] = f"this code does not train it ({e})"
                    continue
                if inputs is None:
                    continue  # keyed on its teacher, which has no record yet (--report-only)
                record, _ = registry(args).find(name, cfg, inputs, code_folders(cfg), as_recorded=args.report_only)
                if record is not None:
                    entry["runs"].setdefault(variant, {})[seed] = record
                elif not args.report_only:
                    todo.append((family, variant, seed, teacher))
        for (_, variant, seed, _), record in zip(todo, in_workers(args.jobs, train_student,
                                                                   [(args, *call, variants) for call in todo])):
            entry["runs"].setdefault(variant, {})[seed] = record
    return results


def start_worker():
    torch.set_num_threads(1)
    bk.log_each_message_once("clock_deploy.config")


def in_workers(jobs, function, argument_lists):
    """function(*arguments) for each, yielded in order: `jobs` at a time in worker processes on one thread
    each (two runs side by side on 2 cores train 1.17x the iterations of one: results/parallel_runs.md)."""
    if jobs <= 1 or len(argument_lists) <= 1:
        yield from (function(*arguments) for arguments in argument_lists)
        return
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=start_worker)
    try:
        futures = [pool.submit(function, *arguments) for arguments in argument_lists]
        yield from (future.result() for future in futures)
    finally:  # on an error: the running ones finish (their json is written), no new one starts
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- report

def paired_machine(runs, wanted=None):
    """The machine type a family's comparison pairs on: `wanted`, else the one with the most runs."""
    counts = {}
    for per_seed in runs.values():
        for record in per_seed.values():
            counts[bk.machine_type(record)] = counts.get(bk.machine_type(record), 0) + 1
    if wanted or not counts:
        return wanted, counts
    return max(sorted(counts), key=counts.get), counts


def by_seed(per_seed, metric):
    return {seed: r["metrics"]["test"][metric] for seed, r in per_seed.items()}


def gain(reference, variant, metric="mAP"):
    """bk.paired_stats of `variant` minus `reference` ({seed: record} each) on `metric`; None below 2 paired
    seeds (no interval)."""
    st = bk.paired_delta(by_seed(reference, metric), by_seed(variant, metric))
    return st if st is not None and st["n"] >= 2 else None


def family_lines(family, entry, wanted):
    """The family's section: teacher, machine, the table against the baseline and the head-to-head lines.
    Returns (lines, its paired runs {variant: {seed: record}})."""
    lines = [f"### {family}", ""]
    teacher = entry["teacher"]
    if teacher is not None:
        tm = teacher["metrics"]["test"]
        lines.append(f"Teacher: test mAP {tm['mAP']:.4f}, KITTI Mod {tm['kitti_moderate']:.2f} "
                     f"(trained on {bk.machine_type(teacher)}).")
    lines += [f"Not run: {what}: {why}." for what, why in entry["not_run"].items()]
    kind, counts = paired_machine(entry["runs"], wanted)
    runs = {v: {s: r for s, r in per_seed.items() if bk.machine_type(r) == kind}
            for v, per_seed in entry["runs"].items()}
    runs = {v: per_seed for v, per_seed in runs.items() if per_seed}
    if not runs:
        return lines + ["No comparison run finished yet." if not counts else f"No run on {kind}."], {}
    left = {k: n for k, n in counts.items() if k != kind}
    threads = sorted({r["machine"]["threads"] for per_seed in runs.values() for r in per_seed.values()})
    lines += [f"Paired on one machine type: {kind} (threads {', '.join(map(str, threads))})"
              + (f"; left out: {', '.join(f'{n} runs on {k}' for k, n in sorted(left.items()))}" if left else "")
              + ".", ""]
    baseline = runs.get("baseline", {})
    rows = []
    for variant, per_seed in runs.items():
        row = [variant, len(per_seed)]
        for metric, fmt, delta_fmt in (("mAP", "{:.4f}", "{:+.4f}"), ("kitti_moderate", "{:.2f}", "{:+.2f}")):
            row.append(bk.mean_sd_text(list(by_seed(per_seed, metric).values()), fmt))
            reference = by_seed(baseline, metric)
            st = None if variant == "baseline" else bk.paired_delta(reference, by_seed(per_seed, metric))
            row += bk.delta_cells(st, delta_fmt)
        rows.append(row)
    lines += bk.markdown_table(["variant", "seeds", "mAP", "delta mAP", "95% CI", "p", "KITTI Mod", "delta Mod",
                                "95% CI", "p"], rows)
    heads = [("clock", other) for other in ("gt_denoise", "kd_detr", "fgd") if "clock" in runs and other in runs]
    for a, b in heads:
        st = gain(runs[b], runs[a])
        if st is not None:
            lines.append(f"\n{a} minus {b} (test mAP, {st['n']} paired seeds): {st['mean']:+.4f}, 95% CI "
                         f"[{st['ci'][0]:+.4f}, {st['ci'][1]:+.4f}], p {bk.p_text(st['p'])}.")
    return lines, runs


def pass_rule_lines(paired):
    """The pass rule read off the paired runs ({family: {variant: {seed: record}}}), with Holm's correction
    over its confirmatory tests (CLoCK - baseline and CLoCK - gt_denoise in every family)."""
    tests, lines = [], []
    for family, runs in paired.items():
        for reference in ("baseline", "gt_denoise"):
            if "clock" in runs and reference in runs:
                st = gain(runs[reference], runs["clock"])
                if st is not None:
                    tests.append((family, reference, st))
    adjusted = bk.holm([st["p"] for _, _, st in tests])
    wins = [f for f in paired if sum(1 for fam, _, st in tests if fam == f and st["ci"][0] > 0) == 2]
    behind = []
    for family, runs in paired.items():
        gains = [bk.paired_delta(by_seed(runs.get("baseline", {}), "mAP"), by_seed(runs.get(v, {}), "mAP"))
                 for v in ("clock", "kd_detr")]
        if all(g is not None for g in gains) and gains[0]["mean"] < gains[1]["mean"]:
            behind.append(family)
    if not tests:
        return ["Pass rule: nothing to read yet (no family has 2 paired seeds of CLoCK and its references)."]
    met = len(wins) >= 2 and not behind
    lines.append(f"Pass rule: {'met' if met else '**not met**'} on the runs finished so far (both lower bounds "
                 f"above 0 in: {', '.join(wins) or 'none'}; CLoCK's mean gain below KD-DETR's in: "
                 f"{', '.join(behind) or 'none'}).")
    for (family, reference, st), p in zip(tests, adjusted):
        lines.append(f"- {family}: CLoCK - {reference} {st['mean']:+.4f}, 95% CI [{st['ci'][0]:+.4f}, "
                     f"{st['ci'][1]:+.4f}], p {bk.p_text(st['p'])}, Holm p {bk.p_text(p)} ({st['n']} seeds).")
    return lines


def summary_path(args):
    return os.path.splitext(args.results)[0] + ".json"


def summary(args, paired, candidates):
    """What the README quotes: the CLoCK row's candidate and its overrides of the distill config; per family each
    variant's paired gain over the baseline (test mAP and KITTI Moderate), CLoCK's over each other variant, the
    machine type paired on, and whether every variant has the family's seeds ("complete")."""
    families = {}
    for family, runs in paired.items():
        seeds = args.seeds or FAMILIES[family]
        baseline = runs.get("baseline", {})
        records = [r for per_seed in runs.values() for r in per_seed.values()]
        families[family] = {
            "seeds": seeds, "complete": all(len(runs.get(v, {})) >= seeds for v in args.variants),
            "machine": bk.machine_type(records[0]) if records else None,
            "gain": {v: {m: gain(baseline, per_seed, m) for m in ("mAP", "kitti_moderate")}
                     for v, per_seed in runs.items() if v != "baseline"},
            "clock_minus": {v: gain(per_seed, runs["clock"])
                            for v, per_seed in runs.items() if "clock" in runs and v != "clock"}}
    choice = candidates["choice"]
    return {"budget": {"train_images": args.train_images, "epochs": args.epochs, "test_images": args.test_images,
                       "schedule": {f: s[0] for f, s in FAMILY_SCHEDULE.items()}},
            "clock": {"candidate": choice, "overrides": candidate_overrides(candidates, choice) if choice else None},
            "families": families}


def report(args, results, candidates):
    """The report's lines and the runs each family pairs ({family: {variant: {seed: record}}})."""
    lines = [f"Synthetic KITTI: {args.train_images} training + {args.tuning_images} tuning images (seed 0 scenes), "
             f"test split {args.test_images} images (seed 1). Students {args.configs}/student.yaml and the distill "
             f"configs, {args.epochs} epochs; teachers {args.configs}/teacher.yaml, {args.teacher_epochs} epochs; "
             f"schedule per family {FAMILY_SCHEDULE}"
             + (f"; at most {args.max_iters} iterations per run (a smoke run, not a result)" if args.max_iters else "")
             + ".", "", PASS_RULE, ""]
    lines += tuning_lines(candidates)
    records = [r for e in results.values() for per_seed in e["runs"].values() for r in per_seed.values()]
    records += [e["teacher"] for e in results.values() if e["teacher"]]
    lines += bk.as_recorded_lines(records, {bk.code_hash(CODE), bk.code_hash(CODE + ("distill",))})
    paired = {}
    for family, entry in results.items():
        family_text, paired[family] = family_lines(family, entry, args.machine)
        lines += family_text + [""]
    lines += pass_rule_lines(paired)
    lines += ["", "delta: variant minus the baseline of the same seed; 95% CI: mean +- t(0.975, n-1) sd / sqrt(n); "
              "p: two-sided paired t-test; Holm p: Holm's correction over the pass rule's tests. Only runs of one "
              "machine type (CPU model / torch CPU capability, every part of a resumed run) are paired. Run files: "
              f"{args.runs_dir}/<family>-<variant>-<seed>.json."]
    return lines, paired


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="configs/demo", help="folder with teacher.yaml, student.yaml, distill*")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=0, help="paired seeds per family (default: FAMILIES)")
    parser.add_argument("--epochs", type=int, default=12, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=16)
    parser.add_argument("--train-images", type=int, default=800)
    parser.add_argument("--tuning-images", type=int, default=200)
    parser.add_argument("--test-images", type=int, default=400)
    parser.add_argument("--max-iters", type=int, default=0, help="stop every run after N iterations (smoke test)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained side by side, one thread each")
    parser.add_argument("--machine", help="pair the runs of this machine type (default: the one with most runs)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from the run files")
    parser.add_argument("--tune-only", action="store_true", help="only DINO's candidates on the tuning seeds")
    parser.add_argument("--out", default="bench_out/distill_ab", help="data and run folders (checkpoints)")
    parser.add_argument("--runs-dir", default=RUNS, help="one json per finished run (commit these)")
    parser.add_argument("--teachers-dir", default=TEACHERS, help="the teachers' weights (commit these)")
    parser.add_argument("--results", default=RESULTS)
    return parser.parse_args(argv)


def dino_candidates(args):
    """DINO's tuning stage: trained (with its teacher) when DINO is among --families or --tune-only, else
    only read, so a cheaper family can run first."""
    train = not args.report_only and (args.tune_only or "dino" in args.families)
    stage_args = args if train else argparse.Namespace(**{**vars(args), "report_only": True})
    teacher = family_teacher(stage_args, "dino")
    if teacher is None:
        return {"runs": {}, "not_run": {}, "choice": None}
    return tune(stage_args, teacher)


def main(argv=None):
    args = parse_args(argv)
    bk.log_each_message_once("clock_deploy.config")  # a shared config's warning would repeat for every run
    if not args.report_only:
        ensure_data(args)
    candidates = dino_candidates(args)
    results = {} if args.tune_only else collect(args, chosen_variants(candidates))
    lines, paired = report(args, results, candidates)
    write_json(summary_path(args), summary(args, paired, candidates))
    command = "python -m studies.distill_ab " + " ".join(a for a in (argv if argv is not None else sys.argv[1:])
                                                          if a != "--report-only")
    bk.write_report(args.results, "Distillation A/B (written by studies/distill_ab.py)", lines, command.strip())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
