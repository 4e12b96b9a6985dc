"""Time the evaluators on a KITTI-val-sized synthetic set (3769 frames x 100 detections).

KITTI AP (numba: first call = compile + run, second call = run) and COCO mAP with faster-coco-eval
and with pycocotools on the same data, in the same run. Only label dicts are generated, no images.

    python benchmarks/bench_eval.py [--frames 3769] [--dets 100] [--out benchmarks/results/eval.md]
"""
import argparse
import contextlib
import io
import os
import platform
import time

import numpy as np

from clock_deploy.data.coco import detections_to_coco, kitti_to_coco
from clock_deploy.eval.coco import METRIC_NAMES, coco_map
from clock_deploy.eval.kitti import kitti_eval
from clock_deploy.io import write_text

CLASSES = ["Car", "Pedestrian", "Cyclist"]
# roughly KITTI's label mix
GT_NAMES = ["Car"] * 14 + ["Pedestrian"] * 3 + ["Cyclist", "Van", "Van", "Truck", "DontCare", "DontCare",
                                                 "Person_sitting"]
DET_LABEL = {"Van": "Car", "Truck": "Car", "Person_sitting": "Pedestrian", "DontCare": "Car"}
H, W = 375, 1242


def synthetic_frame(rng, num_dets):
    """Ground truth of one frame and `num_dets` detections: jittered copies of the GT first (higher
    scores), then boxes near the GT and random clutter."""
    n = rng.integers(1, 13)
    height = rng.uniform(15, 200, n)
    width = height * rng.uniform(0.4, 2.5, n)
    x1 = rng.uniform(0, W - width)
    y1 = rng.uniform(100, H - height).clip(0)
    gt_boxes = np.stack([x1, y1, x1 + width, y1 + height], 1)
    gt_names = np.array([GT_NAMES[i] for i in rng.integers(0, len(GT_NAMES), n)])
    gt = {"name": gt_names, "bbox": gt_boxes, "truncated": rng.choice([0.0, 0.0, 0.0, 0.2, 0.4, 0.7], n),
          "occluded": rng.choice([0, 0, 1, 2, 3], n)}

    hits = rng.integers(0, n, min(num_dets, 2 * n))
    near = rng.integers(0, n, num_dets - len(hits))
    size = np.concatenate([width[near], height[near]])
    boxes = np.concatenate([
        gt_boxes[hits] + rng.normal(0, 0.05, (len(hits), 4)) * np.repeat(height[hits, None], 4, 1),
        gt_boxes[near] + rng.normal(0, 0.5, (len(near), 4)) * np.tile(size.reshape(2, -1).T, 2),
    ])
    boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:] - 1), boxes[:, 2:]], 1)
    names = np.array([DET_LABEL.get(g, g) for g in gt_names[np.concatenate([hits, near])]])
    relabel = rng.uniform(size=num_dets) < 0.2
    names[relabel] = np.array(CLASSES)[rng.integers(0, 3, relabel.sum())]
    scores = np.concatenate([rng.uniform(0.3, 1.0, len(hits)), rng.uniform(0.0, 0.6, len(near))])
    return gt, {"name": names, "bbox": boxes, "score": scores}


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def pycocotools_map(coco_gt, results):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = coco_gt
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes([dict(r) for r in results]), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(METRIC_NAMES, evaluator.stats[:6]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=3769)
    parser.add_argument("--dets", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "eval.md"))
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    gts, dts = zip(*[synthetic_frame(rng, args.dets) for _ in range(args.frames)])

    _, t_first = timed(kitti_eval, gts, dts, CLASSES)
    kitti_warm, t_warm = timed(kitti_eval, gts, dts, CLASSES)

    frames = [(f"{i:06d}", H, W, g) for i, g in enumerate(gts)]
    (coco_gt, results), t_convert = timed(
        lambda: (kitti_to_coco(frames, CLASSES), detections_to_coco(range(1, len(dts) + 1), dts, CLASSES)))
    faster, t_faster = timed(coco_map, coco_gt, results)
    reference, t_pycoco = timed(pycocotools_map, coco_gt, results)
    max_diff = max(abs(faster[k] - reference[k]) for k in METRIC_NAMES)

    rows = [
        ("KITTI AP, 3 classes x 3 difficulties x R40+R11: first call (numba compile + run)", t_first),
        ("KITTI AP: warm call", t_warm),
        ("numba compile (first - warm)", t_first - t_warm),
        ("KITTI -> COCO conversion (gt + results lists)", t_convert),
        ("COCO mAP, faster-coco-eval", t_faster),
        ("COCO mAP, pycocotools", t_pycoco),
    ]
    num_gt = sum(len(g["name"]) for g in gts)
    lines = [
        "# Evaluation speed",
        "",
        f"Synthetic KITTI-val-sized set: {args.frames} frames, {num_gt} GT boxes, {args.dets} detections per "
        f"frame ({args.frames * args.dets} in all), seed {args.seed}. Command: `python benchmarks/bench_eval.py`.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; 1-minute load average at the end: {os.getloadavg()[0]:.1f} "
        "(the machine is shared with other jobs, so timings vary from run to run).",
        "",
        "| step | seconds |",
        "|---|---:|",
        *[f"| {name} | {seconds:.2f} |" for name, seconds in rows],
        "",
        f"pycocotools / faster-coco-eval time ratio: **{t_pycoco / t_faster:.1f}x**; "
        f"largest difference between their six COCO metrics: {max_diff:.1e}.",
        "",
        "Results on this synthetic data (sanity only, not a model's accuracy):",
        "",
        "KITTI moderate R40: " + ", ".join(f"{c} {kitti_warm[c]['R40']['moderate']:.2f}" for c in CLASSES)
        + f"; COCO AP {faster['AP']:.4f}, AP50 {faster['AP50']:.4f}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    write_text(args.out, text)


if __name__ == "__main__":
    main()
