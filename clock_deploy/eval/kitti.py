"""Official KITTI 2D detection AP (Easy / Moderate / Hard, R40 and R11).

Reproduces the bounding-box ("image") part of cpp/evaluate_object.cpp of the KITTI object devkit:
cleanData -> computeStatistics (once to collect true-positive scores, then once per recall threshold
with false positives) -> getThresholds -> max-interpolated precision. R40 averages the 40 precision
samples at recall 1/40 .. 1; R11 averages the samples at recall 0, 0.1 .. 1 (every 4th point of the
same 41-point curve, as the devkit's evaluation server and the common Python ports do).

Inputs are "annos" dicts (the format of clock_deploy.data.kitti.read_label): `name` [n] str,
`bbox` [n, 4] x1 y1 x2 y2 pixels, `truncated` [n], `occluded` [n] for ground truth and `score` [n]
for detections. The heavy loops run in numba over all images packed into flat arrays.

Devkit rules worth knowing (kept on purpose, they are what published KITTI numbers use):
- a ground truth box is "ignored" (neither TP nor FN) when its class is the neighbour class
  (Van for Car, Person_sitting for Pedestrian) or when it is too small (height <= MIN_HEIGHT),
  too occluded or too truncated for the difficulty; detections matched to it are not FPs either;
- any detection lower than MIN_HEIGHT is "ignored" whatever its class, so a small detection
  of another class can still absorb a ground truth box of the evaluated class;
- unmatched detections mostly inside a DontCare region (intersection / detection area > the
  class overlap) are not counted as false positives;
- a class with no ground truth gets AP 0 (the devkit divides by zero there).
"""
import numpy as np
from numba import njit  # cache=True: compiled once per install; numba falls back to a user cache dir when read-only

from clock_deploy.data import kitti as kitti_format
from clock_deploy.eval.units import ap_text

CLASS_MIN_OVERLAP = {"car": 0.7, "pedestrian": 0.5, "cyclist": 0.5}
NEIGHBOUR_CLASS = {"car": "van", "pedestrian": "person_sitting"}
# the difficulty table lives in data/kitti.py; results use lower-case names ("easy" ...)
DIFFICULTIES = tuple(name.lower() for name in kitti_format.DIFFICULTIES)
MIN_HEIGHT = tuple(min_height for min_height, _, _ in kitti_format.DIFFICULTIES.values())
N_SAMPLE_PTS = 41
NO_DETECTION = -10000.0  # the devkit's "no candidate yet" score


# ------------------------------------------------------------------ packing


class _Packed:
    """All frames' boxes in flat arrays; `image` says which frame each row belongs to."""

    def __init__(self, annos, with_score):
        counts = np.array([len(a["name"]) for a in annos], dtype=np.int64)
        self.num_images = len(annos)
        self.image = np.repeat(np.arange(len(annos)), counts)
        self.name = _concat([np.char.lower(np.asarray(a["name"], dtype=str)) for a in annos], str)
        self.bbox = _concat([np.asarray(a["bbox"], np.float64).reshape(-1, 4) for a in annos],
                            np.float64).reshape(-1, 4)
        if with_score:
            self.score = _concat([np.asarray(a["score"], np.float64) for a in annos], np.float64)
        else:
            self.truncated = _concat([np.asarray(a["truncated"], np.float64) for a in annos], np.float64)
            self.occluded = _concat([np.asarray(a["occluded"], np.float64) for a in annos], np.float64)

    def offsets(self, mask):
        """Start index of each frame's rows among the rows selected by `mask` (length num_images + 1)."""
        counts = np.bincount(self.image[mask], minlength=self.num_images)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _concat(arrays, dtype):
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype)


def _class_setup(gt, dt, cls, difficulty):
    """cleanData: boxes that take part in evaluating `cls` at `difficulty`, with their ignore flags."""
    # ground truth: evaluated class (valid unless too hard) or neighbour class (always ignored)
    is_cls = gt.name == cls
    is_neighbour = gt.name == NEIGHBOUR_CLASS.get(cls, "")
    height = gt.bbox[:, 3] - gt.bbox[:, 1]
    too_hard = ~kitti_format.counts_for_difficulty(height, gt.occluded, gt.truncated,
                                                   list(kitti_format.DIFFICULTIES)[difficulty])
    gt_mask = is_cls | is_neighbour
    gt_ignored = np.where(is_cls & ~too_hard, 0, 1)[gt_mask].astype(np.int64)

    dc_mask = gt.name == "dontcare"

    # detections: the devkit truncates the height to an integer, and marks every detection lower
    # than MIN_HEIGHT as ignored before it looks at the class
    dt_height = np.trunc(np.abs(dt.bbox[:, 1] - dt.bbox[:, 3]))
    small = dt_height < MIN_HEIGHT[difficulty]
    dt_mask = small | (dt.name == cls)
    dt_ignored = small[dt_mask].astype(np.int64)

    return dict(
        gt_boxes=gt.bbox[gt_mask], gt_ignored=gt_ignored, gt_offsets=gt.offsets(gt_mask),
        dt_boxes=dt.bbox[dt_mask], dt_scores=dt.score[dt_mask], dt_ignored=dt_ignored,
        dt_offsets=dt.offsets(dt_mask),
        dc_boxes=gt.bbox[dc_mask], dc_offsets=gt.offsets(dc_mask),
        num_gt=int(np.count_nonzero(gt_ignored == 0)),
    )


