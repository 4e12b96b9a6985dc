"""KITTI 2D AP against hand-computed values and a literal re-implementation of the devkit rules.

Reminder of a devkit property most cases below rely on: the precision curve has one sample per
score threshold and getThresholds yields min(number of TPs, 41) thresholds, so a perfect detector
scores 100 only with >= 41 valid GT boxes (1 GT gives R40 0 and R11 100/11). Hence most cases use
50 "filler" cars that are detected perfectly.
"""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from clock_deploy.data.kitti import label_path, write_label, write_split
from clock_deploy.eval.commands import eval_cmd
from clock_deploy.eval.evaluator import detection_annos
from clock_deploy.eval.kitti import format_kitti, kitti_eval

CLASSES = ("Car", "Pedestrian", "Cyclist")


def gt_frame(*objects):
    """objects: (name, [x1, y1, x2, y2], truncated=0, occluded=0)."""
    objects = [tuple(o) + (0.0, 0)[len(o) - 2:] for o in objects]
    return {
        "name": np.array([o[0] for o in objects], dtype="<U14"),
        "bbox": np.array([o[1] for o in objects], np.float64).reshape(-1, 4),
        "truncated": np.array([o[2] for o in objects], np.float64),
        "occluded": np.array([o[3] for o in objects], np.int64),
    }


def det_frame(*objects):
    """objects: (name, [x1, y1, x2, y2], score)."""
    return {
        "name": np.array([o[0] for o in objects], dtype="<U14"),
        "bbox": np.array([o[1] for o in objects], np.float64).reshape(-1, 4),
        "score": np.array([o[2] for o in objects], np.float64),
    }


def box(x, y=0, w=100, h=100):
    return [x, y, x + w, y + h]


def filler(n=50, name="Car", score0=0.5, h=100):
    """n frames with one easy object each, detected exactly, scores score0, score0 + 0.005, ..."""
    gts = [gt_frame((name, box(10, 10, 100, h))) for _ in range(n)]
    dts = [det_frame((name, box(10, 10, 100, h), score0 + 0.005 * i)) for i in range(n)]
    return gts, dts


def aps(result, cls="Car"):
    return [result[cls][m][d] for m in ("R40", "R11") for d in ("easy", "moderate", "hard")]


# --------------------------------------------------------------------- hand-computed cases


def test_perfect_detector_with_enough_gt_is_100_everywhere():
    gts, dts = [], []
    for name in CLASSES:
        g, d = filler(45, name)
        gts += g
        dts += d
    res = kitti_eval(gts, dts)
    for cls in CLASSES:
        assert aps(res, cls) == pytest.approx([100.0] * 6)
        assert res[cls]["num_gt"] == {"easy": 45, "moderate": 45, "hard": 45}
    assert res["mAP_moderate_R40"] == pytest.approx(100.0)
    assert "Car" in format_kitti(res) and "100.0" in format_kitti(res)


@pytest.mark.parametrize("n_gt, r40, r11", [(1, 0.0, 100 / 11), (2, 2.5, 100 / 11), (5, 10.0, 200 / 11),
                                            (40, 97.5, 1000 / 11), (41, 100.0, 100.0)])
def test_perfect_detector_with_few_gt_has_the_devkit_sample_count(n_gt, r40, r11):
    # n_gt thresholds -> precision 1 at samples 0..n_gt-1 (capped at 41), 0 after
    gts, dts = filler(n_gt)
    assert aps(kitti_eval(gts, dts, ["Car"])) == pytest.approx([r40] * 3 + [r11] * 3)


def test_detections_inside_dontcare_are_not_false_positives():
    gts, dts = filler()
    gts.append(gt_frame(("DontCare", [300, 50, 500, 150])))
    # top-scoring car detections inside the region (intersection / detection area 1.0 and 0.8)
    dts.append(det_frame(("Car", [320, 60, 420, 140], 0.99), ("Car", [420, 60, 520, 140], 0.98)))
    res = kitti_eval(gts, dts, ["Car"])
    assert aps(res) == pytest.approx([100.0] * 6)
    # 60% inside a DontCare region is below the car overlap 0.7: a false positive again
    dts[-1] = det_frame(("Car", [440, 60, 540, 140], 0.99))
    assert aps(kitti_eval(gts, dts, ["Car"])) == pytest.approx([100 * 50 / 51] * 6)


