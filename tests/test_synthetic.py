import os

import numpy as np
import pytest
from PIL import Image

from clock_deploy.data import kitti, synthetic
from clock_deploy.errors import UserError


@pytest.fixture(scope="module")
def synth40(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth40")
    summary = synthetic.generate(root, 40, seed=3, progress=False)
    annos = [kitti.read_label(kitti.label_path(root, f)) for f in kitti.read_split(root, "trainval")]
    return root, summary, annos


def _files(root):
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    args = dict(height=94, width=310, progress=False)
    synthetic.generate(tmp_path / "a", 4, seed=7, **args)
    synthetic.generate(tmp_path / "b", 4, seed=7, **args)
    synthetic.generate(tmp_path / "c", 4, seed=8, **args)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert "training/image_2/000003.png" in a and "training/label_2/000003.txt" in a
    assert a == b
    for name in ("training/image_2/000000.png", "training/label_2/000000.txt"):
        assert a[name] != c[name]


def test_image_does_not_depend_on_dataset_size(tmp_path):
    synthetic.generate(tmp_path / "small", 2, seed=1, height=94, width=310, progress=False)
    synthetic.generate(tmp_path / "big", 5, seed=1, height=94, width=310, progress=False)
    for sub in ("training/image_2/000001.png", "training/label_2/000001.txt"):
        assert (tmp_path / "small" / sub).read_bytes() == (tmp_path / "big" / sub).read_bytes()


def test_returned_annos_equal_written_labels(tmp_path):
    image, annos = synthetic.render_scene(np.random.default_rng([0, 5]), 188, 620, 8)
    assert image.shape == (188, 620, 3) and image.dtype == np.uint8
    kitti.write_label(tmp_path / "x.txt", annos)
    again = kitti.read_label(tmp_path / "x.txt")
    for key in annos:
        np.testing.assert_array_equal(again[key], annos[key])


def test_layout_and_splits(synth40):
    root, summary, _ = synth40
    train, val = kitti.read_split(root, "train"), kitti.read_split(root, "val")
    trainval = kitti.read_split(root, "trainval")
    assert len(val) == 10 and len(train) == 30
    assert not set(train) & set(val) and sorted(train + val) == trainval
    assert trainval == [f"{i:06d}" for i in range(40)]
    assert summary["splits"] == {"train": 30, "val": 10, "trainval": 40}
    with Image.open(kitti.image_path(root, "000039")) as image:
        assert image.size == (620, 188) and image.mode == "RGB"


def test_labels_cover_kitti_cases(synth40):
    _, summary, all_annos = synth40
    annos = {k: np.concatenate([a[k] for a in all_annos]) for k in all_annos[0]}
    names = set(annos["name"])
    assert {"Car", "Pedestrian", "Cyclist", "Van", "Person_sitting", "DontCare"} <= names
    assert names <= set(kitti.KITTI_CLASSES) | {"DontCare"}
    objects = annos["name"] != "DontCare"
    box = annos["bbox"]
    assert (box[:, 0] >= 0).all() and (box[:, 1] >= 0).all()
    assert (box[:, 2] <= 620).all() and (box[:, 3] <= 188).all()
    assert (box[:, 2] > box[:, 0]).all() and (box[:, 3] > box[:, 1]).all()
    trunc = annos["truncated"][objects]
    assert (trunc >= 0).all() and (trunc <= synthetic.MAX_TRUNCATION).all()
    assert (trunc > 0.05).sum() >= 5
    occluded = annos["occluded"][objects]
    assert set(occluded.tolist()) == {0, 1, 2}
    # DontCare regions carry KITTI's placeholder values
    assert (annos["truncated"][~objects] == -1).all() and (annos["occluded"][~objects] == -1).all()
    heights = summary["stats"]["heights"]
    assert heights.min() < 25 and heights.max() > 100
    assert ((heights >= 20) & (heights <= 120)).mean() > 0.6
    for name in ("Car", "Pedestrian", "Cyclist"):
        row = summary["stats"]["classes"][name]
        assert 0 < row["Easy"] <= row["Moderate"] <= row["Hard"] <= row["objects"]


def test_far_objects_sit_higher(synth40):
    # perspective: small (far) objects have their bottom closer to the horizon (top of the road)
    _, _, all_annos = synth40
    bottoms, heights = [], []
    for annos in all_annos:
        keep = (annos["name"] == "Car") & (annos["truncated"] == 0)
        bottoms += annos["bbox"][keep, 3].tolist()
        heights += (annos["bbox"][keep, 3] - annos["bbox"][keep, 1]).tolist()
    assert np.corrcoef(bottoms, heights)[0, 1] > 0.8


def test_objects_are_painted_where_labelled(tmp_path):
    # an unoccluded, untruncated object differs from the road / ground around it
    synthetic.generate(tmp_path, 3, seed=0, progress=False)
    checked = 0
    for frame_id in kitti.read_split(tmp_path, "trainval"):
        image = np.asarray(Image.open(kitti.image_path(tmp_path, frame_id))).astype(float)
        annos = kitti.read_label(kitti.label_path(tmp_path, frame_id))
        for name, box, occ, trunc in zip(annos["name"], annos["bbox"], annos["occluded"], annos["truncated"]):
            if name == "DontCare" or occ or trunc or box[3] - box[1] < 30:
                continue
            x1, y1, x2, y2 = box.astype(int)
            inside = image[y1:y2, x1:x2].reshape(-1, 3)
            assert inside.std(axis=0).max() > 20  # a drawn object, not flat background
            checked += 1
    assert checked >= 2


def test_regenerate_removes_stale_frames(tmp_path):
    synthetic.generate(tmp_path, 5, height=94, width=310, progress=False)
    synthetic.generate(tmp_path, 3, height=94, width=310, progress=False)
    assert sorted(os.listdir(tmp_path / "training" / "image_2")) == ["000000.png", "000001.png", "000002.png"]
    assert len(os.listdir(tmp_path / "training" / "label_2")) == 3


def test_refuses_foreign_directory_and_bad_args(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "notes.txt").write_text("real data")
    with pytest.raises(UserError, match="not written by"):
        synthetic.generate(tmp_path / "real", 2, progress=False)
    with pytest.raises(UserError, match="num_images must be at least 1"):
        synthetic.generate(tmp_path / "x", 0, progress=False)
    with pytest.raises(UserError, match=r"val_fraction must be in \[0, 1\)"):
        synthetic.generate(tmp_path / "x", 4, val_fraction=1.0, progress=False)
