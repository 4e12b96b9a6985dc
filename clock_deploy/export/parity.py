"""Does an exported model detect what the PyTorch model detects?

The contract outputs are top-k lists: two runs that differ only by rounding may swap
entries whose scores are nearly tied, or let a different entry in at rank k, so they
cannot be compared position by position. Instead both sides also give the raw tensors
the post-processing starts from, and the comparison is by index:

- `scores`: max abs difference of the sigmoid scores of ALL (query, class) pairs, i.e.
  the input of the graph's TopK (no ranking involved);
- `boxes`: max abs difference of ALL predicted boxes (the input of the graph's box
  GatherElements, normalized cx, cy, w, h), in pixels of the network input;
- `queries_changed`: queries whose raw scores or box moved by more than the tolerance;
- `topk_*`: the contract outputs of the two sides matched by their (query, class) index
  (the TopK indices): score and pixel-box differences on the pairs both top-k lists
  hold, label mismatches among them, and `topk_unmatched`, the entries one side keeps
  and the other drops although their margin over the k-th score of their own list is
  more than twice the largest raw score change (a genuine near-tie at rank k is allowed).

On the ONNX side the raw tensors are found by walking back from the `scores` output to
its TopK and from the `boxes` output to its GatherElements; casts to float32 / int64
expose them as extra outputs of an in-memory copy (the file is unchanged).

Verdicts: a gate is a list of criteria, each a value against a limit on a stated number of
images; a failure names the first criterion that is not met, its value, its limit and the images.
- FP32 must match to `parity_tol` (1e-4 by default) on scores and to `parity_tol * max(H, W)`
  pixels on boxes (the same relative error on the normalized boxes), everywhere, with no
  unmatched top-k entry and no label mismatch.
- FP16 is judged on detections, not query slots: DINO picks its queries with a top-k over
  the encoder's proposals, so a float16 rounding that swaps two near-tied proposals moves a
  detection to another slot (slot-by-slot numbers moved for up to half the queries of a
  correct conversion). The detections scoring >= MATCH_SCORE on each side are matched
  greedily, highest IoU first, to a detection of the same class on the other side with IoU
  >= MATCH_IOU (the other side's score may sit FP16_TOLERANCE below the threshold; a detection
  within twice that of its list's k-th score is not counted, as it may fall out of the other
  top-k by a near-tie).
  FP16 passes when at least FP16_MIN_MATCHED of the detections of each side are matched and the
  BOX_PERCENTILE-th percentile of the matched boxes' error, relative to the box's size (largest
  coordinate difference / longer side), is at most FP16_BOX_REL: one max in pixels punished a
  large box for an error that is small for its size. With validation data the mAP may also
  drop by at most MAX_MAP_DROP.
- INT8 is judged by the mAP difference alone (at most MAX_MAP_DROP lower): its slot-by-slot
  and detection numbers are expected to move.
The mAP criterion is judged on the whole validation split by default and only on at least
MIN_MAP_IMAGES images: on fewer, a 0.5-point difference is mostly sampling noise, so the
difference is reported without a verdict (INT8 then has none, and the line says so).
"""
import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from clock_deploy.artifact import INPUT_NAME, OUTPUT_NAMES
from clock_deploy.errors import UserError

FP16_TOLERANCE = 1e-2
MATCH_SCORE = 0.3       # detections compared: the runtime's default score threshold
MATCH_IOU = 0.5
FP16_MIN_MATCHED = 0.9  # fraction of each side's detections that must find a partner
FP16_BOX_REL = 0.05     # matched boxes: coordinate error / box size at BOX_PERCENTILE
BOX_PERCENTILE = 95
MAX_MAP_DROP = 0.005    # 0.5 mAP points (metrics are fractions): FP16 and INT8
# fewer validation images: the mAP difference is reported, not judged. On 50-60 images, INT8 variants of
# one trained model that differ by a few float nodes moved by -0.44..+0.51 points (results/int8_sensitivity.md):
# the 0.5-point limit is within the noise there
MIN_MAP_IMAGES = 100
TAPS = ("parity_scores", "parity_index", "parity_boxes")


class ParityError(UserError):
    """An exported model disagrees with PyTorch beyond tolerance."""


# ---------------------------------------------------------------- raw outputs of both sides

def _producers(graph):
    return {out: node for node in graph.node for out in node.output}