@pytest.mark.parametrize("other, cls, ap", [("Van", "Car", 100.0), ("Truck", "Car", 100 * 50 / 51),
                                            ("Person_sitting", "Pedestrian", 100.0),
                                            ("Cyclist", "Pedestrian", 100 * 50 / 51)])
def test_detection_on_neighbour_class_is_neither_tp_nor_fp(other, cls, ap):
    gts, dts = filler(name=cls)
    gts.append(gt_frame((other, box(300))))
    dts.append(det_frame((cls, box(300), 0.99)))
    # neighbour: ignored; another class: a false positive ranked first, so precision is 50/51 at
    # every threshold (max-interpolation keeps the last, highest value)
    assert aps(kitti_eval(gts, dts, [cls]), cls) == pytest.approx([ap] * 6)


@pytest.mark.parametrize("truncated, occluded, height, easy, moderate", [
    (0.0, 2, 100, True, True),    # occlusion 2: only Hard keeps it
    (0.4, 0, 100, True, True),    # truncation 0.4 > 0.3: only Hard keeps it
    (0.2, 0, 100, True, False),   # truncation 0.2 > 0.15: Easy ignores it
    (0.0, 1, 100, True, False),   # occlusion 1: Easy ignores it
    (0.0, 0, 40, True, False),    # height 40 <= 40: Easy ignores it
    (0.0, 0, 30, True, False),    # height 30: kept by Moderate (> 25)
])
def test_hard_gt_is_ignored_by_easier_difficulties(truncated, occluded, height, easy, moderate):
    gts, dts = filler()
    gts += [gt_frame(("Car", box(10, 10, 100, height), truncated, occluded)) for _ in range(50)]
    dts += [det_frame() for _ in range(50)]
    res = kitti_eval(gts, dts, ["Car"])
    # 50 of 100 valid GT found without FP: 21 thresholds (recall 0 .. 0.5), precision 1 on them:
    # R40 = 20 / 40, R11 = samples 0, 4, .., 20 -> 6 / 11
    missed = {"R40": 50.0, "R11": 600 / 11}
    for metric in ("R40", "R11"):
        assert res["Car"][metric]["easy"] == pytest.approx(100.0 if easy else missed[metric])
        assert res["Car"][metric]["moderate"] == pytest.approx(100.0 if moderate else missed[metric])
        assert res["Car"][metric]["hard"] == pytest.approx(missed[metric])
    assert res["Car"]["num_gt"]["hard"] == 100

    # detecting the hard boxes too: matches to ignored GT are not false positives anywhere
    dts[50:] = [det_frame(("Car", box(10, 10, 100, height), 0.3)) for _ in range(50)]
    assert aps(kitti_eval(gts, dts, ["Car"])) == pytest.approx([100.0] * 6)


def test_detections_lower_than_min_height_are_ignored():
    gts, dts = filler()
    # unmatched detections: height 30 counts as FP only from Moderate on, height 20 never
    gts.append(gt_frame())
    dts.append(det_frame(("Car", box(300, 0, 100, 30), 0.99), ("Car", box(500, 0, 100, 20), 0.99)))
    res = kitti_eval(gts, dts, ["Car"])
    assert [res["Car"]["R40"][d] for d in ("easy", "moderate", "hard")] == pytest.approx(
        [100.0, 100 * 50 / 51, 100 * 50 / 51])


