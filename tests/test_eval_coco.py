"""KITTI -> COCO conversion, COCO mAP (hand-computed and against pycocotools) and the evaluator."""
import contextlib
import io

import numpy as np
import pytest

from clock_deploy.data.coco import detections_to_coco, kitti_to_coco, load_coco
from clock_deploy.data.kitti import read_label
from clock_deploy.errors import UserError
from clock_deploy.eval.coco import coco_map
from clock_deploy.eval.evaluator import DetectionEvaluator, write_kitti_detections

CLASSES = ["Car", "Pedestrian", "Cyclist"]


def annos(*objects):
    """objects: (name, [x1, y1, x2, y2]) or (name, box, score) for detections."""
    out = {"name": np.array([o[0] for o in objects], dtype="<U14"),
           "bbox": np.array([o[1] for o in objects], np.float64).reshape(-1, 4),
           "truncated": np.zeros(len(objects)), "occluded": np.zeros(len(objects), np.int64)}
    if objects and len(objects[0]) == 3:
        out["score"] = np.array([o[2] for o in objects], np.float64)
    return out


def evaluate(gt_frames, det_frames, classes=CLASSES):
    coco_gt = kitti_to_coco([(f"{i:06d}", 375, 1242, a) for i, a in enumerate(gt_frames)], classes)
    ids = [im["id"] for im in coco_gt["images"]]
    return coco_map(coco_gt, detections_to_coco(ids, det_frames, classes))


# sizes: small < 32^2 px, medium < 96^2, large above
SMALL, MEDIUM, LARGE = [10, 10, 30, 30], [100, 100, 150, 150], [300, 50, 500, 250]


def test_conversion_maps_classes_dontcare_and_neighbours():
    gt = annos(("Car", [10, 20, 50, 80]), ("Van", LARGE), ("DontCare", MEDIUM), ("Truck", SMALL),
               ("Person_sitting", SMALL))
    coco = kitti_to_coco([("000007", 375, 1242, gt)], CLASSES)
    assert coco["categories"] == [{"id": 1, "name": "Car"}, {"id": 2, "name": "Pedestrian"},
                                  {"id": 3, "name": "Cyclist"}]
    assert coco["images"] == [{"id": 1, "file_name": "000007.png", "frame_id": "000007",
                               "height": 375, "width": 1242}]
    rows = [(a["category_id"], a["bbox"], a["iscrowd"]) for a in coco["annotations"]]
    assert rows == [(1, [10.0, 20.0, 40.0, 60.0], 0),            # Car
                    (1, [300.0, 50.0, 200.0, 200.0], 1),         # Van -> crowd of Car
                    (1, [100.0, 100.0, 50.0, 50.0], 1),          # DontCare -> crowd of every class
                    (2, [100.0, 100.0, 50.0, 50.0], 1),
                    (3, [100.0, 100.0, 50.0, 50.0], 1),
                    (2, [10.0, 10.0, 20.0, 20.0], 1)]            # Person_sitting -> crowd of Pedestrian
    assert coco["annotations"][0]["area"] == 2400.0
    assert [a["id"] for a in coco["annotations"]] == [1, 2, 3, 4, 5, 6]
    # with the 8-class map Van is a class of its own
    coco8 = kitti_to_coco([("0", 1, 1, gt)], ["Car", "Van", "Truck", "Pedestrian", "Person_sitting"])
    assert [(a["category_id"], a["iscrowd"]) for a in coco8["annotations"][:2]] == [(1, 0), (2, 0)]


def test_detections_to_coco_drops_unknown_classes():
    det = annos(("Car", [10, 20, 50, 80], 0.5), ("Tram", LARGE, 0.9))
    assert detections_to_coco([4], [det], CLASSES) == [
        {"image_id": 4, "category_id": 1, "bbox": [10.0, 20.0, 40.0, 60.0], "score": 0.5}]


def test_perfect_detector_is_one():
    gt = annos(("Car", SMALL), ("Pedestrian", MEDIUM), ("Cyclist", LARGE))
    det = annos(("Car", SMALL, 0.9), ("Pedestrian", MEDIUM, 0.8), ("Cyclist", LARGE, 0.7))
    assert evaluate([gt], [det]) == pytest.approx(dict.fromkeys(["AP", "AP50", "AP75", "APs", "APm", "APl"], 1.0))


