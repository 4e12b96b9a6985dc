"""Where the DINO students of the distillation A/B differ, on the tuning split (a diagnostic, no training).

The A/B (distill.md, distill_confirm.md) found that CLoCK's TCLD adds little to a DINO student and that
every CLoCK configuration lowers KITTI Moderate AP while COCO mAP rises. This probe looks at the trained
checkpoints of the A/B's DINO rows under the second teacher (and the baselines). By default it reads the
tuning split only (the 200 validation images of the training scenes), so no test split is read.

- (1) TCLD's own task: each model answers the same noisy GT queries (the A/B's TCLD box noise, one
  copy, in its own language: DINO's label embedding); how well it refines them (IoU to the GT box,
  share at or above 0.7, class accuracy, confidence) and how close it lands to the teacher's answer.
  From the teacher and the scenes alone: how TCLD's slot weights split between GT and general
  queries, and how LCMD's foreground weight splits between the classes.
- (2) Per-metric deltas: each variant minus the baseline of its seed (paired), COCO AP by IoU and
  size and KITTI Moderate AP per class.
- (3) Car detections scoring above CAR_SCORE, each put in one bin, in score order: true positive
  (IoU >= 0.7 with a car not yet taken), duplicate (IoU >= 0.7 with a car already taken), poorly
  placed (IoU 0.3-0.7 with a car), on a van or truck (IoU >= 0.5), background.

Each checkpoint's numbers are a json in --runs-dir keyed on the checkpoint's sha256, so a rerun reuses
them and --report-only rewrites the results file from them on any machine. `--split fresh` runs the same
probe on the follow-up's fresh test split (scenes of seed 2), to see whether what the tuning split shows
holds on scenes no choice was made on; that split's results were reported before, nothing here chooses.

    python benchmarks/probe_distill_dino.py [--split fresh]
    python benchmarks/probe_distill_dino.py --report-only [--split fresh]
"""
import argparse
import dataclasses
import os
import statistics
import sys

import numpy as np
import torch

import bench_distill as ab  # benchmarks/ is on sys.path when run as a script
import bench_distill_confirm as confirm
from clock_deploy.config import load_config
from clock_deploy.io import file_sha256, read_json, write_json, write_text

RESULTS = {"tuning": "benchmarks/results/distill_probe.md", "fresh": "benchmarks/results/distill_probe_fresh.md"}
RUNS = {"tuning": "benchmarks/results/distill_probe_runs", "fresh": "benchmarks/results/distill_probe_fresh_runs"}
SPLIT_NAMES = {"tuning": "tuning split, 200 images", "fresh": "fresh test split, 400 images"}
TEACHER = os.path.join(ab.TEACHERS_DIR, "dino-teacher-s1.pt")
ROWS = ["baseline", "clock-t1", "tcld_only-t1", "lcmd_only-t1", "clock_kl-t1", "kd_detr-t1", "fgd-t1"]
SEEDS = 8
QUERY_SEED = 1000    # the noisy GT queries are drawn once from this seed: every model answers the same ones
CAR_SCORE = 0.3
PROBE_VERSION = 2    # bump when a number below is computed differently: stored jsons are then recomputed
TEACHER_PROBE_VERSION = 3  # the teacher's record: version 3 adds FGD's class weights
METRICS = ["mAP", "AP50", "AP75", "APs", "APm", "APl", "kitti_Car_moderate", "kitti_Pedestrian_moderate",
           "kitti_Cyclist_moderate", "kitti_moderate"]
PER_CLASS = [(name, metric) for name in ("Car", "Pedestrian", "Cyclist") for metric in ("AP50", "AP70", "AP")]
BINS = ["true_positive", "duplicate", "poorly_placed", "on_van_or_truck", "background"]


# ---------------------------------------------------------------- (1) noisy GT queries

def box_iou_pairs(a, b):
    """IoU of box a[i] with box b[i] (cxcywh, [..., 4]) -> [...]."""
    from clock_deploy.models.box_ops import box_cxcywh_to_xyxy
    a, b = box_cxcywh_to_xyxy(a), box_cxcywh_to_xyxy(b)
    inter = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    area = (a[..., 2:] - a[..., :2]).prod(-1) + (b[..., 2:] - b[..., :2]).prod(-1)
    return inter / (area - inter)