def test_a_small_detection_of_another_class_can_take_a_gt_box():
    # devkit quirk kept on purpose: every detection lower than MIN_HEIGHT is "ignored" whatever its
    # class, and the threshold pass gives each GT box its highest-scoring overlapping detection
    gts, dts = filler(40)
    gts.append(gt_frame(("Car", box(300, 0, 100, 30))))     # valid for Moderate / Hard
    dts.append(det_frame(("Car", box(300, 0, 100, 30), 0.3)))
    assert kitti_eval(gts, dts, ["Car"])["Car"]["R40"]["moderate"] == pytest.approx(100.0)
    # a pedestrian detection 24 px high (IoU 0.8) outscores the car detection: the car box yields
    # no TP score, so 40 TP scores for 41 GT give 40 thresholds -> R40 39/40
    dts[-1] = det_frame(("Car", box(300, 0, 100, 30), 0.3), ("Pedestrian", box(300, 3, 100, 24), 0.9))
    res = kitti_eval(gts, dts, ["Car"])["Car"]["R40"]
    assert [res["moderate"], res["hard"]] == pytest.approx([97.5, 97.5])


def test_one_false_positive_in_the_middle_of_the_ranking():
    gts, dts = filler(50, score0=0.51)               # TP scores 0.51 .. 0.755 step 0.005
    gts.append(gt_frame())
    dts.append(det_frame(("Car", box(300), 0.6275)))  # between TP ranks 25 (0.63) and 26 (0.625)
    # 50 GT: getThresholds takes TP ranks 0,1,2,3,4,5,6,8,9,10,11,13,14,15,16,18,19,20,21,23,24,25 (22
    # samples with precision 1), then ranks 26.. where the FP counts: precision (i+1)/(i+2) rises to
    # 50/51 at the last rank, so every later sample interpolates to 50/51 (19 samples).
    r40 = (21 + 19 * 50 / 51) / 40 * 100
    r11 = (6 + 5 * 50 / 51) / 11 * 100
    assert aps(kitti_eval(gts, dts, ["Car"])) == pytest.approx([r40] * 3 + [r11] * 3)


def test_gt_boxes_are_served_in_order_with_the_highest_scoring_detection():
    # A and B overlap; d1 overlaps both (IoU 0.739), d2 equals A (IoU 1 with A, 0.538 with B)
    a, b = ("Car", box(0)), ("Car", box(30))
    d1, d2 = ("Car", box(15), 0.99), ("Car", box(0), 0.98)
    gts, dts = filler(48)
    dts.append(det_frame(d1, d2))
    # A first: A takes d1 (higher score, not larger overlap), B finds nothing -> 49 TP of 50 GT,
    # 40 thresholds without FP: R40 39/40, R11 10/11
    res = kitti_eval(gts + [gt_frame(a, b)], dts, ["Car"])
    assert aps(res) == pytest.approx([97.5] * 3 + [1000 / 11] * 3)
    # B first: B takes d1, A takes d2 -> all 50 found
    res = kitti_eval(gts + [gt_frame(b, a)], dts, ["Car"])
    assert aps(res) == pytest.approx([100.0] * 6)


def test_images_without_gt_contribute_their_false_positives():
    gts, dts = filler()
    gts += [gt_frame(), gt_frame()]
    dts += [det_frame(), det_frame(("Car", box(300), 0.99))]
    assert aps(kitti_eval(gts, dts, ["Car"])) == pytest.approx([100 * 50 / 51] * 6)
    dts[-1] = det_frame()
    assert aps(kitti_eval(gts, dts, ["Car"])) == pytest.approx([100.0] * 6)


@pytest.mark.parametrize("cls, ap", [("Car", 0.0), ("Pedestrian", 100.0), ("Cyclist", 100.0)])
def test_min_overlap_is_0_7_for_cars_and_0_5_otherwise(cls, ap):
    gts, _ = filler(50, cls)
    # shifted by 25 px: IoU 75 / 125 = 0.6
    dts = [det_frame((cls, box(35, 10, 100, 100), 0.5 + 0.005 * i)) for i in range(50)]
    assert aps(kitti_eval(gts, dts, [cls]), cls) == pytest.approx([ap] * 6)