def test_false_positive_ranked_above_the_true_positive_halves_precision():
    gt = annos(("Car", LARGE))
    det = annos(("Car", [600, 50, 800, 250], 0.9), ("Car", LARGE, 0.8))
    # precision 1/2 at recall 1, so interpolated precision is 1/2 at every recall sample
    assert evaluate([gt], [det])["AP"] == pytest.approx(0.5)
    # ranked below the TP it costs nothing
    det["score"] = np.array([0.7, 0.8])
    assert evaluate([gt], [det])["AP"] == pytest.approx(1.0)


def test_partial_overlap_and_partial_recall():
    gt = annos(("Car", [0, 0, 100, 100]), ("Car", [300, 0, 400, 100]))
    # IoU 62 / 100 with the first box, nothing on the second: matched at IoU 0.5, 0.55, 0.6 only
    det = annos(("Car", [0, 0, 100, 62], 0.9))
    res = evaluate([gt], [det])
    # recall 1/2 with precision 1: recall samples 0 .. 0.5 -> 51 of 101
    assert res["AP50"] == pytest.approx(51 / 101)
    assert res["AP75"] == 0.0
    assert res["AP"] == pytest.approx(3 / 10 * 51 / 101)
    assert np.isnan(res["APs"])  # no small GT: undefined


@pytest.mark.parametrize("region", ["DontCare", "Van"])
def test_detection_on_dontcare_or_van_is_not_a_false_positive(region):
    gt = annos(("Car", LARGE), (region, [600, 50, 800, 250]))
    det = annos(("Car", [620, 60, 780, 240], 0.9), ("Car", LARGE, 0.8))
    assert evaluate([gt], [det])["AP"] == pytest.approx(1.0)
    gt = annos(("Car", LARGE), ("Truck", [600, 50, 800, 250]))
    assert evaluate([gt], [det])["AP"] == pytest.approx(0.5)