def dataset_batches(dataset, batch=20):
    """(images, targets) of the whole dataset, `batch` images at a time, in order."""
    from clock_deploy.data.dataset import collate_fn
    for start in range(0, len(dataset), batch):
        yield collate_fn([dataset[i] for i in range(start, min(start + batch, len(dataset)))])


def query_batches(dataset, num_classes, box_noise):
    """[(images, noisy GT spec, exact GT spec)] over the split, the noise drawn from QUERY_SEED."""
    from clock_deploy.distill.queries import ground_truth_queries
    batches = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(QUERY_SEED)
        for images, targets in dataset_batches(dataset):
            batches.append((images, ground_truth_queries(targets, num_classes, 1, box_noise),
                            ground_truth_queries(targets, num_classes, 1, 0.0)))
    return batches


@torch.no_grad()
def last_stage_answers(model, batches):
    """The model's last decoder stage on each batch's noisy GT group: [(logits, boxes)]."""
    from clock_deploy.distill.queries import query_group
    answers = []
    for images, spec, _ in batches:
        last = model(images, groups=[query_group(model, spec)]).groups[0][-1]
        answers.append((last.logits, last.boxes))
    return answers


def gt_query_stats(answers, batches, teacher_answers=None):
    """Refinement of the noisy GT queries, over the real (not padding) slots."""
    real = torch.cat([(~spec.pad_mask).flatten() for _, spec, _ in batches])
    gt_boxes = torch.cat([gt.boxes.reshape(-1, 4) for _, _, gt in batches])[real]
    labels = torch.cat([gt.labels.flatten() for _, _, gt in batches])[real]
    anchors = torch.cat([spec.boxes.reshape(-1, 4) for _, spec, _ in batches])[real]
    boxes = torch.cat([b.reshape(-1, 4) for _, b in answers])[real]
    logits = torch.cat([lg.reshape(-1, lg.shape[-1]) for lg, _ in answers])[real]
    iou = box_iou_pairs(boxes, gt_boxes)
    stats = {"queries": int(real.sum()), "anchor_iou": box_iou_pairs(anchors, gt_boxes).mean().item(),
             "iou": iou.mean().item(), "iou_above_0.7": (iou >= 0.7).float().mean().item(),
             "class_accuracy": (logits.argmax(-1) == labels).float().mean().item(),
             "confidence": logits.sigmoid().amax(-1).mean().item()}
    if teacher_answers is not None:
        teacher_boxes = torch.cat([b.reshape(-1, 4) for _, b in teacher_answers])[real]
        stats["iou_to_teacher"] = box_iou_pairs(boxes, teacher_boxes).mean().item()
    return stats


@torch.no_grad()
def tcld_weight_split(teacher, dataset, logit_cfg):
    """Where TCLD's normalizer sum_i w_i (w_i: the teacher's max class probability) sits, at the teacher's
    last stage, for the A/B's query set (GT x repeats with noise + general random queries): the general
    queries' share of the total weight and the mean w on each kind of slot."""
    from clock_deploy.distill.queries import TargetQuerySampler, query_group
    sampler = TargetQuerySampler(teacher.num_classes, logit_cfg.repeats, logit_cfg.box_noise, logit_cfg.random_queries)
    gt_w, general_w = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(QUERY_SEED)
        for images, targets in dataset_batches(dataset):
            spec = sampler(images, targets)
            weight = teacher(images, groups=[query_group(teacher, spec)]).groups[0][-1].logits.sigmoid().amax(-1)
            general = torch.zeros_like(spec.pad_mask)
            general[:, -logit_cfg.random_queries:] = True
            gt_w.append(weight[~general & ~spec.pad_mask])
            general_w.append(weight[general])
    gt_w, general_w = torch.cat(gt_w), torch.cat(general_w)
    return {"general_share": (general_w.sum() / (general_w.sum() + gt_w.sum())).item(),
            "gt_slots": len(gt_w), "general_slots": len(general_w),
            "mean_w_gt": gt_w.mean().item(), "mean_w_general": general_w.mean().item(),
            "query_set": f"repeats {logit_cfg.repeats}, box noise {logit_cfg.box_noise}, "
                         f"{logit_cfg.random_queries} general queries"}