def test_class_without_gt_scores_zero_and_is_left_out_of_the_mean():
    gts, dts = filler()
    res = kitti_eval(gts, dts)
    assert aps(res, "Pedestrian") == [0.0] * 6
    assert res["Pedestrian"]["num_gt"]["moderate"] == 0
    assert res["mAP_moderate_R40"] == pytest.approx(100.0)


def test_rejects_classes_the_devkit_does_not_define():
    with pytest.raises(ValueError, match="Van"):
        kitti_eval([gt_frame()], [det_frame()], ["Van"])


# --------------------------------------------------------------------- literal devkit re-implementation

MIN_HEIGHT, MAX_OCC, MAX_TRUNC = [40, 25, 25], [0, 1, 2], [0.15, 0.3, 0.5]


def ref_overlap(d, g, criterion=-1):
    x1, y1, x2, y2 = max(d[0], g[0]), max(d[1], g[1]), min(d[2], g[2]), min(d[3], g[3])
    w, h = x2 - x1, y2 - y1
    if w <= 0 or h <= 0:
        return 0
    inter = w * h
    da = (d[2] - d[0]) * (d[3] - d[1])
    ga = (g[2] - g[0]) * (g[3] - g[1])
    return inter / (da + ga - inter) if criterion == -1 else inter / da


def ref_clean(cls, gt, det, diff):
    neighbour = {"car": "van", "pedestrian": "person_sitting"}.get(cls)
    ign_gt, n_gt = [], 0
    for name, b, tr, oc in zip(gt["name"], gt["bbox"], gt["truncated"], gt["occluded"]):
        name = name.lower()
        valid = 1 if name == cls else (0 if name == neighbour else -1)
        ignore = oc > MAX_OCC[diff] or tr > MAX_TRUNC[diff] or (b[3] - b[1]) <= MIN_HEIGHT[diff]
        if valid == 1 and not ignore:
            ign_gt.append(0)
            n_gt += 1
        elif valid == 0 or (ignore and valid == 1):
            ign_gt.append(1)
        else:
            ign_gt.append(-1)
    dc = [b for name, b in zip(gt["name"], gt["bbox"]) if name.lower() == "dontcare"]
    ign_det = []
    for name, b in zip(det["name"], det["bbox"]):
        if int(abs(b[1] - b[3])) < MIN_HEIGHT[diff]:
            ign_det.append(1)
        else:
            ign_det.append(0 if name.lower() == cls else -1)
    return ign_gt, dc, ign_det, n_gt


def ref_statistics(gt, det, dc, ign_gt, ign_det, compute_fp, min_ov, thresh=0.0):
    NO = -10000
    boxes, scores = det["bbox"], det["score"]
    assigned = [False] * len(scores)
    low = [compute_fp and s < thresh for s in scores]
    tp = fp = fn = 0
    v = []
    for i, g in enumerate(gt["bbox"]):
        if ign_gt[i] == -1:
            continue
        det_idx, valid, max_ov, took_ignored = -1, NO, 0, False
        for j in range(len(scores)):
            if ign_det[j] == -1 or assigned[j] or low[j]:
                continue
            ov = ref_overlap(boxes[j], g)
            if not compute_fp and ov > min_ov and scores[j] > valid:
                det_idx, valid = j, scores[j]
            elif compute_fp and ov > min_ov and (ov > max_ov or took_ignored) and ign_det[j] == 0:
                max_ov, det_idx, valid, took_ignored = ov, j, 1, False
            elif compute_fp and ov > min_ov and valid == NO and ign_det[j] == 1:
                det_idx, valid, took_ignored = j, 1, True
        if valid == NO and ign_gt[i] == 0:
            fn += 1
        elif valid != NO and (ign_gt[i] == 1 or ign_det[det_idx] == 1):
            assigned[det_idx] = True
        elif valid != NO:
            tp += 1
            v.append(scores[det_idx])
            assigned[det_idx] = True
    if compute_fp:
        for j in range(len(scores)):
            if not (assigned[j] or ign_det[j] in (-1, 1) or low[j]):
                fp += 1
        stuff = 0
        for d in dc:
            for j in range(len(scores)):
                if assigned[j] or ign_det[j] in (-1, 1) or low[j]:
                    continue
                if ref_overlap(boxes[j], d, 0) > min_ov:
                    assigned[j] = True
                    stuff += 1
        fp -= stuff
    return tp, fp, fn, v