def test_identical_to_pycocotools_on_random_data():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    names = ["Car", "Car", "Pedestrian", "Cyclist", "Van", "DontCare", "Truck"]
    gts, dets = [], []
    for _ in range(40):
        xy = rng.uniform(0, 900, (6, 2))
        wh = rng.uniform(8, 200, (6, 2))
        boxes = np.concatenate([xy, xy + wh], 1)
        gts.append(annos(*[(names[rng.integers(len(names))], b) for b in boxes]))
        jitter = boxes[rng.integers(0, 6, 12)] + rng.normal(0, 8, (12, 4))
        dets.append(annos(*[(CLASSES[rng.integers(3)], b, rng.uniform()) for b in jitter]))
    coco_gt = kitti_to_coco([(str(i), 375, 1242, a) for i, a in enumerate(gts)], CLASSES)
    results = detections_to_coco(range(1, 41), dets, CLASSES)
    ours = coco_map(coco_gt, results)

    with contextlib.redirect_stdout(io.StringIO()):
        gt_api = COCO()
        gt_api.dataset = kitti_to_coco([(str(i), 375, 1242, a) for i, a in enumerate(gts)], CLASSES)
        gt_api.createIndex()
        reference = COCOeval(gt_api, gt_api.loadRes([dict(r) for r in results]), "bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    expected = reference.stats[:6]
    assert 0.05 < ours["AP50"] < 0.95
    assert list(ours.values()) == pytest.approx(list(expected), abs=1e-6)


def test_per_class_coco_scores_each_class_apart_and_averages_to_the_summary():
    gt = annos(("Car", [100, 100, 300, 200]), ("Pedestrian", [400, 100, 440, 200]))
    evaluator = DetectionEvaluator(CLASSES, [gt], [(375, 1242)], ["000000"])
    # the car exactly, the pedestrian 20 px too low: IoU 80 / 120 = 0.67, a hit at 0.5 but not at 0.7
    evaluator.update(0, [[100, 100, 300, 200], [400, 120, 440, 220]], [0.9, 0.8], [0, 1])
    per_class = evaluator.per_class_coco()
    assert per_class["Car"] == {"AP": 1.0, "AP50": 1.0, "AP70": 1.0}
    assert per_class["Pedestrian"]["AP50"] == 1.0 and per_class["Pedestrian"]["AP70"] == 0.0
    assert 0.0 < per_class["Pedestrian"]["AP"] < 1.0
    assert np.isnan(per_class["Cyclist"]["AP"])  # no ground truth
    # the classes' mean is the summary's mAP (COCO averages over the classes with ground truth)
    assert evaluator.summarize()["mAP"] == pytest.approx((1.0 + per_class["Pedestrian"]["AP"]) / 2)


def test_coco_map_is_quiet(capsys):
    evaluate([annos(("Car", LARGE))], [annos(("Car", LARGE, 0.9))])
    assert capsys.readouterr().out == ""


def test_load_coco_names_the_file_on_bad_json(tmp_path):
    bad = tmp_path / "gt.json"
    bad.write_text('{"images": [],\n "annotations": [,]}')
    with pytest.raises(UserError, match=r"gt\.json:2"):
        load_coco(bad)
    bad.write_text('{"images": []}')
    with pytest.raises(UserError, match="gt.json.*annotations"):
        load_coco(bad)
    good = tmp_path / "good.json"
    good.write_text('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "Car"}]}')
    assert load_coco(good)["categories"] == [{"id": 1, "name": "Car"}]


# --------------------------------------------------------------------- evaluator


def car_frames(n=45):
    return [annos(("Car", [10, 10, 110, 110]), ("Pedestrian", [200, 10, 240, 110])) for _ in range(n)]


def test_evaluator_reports_coco_and_kitti_keys():
    gts = car_frames()
    ev = DetectionEvaluator(CLASSES, gts, [(375, 1242)] * len(gts), [f"{i:06d}" for i in range(len(gts))])
    for i in range(len(gts)):
        # label 0 = Car found exactly; label 1 = Pedestrian shifted to IoU 0.6: a KITTI TP (>0.5),
        # a COCO TP at IoU 0.5 .. 0.6 only
        ev.update(i, np.array([[10, 10, 110, 110], [200, 10, 240, 70]]), np.array([0.9, 0.8 - i * 1e-3]),
                  np.array([0, 1]))
    m = ev.summarize()
    assert m["kitti_Car_easy"] == m["kitti_Car_moderate"] == m["kitti_Car_hard"] == pytest.approx(100.0)
    assert m["kitti_Pedestrian_moderate"] == pytest.approx(100.0)
    assert m["kitti_Cyclist_hard"] == 0.0  # no cyclists at all: AP 0, left out of kitti_moderate
    assert m["kitti_moderate"] == pytest.approx(100.0)
    assert m["AP50"] == pytest.approx(1.0)
    assert m["mAP"] == pytest.approx((1.0 + 0.3) / 2)  # Car 1.0, Pedestrian 3 of 10 IoU thresholds
    assert np.isnan(m["APs"])
    assert m["kitti_easy"] == m["kitti_hard"] == pytest.approx(100.0)  # both classes found at every difficulty
    assert set(m) == {"mAP", "AP50", "AP75", "APs", "APm", "APl", "kitti_easy", "kitti_moderate", "kitti_hard"} | {
        f"kitti_{c}_{d}" for c in CLASSES for d in ("easy", "moderate", "hard")}


def test_evaluator_frames_without_update_have_no_detections():
    gts = car_frames(2)
    ev = DetectionEvaluator(["Car", "Van"], gts, [(375, 1242)] * 2, ["a", "b"])
    ev.update(1, np.array([[10, 10, 110, 110]]), np.array([0.9]), np.array([0]))
    m = ev.summarize()
    assert m["AP50"] == pytest.approx(51 / 101)  # one of two cars found
    assert "kitti_Van_easy" not in m and "kitti_Car_easy" in m


def test_write_kitti_detections_round_trips(tmp_path):
    write_kitti_detections(tmp_path, ["000001", "000002"],
                           [(np.array([[1.5, 2.25, 30, 40]]), np.array([0.75]), np.array([2])), None], CLASSES)
    got = read_label(tmp_path / "000001.txt")
    assert list(got["name"]) == ["Cyclist"]
    assert got["bbox"].tolist() == [[1.5, 2.25, 30.0, 40.0]]
    assert got["score"].tolist() == [0.75]
    assert (tmp_path / "000002.txt").read_text() == ""
