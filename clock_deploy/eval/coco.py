"""COCO box mAP with faster-coco-eval (same numbers as pycocotools, C++ matching)."""
import copy

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _quiet(*args, **kwargs):
    pass


def _accumulated(coco_gt, results, log):
    """The COCO bbox evaluation of `results` against `coco_gt`, evaluated and accumulated."""
    # the COCO api adds keys to the dicts it is given: work on copies
    gt = COCO(copy.deepcopy(coco_gt), print_function=log)
    dt = gt.loadRes([dict(r) for r in results])
    evaluator = COCOeval_faster(gt, dt, iouType="bbox", print_function=log)
    evaluator.evaluate()
    evaluator.accumulate()
    return evaluator


def coco_map(coco_gt, results, verbose=False):
    """COCO bbox metrics of `results` (a COCO results list) against the ground-truth dict `coco_gt`.

    Returns {"AP", "AP50", "AP75", "APs", "APm", "APl"} in [0, 1]; a metric that COCO leaves
    undefined (no ground truth in that area range) is nan. Prints the COCO summary only if `verbose`.
    """
    log = print if verbose else _quiet
    evaluator = _accumulated(coco_gt, results, log)
    evaluator.summarize()
    stats = np.asarray(evaluator.stats[:len(METRIC_NAMES)], dtype=np.float64)
    return {name: float(v) if v >= 0 else float("nan") for name, v in zip(METRIC_NAMES, stats)}


def coco_per_class(coco_gt, results):
    """{category name: {"AP", "AP50", "AP70"}}: COCO AP per category (all areas, 100 detections), nan for
    a category without ground truth."""
    evaluator = _accumulated(coco_gt, results, _quiet)
    precision = np.asarray(evaluator.eval["precision"])  # [IoU 0.50:0.05:0.95, recall, class, area, max dets]
    names = {c["id"]: c["name"] for c in coco_gt["categories"]}

    def mean(x):  # -1 marks a cell without ground truth
        return float(x[x > -1].mean()) if (x > -1).any() else float("nan")
    out = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        curve = precision[:, :, k, 0, -1]
        out[names[cat_id]] = {"AP": mean(curve), "AP50": mean(curve[0]), "AP70": mean(curve[4])}
    return out