def ref_thresholds(v, n_gt):
    v = sorted(v, reverse=True)
    t, current = [], 0.0
    for i in range(len(v)):
        l_rec = (i + 1) / n_gt
        r_rec = (i + 2) / n_gt if i < len(v) - 1 else l_rec
        if (r_rec - current) < (current - l_rec) and i < len(v) - 1:
            continue
        t.append(v[i])
        current += 1.0 / 40.0
    return t


def ref_eval(gts, dts, cls, diff):
    min_ov = {"car": 0.7, "pedestrian": 0.5, "cyclist": 0.5}[cls]
    n_gt, v, cleaned = 0, [], []
    for gt, det in zip(gts, dts):
        ign_gt, dc, ign_det, n = ref_clean(cls, gt, det, diff)
        n_gt += n
        cleaned.append((ign_gt, dc, ign_det))
        v += ref_statistics(gt, det, dc, ign_gt, ign_det, False, min_ov)[3]
    thresholds = ref_thresholds(v, n_gt)
    prec = [0.0] * 41
    for k, t in enumerate(thresholds):
        tp = fp = 0
        for (gt, det), (ign_gt, dc, ign_det) in zip(zip(gts, dts), cleaned):
            a, b, _, _ = ref_statistics(gt, det, dc, ign_gt, ign_det, True, min_ov, t)
            tp, fp = tp + a, fp + b
        prec[k] = tp / (tp + fp)
    prec = [max(prec[k:]) for k in range(41)]
    return sum(prec[1:]) / 40 * 100, sum(prec[::4]) / 11 * 100


def random_frames(rng, n_images):
    """Frames with every case the rules distinguish: neighbour and other classes, DontCare, all
    occlusion / truncation levels, boxes around the height limits, wrong-class, duplicate, small
    and clutter detections, tied scores."""
    gt_names = ["Car"] * 3 + ["Pedestrian"] * 2 + ["Cyclist", "Van", "Person_sitting", "Truck", "DontCare"]
    det_label = {"Van": "Car", "Person_sitting": "Pedestrian", "Truck": "Car", "DontCare": "Car"}
    gts, dts = [], []
    for _ in range(n_images):
        n = rng.integers(0, 8)
        xy = rng.uniform(0, 600, (n, 2))
        wh = np.stack([rng.uniform(15, 150, n), rng.choice([20, 24.5, 25, 30, 40, 40.5, 60, 120], n)], 1)
        gt = gt_frame(*[(gt_names[rng.integers(len(gt_names))], [*p, *(p + s)],
                         rng.choice([0, 0, 0.1, 0.15, 0.2, 0.4, 0.6]), rng.choice([0, 0, 1, 2, 3]))
                        for p, s in zip(xy, wh)])
        dets = []
        for name, b in zip(gt["name"], gt["bbox"]):
            for _ in range(rng.choice([0, 1, 1, 1, 2])):
                label = det_label.get(name, name) if rng.uniform() < 0.85 else CLASSES[rng.integers(3)]
                dets.append((label, b + rng.normal(0, 4, 4), round(rng.uniform(), 2)))
        for _ in range(rng.integers(0, 4)):
            p = rng.uniform(0, 600, 2)
            dets.append((CLASSES[rng.integers(3)], [*p, *(p + rng.uniform(10, 120, 2))], round(rng.uniform(), 2)))
        gts.append(gt)
        dts.append(det_frame(*dets))
    return gts, dts