@torch.no_grad()
def class_weight_shares(teacher, dataset, fgd_temperature=None):
    """Per class: its share of a map term's foreground weight, of the foreground pixels and of the objects.
    LCMD (default): sum_p M_p S_p on the teacher's memory grids, where LcmdLoss weighs its errors. FGD
    (fgd_temperature set): sum_p M_p S_p A_p on the teacher's backbone feature maps, A its spatial attention
    at that temperature, the pixel weight FgdLoss puts on its focal term. Each class is weighed with its
    own boxes only, so a pixel two classes' boxes share counts for both (rare in these scenes)."""
    from clock_deploy.distill.baselines import attention_maps
    from clock_deploy.distill.clock import location_weights
    totals = {name: {"weight": 0.0, "pixels": 0, "objects": 0} for name in dataset.classes}
    lcmd_levels = None
    for images, targets in dataset_batches(dataset):
        if fgd_temperature:  # (grid, the teacher's spatial attention on this batch) per level
            levels = [(m.shape[-2:], attention_maps(m, fgd_temperature)[0]) for m in teacher(images).features]
        else:  # LCMD's weight depends on the grid sizes only: one forward finds them
            lcmd_levels = lcmd_levels or [(m.shape[-2:], None) for m in teacher(images[:1]).memory]
            levels = lcmd_levels
        for k, name in enumerate(dataset.classes):
            of_class = [{"boxes": t["boxes"][t["labels"] == k]} for t in targets]
            totals[name]["objects"] += sum(len(t["boxes"]) for t in of_class)
            for grid, spatial in levels:
                fg, scale = location_weights(of_class, *grid)
                weight = scale if spatial is None else scale * spatial
                totals[name]["weight"] += weight[fg].sum().item()
                totals[name]["pixels"] += int(fg.sum())
    sums = {key: sum(t[key] for t in totals.values()) for key in ("weight", "pixels", "objects")}
    return {name: {f"{key}_share": t[key] / sums[key] for key in sums} for name, t in totals.items()}


# ---------------------------------------------------------------- (2), (3) detections

def pixel_iou(a, b):
    """IoU matrix [n, m] of x1y1x2y2 pixel boxes (numpy [n, 4], [m, 4]), by the models' box_iou in float64."""
    from clock_deploy.models.box_ops import box_iou
    return box_iou(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))[0].numpy()


def car_bins(gt, det, min_score=CAR_SCORE):
    """Counts of one frame's Car detections above min_score in BINS (gt / det: KITTI annos dicts)."""
    counts = dict.fromkeys(BINS, 0)
    keep = (det["name"] == "Car") & (det["score"] > min_score)
    boxes = det["bbox"][keep][np.argsort(-det["score"][keep], kind="stable")]
    cars, others = gt["bbox"][gt["name"] == "Car"], gt["bbox"][np.isin(gt["name"], ["Van", "Truck"])]
    to_car, to_other = pixel_iou(boxes, cars), pixel_iou(boxes, others)
    taken = np.zeros(len(cars), dtype=bool)
    for i in range(len(boxes)):
        best = to_car[i].argmax() if len(cars) else -1
        if best >= 0 and to_car[i, best] >= 0.7:
            counts["duplicate" if taken[best] else "true_positive"] += 1
            taken[best] = True
        elif best >= 0 and to_car[i, best] >= 0.3:
            counts["poorly_placed"] += 1
        elif len(others) and to_other[i].max() >= 0.5:
            counts["on_van_or_truck"] += 1
        else:
            counts["background"] += 1
    return counts


def detection_stats(model, dataset, image_hw, topk):
    """COCO / KITTI metrics (as the A/B computes them), COCO AP per class and the Car bins summed over
    the split."""
    from clock_deploy.eval.loop import collect_detections
    from clock_deploy.runtime import Detector
    evaluator = collect_detections(Detector.for_model(model, dataset.classes, image_hw, topk, "cpu"), dataset,
                                   batch=8)
    bins = dict.fromkeys(BINS, 0)
    for frame_gt, frame_det in zip(evaluator.gt_annos, evaluator.detections):
        for name, n in car_bins(frame_gt, frame_det).items():
            bins[name] += n
    return {"metrics": evaluator.summarize(), "per_class": evaluator.per_class_coco(), "car_bins": bins}


# ---------------------------------------------------------------- per checkpoint, resumable