def _find_upstream(graph, output, op_type, through=None):
    """First node of `op_type` upstream of graph tensor `output` (breadth first).

    through: op types the walk may pass (None = any).
    """
    producers = _producers(graph)
    queue, seen = [output], set()
    while queue:
        node = producers.get(queue.pop(0))
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == op_type:
            return node
        if through is None or node.op_type in through:
            queue.extend(node.input)
    return None


def with_parity_outputs(model):
    """Copy of ONNX `model` with the raw scores / TopK indices / raw boxes as extra float32 / int64 outputs."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    topk = _find_upstream(graph, OUTPUT_NAMES[0], "TopK", through={"Cast", "Identity"})
    gather = _find_upstream(graph, OUTPUT_NAMES[2], "GatherElements")
    if topk is None or gather is None:
        raise UserError("the graph does not end in the contract post-processing (TopK over the scores, "
                        "GatherElements of the boxes)")
    sources = (topk.input[0], topk.output[1], gather.input[0])
    types = (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.FLOAT)
    for name, source, dtype in zip(TAPS, sources, types):
        graph.node.append(helper.make_node("Cast", [source], [name], to=dtype, name=f"{name}_cast"))
        graph.output.append(helper.make_tensor_value_info(name, dtype, None))
    return model


def run_onnx(model, images):
    """Contract + raw outputs of an ONNX model (path or ModelProto) on onnxruntime CPU, as a dict."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # constant-folding notes about fp16 kernels are not actionable here
    session = ort.InferenceSession(with_parity_outputs(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    names = list(OUTPUT_NAMES) + list(TAPS)
    return dict(zip(names, session.run(names, {INPUT_NAME: np.ascontiguousarray(images)})))


def run_torch(wrapper, images):
    """The same dict from a PyTorch ExportWrapper (raw scores / indices follow PostProcess's convention)."""
    with torch.no_grad():
        out = wrapper.model(torch.from_numpy(np.ascontiguousarray(images)))
        scores, labels, boxes = wrapper.postprocess(out.pred_logits, out.pred_boxes, wrapper.image_hw)
        probs = out.pred_logits.sigmoid().flatten(1)
        index = torch.topk(probs, scores.shape[1], dim=1).indices
    tensors = (scores, labels, boxes, probs, index, out.pred_boxes)
    return {name: t.numpy() for name, t in zip(list(OUTPUT_NAMES) + list(TAPS), tensors)}


# ---------------------------------------------------------------- comparison

def compare(ref, out, height, width, score_tol=0.0, box_tol=0.0):
    """Differences between two output dicts (run_torch / run_onnx); see the module docstring.

    A query is `changed` when its raw scores moved by more than `score_tol` or its raw box
    by more than `box_tol` pixels.
    """
    num_images, num_queries = ref["parity_boxes"].shape[:2]
    pixels = np.array([width, height, width, height], dtype=np.float64)
    score_err = np.abs(ref["parity_scores"].astype(np.float64) - out["parity_scores"])
    score_err = score_err.reshape(num_images, num_queries, -1).max(-1)
    box_err = (np.abs(ref["parity_boxes"].astype(np.float64) - out["parity_boxes"]) * pixels).max(-1)
    changed = (score_err > score_tol) | (box_err > box_tol)
    # an entry may leave the top-k only if its margin over the k-th score is within what scores moved
    window = 2 * max(score_tol, score_err.max(initial=0.0))
    topk_scores = topk_boxes = 0.0
    unmatched = label_mismatch = common_total = 0
    for i in range(num_images):
        common, pos_ref, pos_out = np.intersect1d(ref["parity_index"][i], out["parity_index"][i],
                                                  return_indices=True)
        common_total += len(common)
        s_ref = ref["scores"][i].astype(np.float64)
        s_out = out["scores"][i].astype(np.float64)
        if len(common):
            topk_scores = max(topk_scores, np.abs(s_ref[pos_ref] - s_out[pos_out]).max())
            topk_boxes = max(topk_boxes, np.abs(ref["boxes"][i][pos_ref].astype(np.float64)
                                                - out["boxes"][i][pos_out]).max())
            label_mismatch += int((ref["labels"][i][pos_ref] != out["labels"][i][pos_out]).sum())
        for scores, kept in ((s_ref, pos_ref), (s_out, pos_out)):
            dropped = np.setdiff1d(np.arange(len(scores)), kept)
            if len(dropped):
                unmatched += int((scores[dropped] > scores.min() + window).sum())
    return {"scores_max_abs": float(score_err.max(initial=0.0)), "boxes_max_abs": float(box_err.max(initial=0.0)),
            "queries": int(changed.size), "queries_changed": int(changed.sum()),
            "topk_scores_max_abs": float(topk_scores), "topk_boxes_max_abs": float(topk_boxes),
            "topk_common": common_total, "topk_unmatched": unmatched, "label_mismatch": label_mismatch}


def _iou_matrix(a, b):
    """IoU of every x1y1x2y2 box of `a` [n, 4] with every box of `b` [m, 4]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    def area(x):
        return np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)

    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def _match_one_way(a, b, i, score_threshold, score_tol, iou_threshold):
    """Image i's detections of `a` (score >= threshold) matched to those of `b` of the same class,
    greedily by IoU, highest first (identical boxes pair up even among near-tied duplicates)."""
    scores = a["scores"][i]
    # a detection near-tied with the k-th (last) score may be missing from the other top-k legitimately
    keep_a = np.flatnonzero((scores >= score_threshold) & (scores > scores.min() + 2 * score_tol))
    keep_b = np.flatnonzero(b["scores"][i] >= score_threshold - score_tol)
    boxes_a, boxes_b = a["boxes"][i][keep_a].astype(np.float64), b["boxes"][i][keep_b].astype(np.float64)
    iou = _iou_matrix(boxes_a, boxes_b)
    iou[a["labels"][i][keep_a][:, None] != b["labels"][i][keep_b][None, :]] = 0.0
    used_a, used_b = set(), set()
    box_err, score_err, relative = 0.0, 0.0, []
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        j, k = divmod(int(flat), iou.shape[1])
        if iou[j, k] < iou_threshold:
            break
        if j in used_a or k in used_b:
            continue
        used_a.add(j)
        used_b.add(k)
        error = float(np.abs(boxes_a[j] - boxes_b[k]).max())
        size = max(float(boxes_a[j][2] - boxes_a[j][0]), float(boxes_a[j][3] - boxes_a[j][1]), 1.0)
        box_err, relative = max(box_err, error), relative + [error / size]
        score_err = max(score_err, abs(float(a["scores"][i][keep_a[j]]) - float(b["scores"][i][keep_b[k]])))
    return len(keep_a), len(used_a), box_err, score_err, relative


def match_detections(ref, out, score_threshold=MATCH_SCORE, score_tol=FP16_TOLERANCE, iou_threshold=MATCH_IOU):
    """Detections of two output dicts matched by class and IoU, both ways (module docstring)."""
    totals = {"ref": [0, 0], "out": [0, 0]}
    box_err = score_err = 0.0
    relative = []  # each matched pair's box error / box size, from both directions
    for i in range(len(ref["scores"])):
        for side, (a, b) in (("ref", (ref, out)), ("out", (out, ref))):
            count, matched, boxes, scores, rel = _match_one_way(a, b, i, score_threshold, score_tol, iou_threshold)
            totals[side][0] += count
            totals[side][1] += matched
            box_err, score_err, relative = max(box_err, boxes), max(score_err, scores), relative + rel
    fractions = [matched / count if count else 1.0 for count, matched in totals.values()]
    return {"det_score_threshold": score_threshold, "det_ref": totals["ref"][0], "det_out": totals["out"][0],
            "det_matched_fraction": float(min(fractions)),
            "det_unmatched": (totals["ref"][0] - totals["ref"][1]) + (totals["out"][0] - totals["out"][1]),
            "det_box_max_abs": box_err, "det_score_max_abs": score_err,
            "det_box_rel": float(np.percentile(relative, BOX_PERCENTILE)) if relative else 0.0}


# ---------------------------------------------------------------- gates

def criterion(name, value, limit, images, source, at_most=True, unit=""):
    """One gate criterion: `value` must be <= `limit` (at_most) or >= it, measured on `images` images."""
    passed = value <= limit if at_most else value >= limit
    return {"name": name, "value": float(value), "limit": float(limit), "at_most": at_most, "unit": unit,
            "images": int(images), "source": source, "passed": bool(passed)}


def criterion_text(c):
    """'mAP drop 0.8 points (limit <= 0.5 points, 200 validation images)'."""
    return (f"{c['name']} {c['value']:.3g}{c['unit']} (limit {'<=' if c['at_most'] else '>='} "
            f"{c['limit']:.3g}{c['unit']}, {c['images']} {c['source']} images)")


def _set_verdict(report):
    """passed / gate / failed of a report from its criteria (the first unmet criterion decides)."""
    criteria = report["criteria"]
    failed = next((c for c in criteria if not c["passed"]), None)
    report["passed"] = failed is None
    report["gate"] = ", ".join(f"{c['name']} {'<=' if c['at_most'] else '>='} {c['limit']:.3g}{c['unit']}"
                               for c in criteria)
    report["failed"] = criterion_text(failed) if failed else None
    return report


def parity_report(ref, out, precision, height, width, parity_tol=1e-4, source="random"):
    """Compare reference (PyTorch) and exported outputs; see the module docstring for the verdicts.

    The criteria of FP32 and FP16 are set here; judge_map adds the mAP criterion (INT8's only one)
    once the mAP difference is known (`passed` stays absent for INT8 when it never is).
    """
    tol = parity_tol if precision == "fp32" else FP16_TOLERANCE
    box_tol = tol * max(height, width)
    diff = compare(ref, out, height, width, score_tol=tol, box_tol=box_tol)
    images = int(len(ref["scores"]))
    report = {"precision": precision, "images": images, "image_source": source, **diff,
              "scores_tol": tol, "boxes_tol": box_tol, **match_detections(ref, out)}
    if precision == "fp32":
        report["criteria"] = [
            criterion("score max abs difference", max(diff["scores_max_abs"], diff["topk_scores_max_abs"]), tol,
                      images, source),
            criterion("box max abs difference", max(diff["boxes_max_abs"], diff["topk_boxes_max_abs"]), box_tol,
                      images, source, unit=" px"),
            criterion("top-k entries without counterpart", diff["topk_unmatched"], 0, images, source),
            criterion("label mismatches", diff["label_mismatch"], 0, images, source)]
    elif precision == "fp16":
        report["criteria"] = [
            criterion(f"detections >= {MATCH_SCORE:g} matched", report["det_matched_fraction"], FP16_MIN_MATCHED,
                      images, source, at_most=False),
            criterion(f"matched boxes' p{BOX_PERCENTILE} error / box size", report["det_box_rel"], FP16_BOX_REL,
                      images, source)]
    if "criteria" in report:
        _set_verdict(report)
    return report


def judge_map(report):
    """Add the mAP criterion to a report holding mAP_diff and map_images (FP16 must pass it too, INT8 is
    judged by it alone); on fewer than MIN_MAP_IMAGES images the difference is only reported."""
    if "mAP_diff" not in report or report["precision"] == "fp32":
        return report
    images = report.get("map_images", 0)
    if images < MIN_MAP_IMAGES:
        report["map_note"] = f"not judged: fewer than {MIN_MAP_IMAGES} validation images"
        return report
    drop = criterion("mAP drop", -100 * report["mAP_diff"], 100 * MAX_MAP_DROP, images, "validation",
                     unit=" points")
    report["criteria"] = report.get("criteria", []) + [drop]
    return _set_verdict(report)


def verdict(report):
    """'OK (gate: ...)' / 'FAILED: <criterion, value, limit, images>' / 'no verdict (...)' ending every parity line."""
    if "passed" not in report:
        return (f"no verdict (INT8 is judged by the mAP drop on at least {MIN_MAP_IMAGES} validation images, "
                f"and there were {report.get('map_images', 0)}; slot-by-slot numbers are expected to move)")
    return f"OK (gate: {report['gate']})" if report["passed"] else f"FAILED: {report['failed']}"


def check_parity(report, path):
    """Raise ParityError naming the one criterion that failed, its value, its limit and the images."""
    if report.get("passed", True):
        return
    raise ParityError(f"{path}: the {report['precision']} export failed its accuracy gate: {report['failed']}")


def map_difference(reference_metrics, metrics):
    """mAP / AP50 / KITTI moderate of both and their difference (exported - reference)."""
    result = {}
    for key in ("mAP", "AP50", "kitti_moderate"):
        if key in reference_metrics and key in metrics:
            result[f"{key}_ref"] = reference_metrics[key]
            result[key] = metrics[key]
            result[f"{key}_diff"] = metrics[key] - reference_metrics[key]
    return result