@pytest.mark.parametrize("seed, n_images", [(0, 100), (1, 100), (2, 400)])
def test_matches_literal_devkit_reimplementation_on_random_data(seed, n_images):
    gts, dts = random_frames(np.random.default_rng(seed), n_images)
    res = kitti_eval(gts, dts)
    for cls in CLASSES:
        for d, diff in enumerate(("easy", "moderate", "hard")):
            r40, r11 = ref_eval(gts, dts, cls.lower(), d)
            assert res[cls]["R40"][diff] == pytest.approx(r40, abs=1e-9), (cls, diff)
            assert res[cls]["R11"][diff] == pytest.approx(r11, abs=1e-9), (cls, diff)


# --------------------------------------------------------------------- command line


def as_label_file(gt):
    """A ground-truth frame with the 3D columns a label file needs (KITTI "unknown" values)."""
    n = len(gt["name"])
    annos = detection_annos(gt["bbox"], np.zeros(n), np.zeros(n, np.int64), ["Car"])
    del annos["score"]
    return {**annos, "name": gt["name"], "truncated": gt["truncated"], "occluded": gt["occluded"]}


def test_eval_command_reads_label_and_detection_folders(tmp_path):
    root, det_dir = tmp_path / "kitti", tmp_path / "det"
    gts, dts = filler(45)
    gts.append(gt_frame(("Car", box(300))))  # the last frame has no detection file
    frame_ids = [f"{i:06d}" for i in range(len(gts))]
    for frame_id, gt in zip(frame_ids, gts):
        write_label(label_path(root, frame_id), as_label_file(gt))
    for frame_id, dt in zip(frame_ids, dts):
        write_label(det_dir / f"{frame_id}.txt", detection_annos(dt["bbox"], dt["score"], [0], ["Car"]))
    write_split(root, "val", frame_ids)

    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(eval_cmd, ["--gt", str(root), "--det", str(det_dir), "--split", "val",
                                           "--coco", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "46 frames, 45 detection files" in result.output
    assert "Car" in result.output and "R11" in result.output and "AP50" in result.output
    # one unit on screen: KITTI and COCO AP both in percent with one decimal (the JSON keeps raw values)
    assert "97.5" in result.output and "AP 97.0" in result.output and "0.97" not in result.output
    report = json.loads(out.read_text())
    car = report["kitti"]["Car"]
    assert car["num_gt"]["moderate"] == 46
    # 45 of 46 found, no false positive: 40 thresholds -> R40 39/40, R11 10/11
    assert car["R40"]["moderate"] == pytest.approx(97.5)
    assert car["R11"]["hard"] == pytest.approx(1000 / 11)
    # COCO: precision 1 up to recall 45/46, i.e. at recall samples 0, 0.01 .. 0.97
    assert report["coco"]["AP"] == pytest.approx(98 / 101)
    assert report["coco"]["APl"] == pytest.approx(98 / 101)


def test_eval_command_runs_a_model_first(tmp_path, synthetic_data, make_train_config):
    """--model writes one 16-column detection file per frame, then evaluates them like --det alone."""
    import torch

    from clock_deploy.data.kitti import read_split
    from clock_deploy.checkpoint import save_checkpoint
    from clock_deploy.models.build import build_model

    root = synthetic_data
    cfg = make_train_config(root, str(tmp_path / "run"))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, model, cfg, ["Car", "Pedestrian", "Cyclist"], epoch=0, iteration=0)

    det_dir, first, second = tmp_path / "det", tmp_path / "first.json", tmp_path / "second.json"
    result = CliRunner().invoke(eval_cmd, ["--gt", root, "--split", "val", "--det", str(det_dir),
                                           "--model", str(ckpt), "--json", str(first)])
    assert result.exit_code == 0, result.output
    frames = read_split(root, "val")
    for frame_id in frames:
        lines = (det_dir / f"{frame_id}.txt").read_text().splitlines()
        assert len(lines) == cfg.export.topk and all(len(line.split()) == 16 for line in lines)
    result = CliRunner().invoke(eval_cmd, ["--gt", root, "--split", "val", "--det", str(det_dir),
                                           "--json", str(second)])
    assert result.exit_code == 0, result.output
    assert json.loads(first.read_text()) == json.loads(second.read_text())