def reused_or_probed(checkpoint, stored_path, probe, version=PROBE_VERSION):
    """The stored record of a checkpoint while it is the same file and the probe the same version, else
    {sha, version, **probe()} written to stored_path. A stored record of another checkpoint stops the
    probe: here the run was trained again (training does not reproduce across CPUs), and probing the
    retrained file would replace the record of the one the results were read from."""
    sha = file_sha256(checkpoint)
    if os.path.isfile(stored_path):
        stored = read_json(stored_path)
        if stored.get("checkpoint_sha256") != sha:
            raise SystemExit(f"{stored_path}: probes another checkpoint than {checkpoint} (sha256 "
                             f"{stored.get('checkpoint_sha256', '?')[:12]} vs {sha[:12]}; trained again on this "
                             "machine?). Use --report-only, or move the record aside to probe this checkpoint.")
        if stored.get("probe_version") == version:
            return stored
    record = {"checkpoint_sha256": sha, "probe_version": version, **probe()}
    write_json(stored_path, record)
    return record


def model_stats(model, cfg, context, answers=None, teacher_answers=None):
    """(1) and (2)-(3) for one model; `answers`: its last_stage_answers when already computed."""
    answers = answers if answers is not None else last_stage_answers(model, context["batches"])
    return {"gt_queries": gt_query_stats(answers, context["batches"], teacher_answers),
            **detection_stats(model, context["dataset"], cfg.data.img_size, cfg.export.topk)}


def record_path(cli, name):
    return os.path.join(cli.runs_dir, f"{name}.json")


def split_root(cli):
    """Data root of the split probed: the A/B's training scenes (their "val" part is the tuning split) or the
    follow-up's fresh test scenes (all "val" but one)."""
    args = argparse.Namespace(out=cli.out, train_images=800, tuning_images=200, test_images=400)  # the A/B's sizes
    return ab.data_roots(args)[0] if cli.split == "tuning" else confirm.fresh_root(args)


def collect(cli):
    """{row: {seed: record}} and the teacher's record, probing what is not stored yet."""
    from clock_deploy.data.dataset import build_dataset
    from clock_deploy.checkpoint import load_model
    teacher, cfg, _ = load_model(TEACHER)
    dataset = build_dataset(dataclasses.replace(cfg.data, root=split_root(cli)), "val", train=False)
    logit_cfg = load_config(os.path.join(ab.DEMO, "distill.yaml")).distill.logit  # the A/B's TCLD queries
    fgd_cfg = load_config(os.path.join(ab.DEMO, "distill_fgd.yaml")).distill.fgd   # the A/B's FGD
    context = {"dataset": dataset, "batches": query_batches(dataset, teacher.num_classes, logit_cfg.box_noise)}
    teacher_answers = last_stage_answers(teacher, context["batches"])  # what every student is compared with
    teacher_record = reused_or_probed(TEACHER, record_path(cli, "teacher-s1"), lambda: {
        **model_stats(teacher, cfg, context, answers=teacher_answers),
        "tcld_weights": tcld_weight_split(teacher, dataset, logit_cfg),
        "lcmd_class_weights": class_weight_shares(teacher, dataset),
        "fgd_class_weights": class_weight_shares(teacher, dataset, fgd_cfg.temperature)}, TEACHER_PROBE_VERSION)
    rows = {}
    for row in ROWS:
        rows[row] = {}
        for seed in range(cli.seeds):
            checkpoint = os.path.join(ab.run_dir_of(cli.out, "dino", row, seed), "last.pt")
            if not os.path.isfile(checkpoint):
                raise SystemExit(f"{checkpoint}: missing; this probe reads the A/B's DINO checkpoints "
                                 f"(bench_distill.py part (b), bench_distill_confirm.py)")
            rows[row][seed] = reused_or_probed(checkpoint, record_path(cli, f"{row}-{seed}"), lambda: model_stats(
                *load_model(checkpoint)[:2], context, teacher_answers=teacher_answers))
            print(f"{row} seed {seed}: mAP {rows[row][seed]['metrics']['mAP']:.4f}", flush=True)
    return teacher_record, rows


def stored(cli):
    """What collect returns, read from the stored jsons only."""
    def read(name):
        path = record_path(cli, name)
        return read_json(path) if os.path.isfile(path) else None
    rows = {row: {s: r for s in range(cli.seeds) if (r := read(f"{row}-{s}")) is not None} for row in ROWS}
    return read("teacher-s1"), rows


# ---------------------------------------------------------------- report

def mean_of(records, get):
    return statistics.mean(get(r) for r in records.values())


