import numpy as np
import pytest

from clock_deploy.data import kitti
from clock_deploy.errors import UserError

GT_TEXT = """\
Car 0.00 0 -1.58 587.01 173.33 614.12 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59
Pedestrian 0.31 1 0.21 423.17 173.67 433.17 224.03 1.60 0.38 0.30 -5.86 1.60 23.51 -0.03

DontCare -1 -1 -10 503.89 169.71 590.61 190.13 -1 -1 -1 -1000 -1000 -1000 -10
"""


def _write(tmp_path, text, name="000000.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_read_ground_truth(tmp_path):
    annos = kitti.read_label(_write(tmp_path, GT_TEXT))  # the blank line is skipped
    assert list(annos["name"]) == ["Car", "Pedestrian", "DontCare"]
    assert "score" not in annos
    np.testing.assert_allclose(annos["truncated"], [0.0, 0.31, -1])
    assert annos["occluded"].dtype == np.int64 and list(annos["occluded"]) == [0, 1, -1]
    np.testing.assert_allclose(annos["bbox"][1], [423.17, 173.67, 433.17, 224.03])
    np.testing.assert_allclose(annos["dimensions"][0], [1.65, 1.67, 3.64])
    np.testing.assert_allclose(annos["location"][0], [-0.65, 1.71, 46.70])
    np.testing.assert_allclose(annos["rotation_y"], [-1.59, -0.03, -10])
    np.testing.assert_allclose(annos["alpha"], [-1.58, 0.21, -10])


def test_round_trip_ground_truth(tmp_path):
    annos = kitti.read_label(_write(tmp_path, GT_TEXT))
    kitti.write_label(tmp_path / "out.txt", annos)
    again = kitti.read_label(tmp_path / "out.txt")
    assert set(again) == set(annos)
    for key in annos:
        np.testing.assert_array_equal(again[key], annos[key])
    assert len((tmp_path / "out.txt").read_text().splitlines()[0].split()) == 15


def test_round_trip_detections(tmp_path):
    annos = kitti.read_label(_write(tmp_path, GT_TEXT))
    annos["score"] = np.array([0.9876, 0.5, 0.0123])
    kitti.write_label(tmp_path / "det.txt", annos)
    lines = (tmp_path / "det.txt").read_text().splitlines()
    assert lines[0].split()[-1] == "0.9876" and len(lines[0].split()) == 16
    again = kitti.read_label(tmp_path / "det.txt")
    np.testing.assert_array_equal(again["score"], [0.9876, 0.5, 0.0123])
    np.testing.assert_array_equal(again["bbox"], annos["bbox"])


def test_empty_file(tmp_path):
    annos = kitti.read_label(_write(tmp_path, "\n\n"))
    assert annos["name"].shape == (0,) and annos["bbox"].shape == (0, 4)
    assert annos["dimensions"].shape == (0, 3) and annos["location"].shape == (0, 3)
    assert "score" not in annos
    kitti.write_label(tmp_path / "empty.txt", annos)
    assert (tmp_path / "empty.txt").read_text() == ""


CAR = "Car 0.00 0 -1.58 587.01 173.33 614.12 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59"


@pytest.mark.parametrize("text, line, message", [
    ("Car 0 0 0 1 2 3 4 1 1 1 1 1\n", 1, "got 13"),
    (CAR + "\n" + CAR + " 0.5\n", 2, "cannot be mixed"),
    ("\n" + CAR.replace("587.01", "abc") + "\n", 2, "non-numeric field 'abc'"),
    (CAR + "\n" + CAR.replace("Car", "Bus") + "\n", 2, "unknown object type 'Bus'"),
    (CAR.replace("614.12", "500.00") + "\n", 1, "negative box size"),
    (CAR.replace(" 0 -1.58", " 0.5 -1.58") + "\n", 1, "occluded must be an integer"),
    (CAR.replace("46.70", "nan") + "\n", 1, "not a finite number"),
])
def test_malformed_lines_name_file_and_line(tmp_path, text, line, message):
    path = _write(tmp_path, text)
    with pytest.raises(UserError) as err:
        kitti.read_label(path)
    assert f"{path}:{line}:" in str(err.value)
    assert message in str(err.value)


def test_missing_label_file(tmp_path):
    with pytest.raises(UserError, match="label file not found"):
        kitti.read_label(tmp_path / "nope.txt")


def test_read_split(tmp_path):
    (tmp_path / "ImageSets").mkdir()
    (tmp_path / "ImageSets" / "val.txt").write_text("000003\n000001\n\n000007\n")
    assert kitti.read_split(tmp_path, "val") == ["000003", "000001", "000007"]
    with pytest.raises(UserError, match="train.txt"):
        kitti.read_split(tmp_path, "train")
    (tmp_path / "ImageSets" / "bad.txt").write_text("000001\n000002 000003\n")
    with pytest.raises(UserError, match=r"bad.txt:2:"):
        kitti.read_split(tmp_path, "bad")


def test_paths_and_class_maps(tmp_path):
    assert kitti.image_path("/k", "000042") == "/k/training/image_2/000042.png"
    assert kitti.label_path("/k", "000042") == "/k/training/label_2/000042.txt"
    assert kitti.class_names("kitti3") == ["Car", "Pedestrian", "Cyclist"]
    assert kitti.class_names("kitti8")[1] == "Van" and len(kitti.class_names("kitti8")) == 8
    with pytest.raises(UserError, match="kitti5"):
        kitti.class_names("kitti5")


def test_difficulty_and_stats():
    # heights 50 / 30 / 30 / 20; occlusion 0 / 1 / 2 / 0; truncation 0.1 / 0.2 / 0.4 / 0
    annos = kitti.empty_annos()
    annos.update(
        name=np.array(["Car", "Car", "Pedestrian", "Car"]),
        bbox=np.array([[0, 0, 10, 50], [0, 0, 10, 30], [0, 10, 5, 40], [0, 0, 10, 20]], float),
        occluded=np.array([0, 1, 2, 0]),
        truncated=np.array([0.1, 0.2, 0.4, 0.0]),
    )
    assert list(kitti.difficulty_mask(annos, "Easy")) == [True, False, False, False]
    assert list(kitti.difficulty_mask(annos, "Moderate")) == [True, True, False, False]
    assert list(kitti.difficulty_mask(annos, "Hard")) == [True, True, True, False]
    stats = kitti.label_stats([annos, kitti.empty_annos()])
    assert stats["images"] == 2
    assert stats["classes"]["Car"] == {"objects": 3, "Easy": 1, "Moderate": 2, "Hard": 2,
                                       "truncated": 2, "occluded": 1}
    assert stats["classes"]["Pedestrian"]["Hard"] == 1
    assert sorted(stats["heights"].tolist()) == [20, 30, 30, 50]


def test_data_stats_and_evaluator_agree_at_the_height_boundaries():
    # devkit rule: a box exactly min_height tall (40 px Easy, 25 px Moderate / Hard) is too small
    from clock_deploy.eval.kitti import kitti_eval
    heights = [24.5, 25.0, 25.5, 39.0, 40.0, 40.5, 41.0]
    annos = kitti.empty_annos()
    annos.update(name=np.array(["Car"] * len(heights)),
                 bbox=np.array([[10.0 * i, 0, 10.0 * i + 8, h] for i, h in enumerate(heights)]),
                 occluded=np.zeros(len(heights), np.int64), truncated=np.zeros(len(heights)))
    row = kitti.label_stats([annos])["classes"]["Car"]
    assert (row["Easy"], row["Moderate"], row["Hard"]) == (2, 5, 5)  # 40.5, 41 / everything above 25
    no_detections = {"name": np.zeros(0, "<U14"), "bbox": np.zeros((0, 4)), "score": np.zeros(0)}
    num_gt = kitti_eval([annos], [no_detections], classes=("Car",))["Car"]["num_gt"]
    assert num_gt == {"easy": row["Easy"], "moderate": row["Moderate"], "hard": row["Hard"]}