# ------------------------------------------------------------------ numba kernels


@njit(cache=True)
def _box_overlap(det, box, det_area_only):
    """imageBoxOverlap: IoU, or intersection / detection area for DontCare regions."""
    w = min(det[2], box[2]) - max(det[0], box[0])
    h = min(det[3], box[3]) - max(det[1], box[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    det_area = (det[2] - det[0]) * (det[3] - det[1])
    if det_area_only:
        return inter / det_area
    box_area = (box[2] - box[0]) * (box[3] - box[1])
    return inter / (det_area + box_area - inter)


@njit(cache=True)
def _overlaps(dt_boxes, boxes, det_area_only):
    out = np.empty((boxes.shape[0], dt_boxes.shape[0]))
    for i in range(boxes.shape[0]):
        for j in range(dt_boxes.shape[0]):
            out[i, j] = _box_overlap(dt_boxes[j], boxes[i], det_area_only)
    return out


@njit(cache=True)
def _true_positive_scores(gt_boxes, gt_ignored, gt_offsets, dt_boxes, dt_scores, dt_ignored,
                          dt_offsets, min_overlap):
    """computeStatistics without FPs: each GT takes the highest-scoring free overlapping detection."""
    scores = np.empty(gt_boxes.shape[0])
    n = 0
    for img in range(gt_offsets.shape[0] - 1):
        g0, g1 = gt_offsets[img], gt_offsets[img + 1]
        d0, d1 = dt_offsets[img], dt_offsets[img + 1]
        iou = _overlaps(dt_boxes[d0:d1], gt_boxes[g0:g1], False)
        assigned = np.zeros(d1 - d0, np.bool_)
        for g in range(g1 - g0):
            det_idx = -1
            best = NO_DETECTION
            for j in range(d1 - d0):
                if not assigned[j] and iou[g, j] > min_overlap and dt_scores[d0 + j] > best:
                    det_idx = j
                    best = dt_scores[d0 + j]
            if best == NO_DETECTION:
                continue  # a false negative when the GT is valid; only TPs matter here
            assigned[det_idx] = True
            if gt_ignored[g0 + g] == 0 and dt_ignored[d0 + det_idx] == 0:
                scores[n] = best
                n += 1
    return scores[:n]


@njit(cache=True)
def _get_thresholds(scores, num_gt):
    """getThresholds: the TP scores closest to recall 0, 1/40, 2/40, ... (scores sorted descending)."""
    out = np.empty(scores.shape[0])
    n = 0
    current_recall = 0.0
    last = scores.shape[0] - 1
    for i in range(scores.shape[0]):
        l_recall = (i + 1) / num_gt
        r_recall = (i + 2) / num_gt if i < last else l_recall
        if (r_recall - current_recall) < (current_recall - l_recall) and i < last:
            continue
        out[n] = scores[i]
        n += 1
        current_recall += 1.0 / (N_SAMPLE_PTS - 1.0)
    return out[:n]


@njit(cache=True)
def _pr_counts(gt_boxes, gt_ignored, gt_offsets, dt_boxes, dt_scores, dt_ignored, dt_offsets,
               dc_boxes, dc_offsets, thresholds, min_overlap):
    """computeStatistics with FPs at every threshold, summed over images: tp, fp [T].

    (The devkit also counts false negatives there; AP does not use them.)"""
    num_t = thresholds.shape[0]
    tp = np.zeros(num_t, np.int64)
    fp = np.zeros(num_t, np.int64)
    for img in range(gt_offsets.shape[0] - 1):
        g0, g1 = gt_offsets[img], gt_offsets[img + 1]
        d0, d1 = dt_offsets[img], dt_offsets[img + 1]
        c0, c1 = dc_offsets[img], dc_offsets[img + 1]
        num_det = d1 - d0
        iou = _overlaps(dt_boxes[d0:d1], gt_boxes[g0:g1], False)
        dc_overlap = _overlaps(dt_boxes[d0:d1], dc_boxes[c0:c1], True)
        ign_det = dt_ignored[d0:d1]
        score = dt_scores[d0:d1]
        assigned = np.zeros(num_det, np.bool_)
        for t in range(num_t):
            thresh = thresholds[t]
            assigned[:] = False
            for g in range(g1 - g0):
                # prefer the valid detection with the largest overlap; fall back to the first
                # overlapping ignored (too small) one
                det_idx = -1
                found = False
                max_overlap = 0.0
                took_ignored = False
                for j in range(num_det):
                    if assigned[j] or score[j] < thresh:
                        continue
                    o = iou[g, j]
                    if o > min_overlap and (o > max_overlap or took_ignored) and ign_det[j] == 0:
                        max_overlap = o
                        det_idx = j
                        found = True
                        took_ignored = False
                    elif o > min_overlap and not found and ign_det[j] == 1:
                        det_idx = j
                        found = True
                        took_ignored = True
                if not found:
                    continue
                assigned[det_idx] = True
                if gt_ignored[g0 + g] == 0 and ign_det[det_idx] == 0:
                    tp[t] += 1
            # unassigned valid detections are FPs unless they fall in a DontCare region
            for j in range(num_det):
                if assigned[j] or ign_det[j] == 1 or score[j] < thresh:
                    continue
                in_dontcare = False
                for c in range(c1 - c0):
                    if dc_overlap[c, j] > min_overlap:
                        in_dontcare = True
                        break
                if not in_dontcare:
                    fp[t] += 1
    return tp, fp


# ------------------------------------------------------------------ public API


def _class_precision(gt, dt, cls, difficulty):
    """Interpolated precision at the 41 recall samples, and the number of valid GT boxes."""
    setup = _class_setup(gt, dt, cls, difficulty)
    min_overlap = CLASS_MIN_OVERLAP[cls]
    boxes = (setup["gt_boxes"], setup["gt_ignored"], setup["gt_offsets"],
             setup["dt_boxes"], setup["dt_scores"], setup["dt_ignored"], setup["dt_offsets"])
    scores = _true_positive_scores(*boxes, min_overlap)
    precision = np.zeros(N_SAMPLE_PTS)
    # no valid GT means no TP scores, no thresholds and AP 0
    thresholds = _get_thresholds(np.sort(scores)[::-1].copy(), float(setup["num_gt"]))
    tp, fp = _pr_counts(*boxes, setup["dc_boxes"], setup["dc_offsets"], thresholds, min_overlap)
    denom = tp + fp
    precision[:len(thresholds)] = np.where(denom > 0, tp / np.maximum(denom, 1), 0.0)
    # precision[i] = max(precision[i:])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    return precision, setup["num_gt"]


def ap_r40(precision):
    return float(precision[1:].sum() / (N_SAMPLE_PTS - 1) * 100.0)


def ap_r11(precision):
    return float(precision[::4].sum() / 11.0 * 100.0)


def kitti_eval(gt_annos, dt_annos, classes=("Car", "Pedestrian", "Cyclist")):
    """KITTI 2D AP in percent.

    Returns {cls: {"R40": {"easy", "moderate", "hard"}, "R11": {...}, "num_gt": {...}}} for each
    class plus "mAP_<difficulty>_<R40|R11>": the mean over classes that have valid ground truth at
    that difficulty (nan when none has).
    """
    if len(gt_annos) != len(dt_annos):
        raise ValueError(f"{len(gt_annos)} ground-truth frames but {len(dt_annos)} detection frames")
    unknown = [c for c in classes if c.lower() not in CLASS_MIN_OVERLAP]
    if unknown:
        raise ValueError(f"KITTI AP is defined for Car, Pedestrian, Cyclist only, not {unknown}")
    gt = _Packed(gt_annos, with_score=False)
    dt = _Packed(dt_annos, with_score=True)
    results = {}
    for cls in classes:
        entry = {"R40": {}, "R11": {}, "num_gt": {}}
        for d, difficulty in enumerate(DIFFICULTIES):
            precision, num_gt = _class_precision(gt, dt, cls.lower(), d)
            entry["R40"][difficulty] = ap_r40(precision)
            entry["R11"][difficulty] = ap_r11(precision)
            entry["num_gt"][difficulty] = num_gt
        results[cls] = entry
    for metric in ("R40", "R11"):
        for difficulty in DIFFICULTIES:
            aps = [results[c][metric][difficulty] for c in classes if results[c]["num_gt"][difficulty] > 0]
            results[f"mAP_{difficulty}_{metric}"] = float(np.mean(aps)) if aps else float("nan")
    return results


def format_kitti(results):
    """The results of kitti_eval as a fixed-width text table (AP in percent, one decimal)."""
    classes = [k for k, v in results.items() if isinstance(v, dict)]
    lines = [f"{'class':<12}{'metric':<8}{'easy':>9}{'moderate':>10}{'hard':>9}{'#gt (mod)':>11}"]
    for metric in ("R40", "R11"):
        for cls in classes:
            ap = results[cls][metric]
            lines.append(f"{cls:<12}{metric:<8}{ap_text(cls, ap['easy']):>9}{ap_text(cls, ap['moderate']):>10}"
                         f"{ap_text(cls, ap['hard']):>9}{results[cls]['num_gt']['moderate']:>11d}")
        lines.append(f"{'mAP':<12}{metric:<8}" + "".join(
            f"{ap_text('kitti', results[f'mAP_{d}_{metric}']):>{w}}" for d, w in zip(DIFFICULTIES, (9, 10, 9))))
    return "\n".join(lines)