def delta_cell(baseline, records, get, fmt):
    seeds = [s for s in records if s in baseline]
    if len(seeds) < 2:
        return "n/a"
    st = ab.paired_stats([get(records[s]) - get(baseline[s]) for s in seeds])
    return f"{st['mean']:{fmt}} [{st['ci'][0]:{fmt}}, {st['ci'][1]:{fmt}}]"


def recorded_map(row, seed, split):
    """The mAP a run file recorded for this checkpoint on the split (None if there is no such file)."""
    if split == "fresh":  # the follow-up scored every row on its fresh split
        path, get = os.path.join(confirm.RUNS, f"fresh-dino-{row}-{seed}.json"), lambda r: r["fresh"]["mAP"]
    else:  # the follow-up trained the baselines and KD-DETR, the A/B the rest
        runs_dir = confirm.RUNS if row in ("baseline", "kd_detr-t1") else ab.RUNS
        path, get = os.path.join(runs_dir, f"dino-{row}-{seed}.json"), lambda r: r["metrics"]["tuning"]["mAP"]
    return get(read_json(path)) if os.path.isfile(path) else None


def run_file_check(rows, split):
    """How far each checkpoint's mAP here is from the one its run file recorded: (count, max |diff|)."""
    diffs = [abs(recorded - record["metrics"]["mAP"]) for row, records in rows.items()
             for seed, record in records.items() if (recorded := recorded_map(row, seed, split)) is not None]
    return len(diffs), max(diffs, default=float("nan"))


def class_weight_text(shares, where):
    """One line: each class's share of the weight, of the foreground pixels and of the objects, and its
    weight per pixel relative to a Car pixel."""
    per_pixel = {name: c["weight_share"] / c["pixels_share"] for name, c in shares.items() if c["pixels_share"]}
    return (f"{where}: " + "; ".join(
        f"{name} {c['weight_share']:.1%} of the weight on {c['pixels_share']:.1%} of the foreground "
        f"pixels ({c['objects_share']:.1%} of the objects)" for name, c in shares.items())
        + ". Per pixel, relative to a Car pixel: " + ", ".join(
            f"{name} {w / per_pixel['Car']:.1f}x" for name, w in per_pixel.items() if name != "Car") + ".")


