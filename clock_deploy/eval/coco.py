"""COCO box mAP with faster-coco-eval (same numbers as pycocotools, C++ matching)."""
import copy

import numpy as np

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _quiet(*args, **kwargs):
    pass


def coco_map(coco_gt, results, verbose=False):
    """COCO bbox metrics of `results` (a COCO results list) against the ground-truth dict `coco_gt`.

    Returns {"AP", "AP50", "AP75", "APs", "APm", "APl"} in [0, 1]; a metric that COCO leaves
    undefined (no ground truth in that area range) is nan. Prints the COCO summary only if `verbose`.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    log = print if verbose else _quiet
    # the COCO api adds keys to the dicts it is given: work on copies
    gt = COCO(copy.deepcopy(coco_gt), print_function=log)
    dt = gt.loadRes([dict(r) for r in results])
    evaluator = COCOeval_faster(gt, dt, iouType="bbox", print_function=log)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    stats = np.asarray(evaluator.stats[:len(METRIC_NAMES)], dtype=np.float64)
    return {name: float(v) if v >= 0 else float("nan") for name, v in zip(METRIC_NAMES, stats)}