def report(cli, teacher, rows):
    baseline = rows["baseline"]
    split = SPLIT_NAMES[cli.split]
    checked, worst = run_file_check(rows, cli.split)
    also = f", and `{ab.RUNS}` for the rows the A/B trained" if cli.split == "tuning" else ""
    lines = [f"# What differs between the DINO students (diagnostic, {split})", "",
             "Written by benchmarks/probe_distill_dino.py. " + " ".join(__doc__.split("\n\n")[1].split()), "",
             *([] if cli.split == "tuning" else [
                 "**This file is the probe on the follow-up's fresh test split** (`--split fresh`, scenes of seed 2), "
                 "not on the tuning split: exploratory, run after that split's results were reported, to see whether "
                 "the tuning split's pattern holds on other scenes; nothing here chooses anything.", ""]),
             __doc__.split("\n\n")[2].replace("CAR_SCORE", str(CAR_SCORE)), "",
             f"Checkpoints: `{cli.out}/runs/dino-<row>-<seed>/last.pt` (rows under the second teacher, "
             f"`{TEACHER}`; baselines retrained by bench_distill_confirm.py), seeds 0-{cli.seeds - 1}. Deltas are "
             "paired (same seed's baseline), mean [95% CI]. Command: `python benchmarks/probe_distill_dino.py"
             f"{'' if cli.split == 'tuning' else ' --split fresh'}`; "
             f"{ab.machine()}.", "",
             f"Check: {checked} checkpoints' mAP on this split is within {worst:.1e} of the value their run files "
             f"recorded (`{confirm.RUNS}`{also}; those were scored at 1 thread).", "",
             "## (1) TCLD's own task: refining noisy GT queries (last decoder stage)", "",
             "| model | seeds | anchor IoU | IoU to GT | delta IoU vs baseline | IoU >= 0.7 | class accuracy "
             "| confidence | IoU to the teacher's box |", "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    if teacher:
        q = teacher["gt_queries"]
        lines.append(f"| teacher | | {q['anchor_iou']:.3f} | {q['iou']:.3f} | | {q['iou_above_0.7']:.3f} | "
                     f"{q['class_accuracy']:.3f} | {q['confidence']:.3f} | |")
    for row, records in rows.items():
        if not records:
            continue
        m = {k: mean_of(records, lambda r, k=k: r["gt_queries"][k])
             for k in ("anchor_iou", "iou", "iou_above_0.7", "class_accuracy", "confidence", "iou_to_teacher")}
        delta = "" if row == "baseline" else delta_cell(baseline, records, lambda r: r["gt_queries"]["iou"], "+.3f")
        lines.append(f"| {row} | {len(records)} | {m['anchor_iou']:.3f} | {m['iou']:.3f} | {delta} | "
                     f"{m['iou_above_0.7']:.3f} | {m['class_accuracy']:.3f} | {m['confidence']:.3f} | "
                     f"{m['iou_to_teacher']:.3f} |")
    if teacher and "tcld_weights" in teacher:
        w = teacher["tcld_weights"]
        lines += ["", f"TCLD's slot weights w_i at the teacher's last stage, for the A/B's queries ({w['query_set']}): "
                  f"the general queries hold {w['general_share']:.1%} of sum_i w_i, the normalizer of both TCLD terms; "
                  f"mean w {w['mean_w_gt']:.3f} on a GT slot, {w['mean_w_general']:.3f} on a general slot "
                  f"({w['gt_slots']} GT and {w['general_slots']} general slots over the split)."]
    for key, where in (("lcmd_class_weights", "LCMD's foreground weight by class (sum_p M_p S_p with each class's "
                                             "own boxes, on the teacher's memory grids, over the split)"),
                       ("fgd_class_weights", "FGD's foreground weight by class, for comparison (sum_p M_p S_p A_p, "
                                             "A the teacher's spatial attention, on its backbone feature maps)")):
        if teacher and key in teacher:
            lines += ["", class_weight_text(teacher[key], where)]
    lines += ["", "## (2) Each variant minus the baseline, per metric (COCO in [0, 1], KITTI in percent)", "",
              "| row | " + " | ".join(k.replace("kitti_", "KITTI ").replace("_moderate", " Mod") for k in METRICS)
              + " |", "|---" * (len(METRICS) + 1) + "|"]
    for row, records in rows.items():
        if row == "baseline" or not records:
            continue
        cells = [delta_cell(baseline, records, lambda r, k=k: r["metrics"][k], "+.3f" if "kitti" not in k else "+.2f")
                 for k in METRICS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "COCO AP per class (IoU 0.5, 0.7 and 0.5:0.95; all sizes), each variant minus the baseline:", "",
              "| row | " + " | ".join(f"{name} {metric}" for name, metric in PER_CLASS) + " |",
              "|---" * (len(PER_CLASS) + 1) + "|"]
    for row, records in rows.items():
        if row == "baseline" or not records:
            continue
        cells = [delta_cell(baseline, records, lambda r, n=name, m=metric: r["per_class"][n][m], "+.3f")
                 for name, metric in PER_CLASS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", f"## (3) Car detections scoring above {CAR_SCORE}, per bin (mean count over the split; "
              "delta vs baseline paired)", "",
              "| row | " + " | ".join(BINS) + " | delta duplicate | delta true_positive |",
              "|---" * (len(BINS) + 3) + "|"]
    for row, records in rows.items():
        if not records:
            continue
        means = " | ".join(f"{mean_of(records, lambda r, b=b: r['car_bins'][b]):.1f}" for b in BINS)
        deltas = ["", ""] if row == "baseline" else [
            delta_cell(baseline, records, lambda r, b=b: r["car_bins"][b], "+.1f")
            for b in ("duplicate", "true_positive")]
        lines.append(f"| {row} | {means} | " + " | ".join(deltas) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report-only", action="store_true", help="only rewrite the results file from the jsons")
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--out", default="bench_out/distill", help="the A/B's data and run folders (checkpoints)")
    parser.add_argument("--split", choices=list(RUNS), default="tuning", help="the scenes probed")
    parser.add_argument("--runs-dir", help="this probe's per-checkpoint jsons (commit these); default per split")
    parser.add_argument("--results", help="the results file; default per split")
    parser.add_argument("--threads", type=int, default=2)
    cli = parser.parse_args()
    cli.runs_dir, cli.results = cli.runs_dir or RUNS[cli.split], cli.results or RESULTS[cli.split]
    torch.set_num_threads(cli.threads)
    teacher, rows = stored(cli) if cli.report_only else collect(cli)
    write_text(cli.results, report(cli, teacher, rows))
    print(open(cli.results).read())


if __name__ == "__main__":
    sys.exit(main())
