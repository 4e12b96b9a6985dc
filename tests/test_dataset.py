import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from clock_deploy.config import DataConfig
from clock_deploy.data import kitti
from clock_deploy.data.commands import data as data_cli
from clock_deploy.data.dataset import CocoDetection, KittiDetection, build_dataset, collate_fn
from clock_deploy.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, Compose, Normalize, RandomHorizontalFlip,
                                          Resize, ToTensor)
from clock_deploy.errors import UserError

# 100 x 200 image; the Car box is painted pure red
LABELS = """\
Car 0.00 0 0.00 20.00 10.00 60.00 50.00 1.50 1.60 3.90 0.00 1.65 10.00 0.00
Van 0.00 0 0.00 100.00 20.00 140.00 60.00 2.00 1.90 5.00 0.00 1.65 10.00 0.00
Pedestrian 0.00 1 0.00 150.00 30.00 170.00 90.00 1.70 0.60 0.80 0.00 1.65 10.00 0.00
DontCare -1 -1 -10 0.00 0.00 10.00 5.00 -1 -1 -1 -1000 -1000 -1000 -10
"""


@pytest.fixture
def tiny_kitti(tmp_path):
    for folder in ("training/image_2", "training/label_2", "ImageSets"):
        (tmp_path / folder).mkdir(parents=True)
    image = np.full((100, 200, 3), 128, np.uint8)
    image[10:50, 20:60] = (255, 0, 0)
    Image.fromarray(image).save(kitti.image_path(tmp_path, "000000"))
    (tmp_path / "training/label_2/000000.txt").write_text(LABELS)
    Image.fromarray(np.zeros((100, 200, 3), np.uint8)).save(kitti.image_path(tmp_path, "000001"))
    (tmp_path / "training/label_2/000001.txt").write_text("")
    (tmp_path / "ImageSets/val.txt").write_text("000000\n000001\n")
    return tmp_path


def _unnormalize(image):
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return image * std + mean


def test_kitti3_targets(tiny_kitti):
    ds = KittiDetection(tiny_kitti, "val", "kitti3")
    assert len(ds) == 2 and ds.classes == ["Car", "Pedestrian", "Cyclist"] and ds.frame_ids == ["000000", "000001"]
    image, target = ds[0]
    assert image.shape == (3, 100, 200) and image.dtype == torch.float32
    # Car (20,10,60,50) and Pedestrian (150,30,170,90) as cx, cy, w, h / (200, 100); Van and DontCare dropped
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.2, 0.3, 0.2, 0.4], [0.8, 0.6, 0.1, 0.6]]))
    assert target["labels"].tolist() == [0, 1] and target["labels"].dtype == torch.int64
    assert target["image_id"] == 0 and target["frame_id"] == "000000"
    assert target["orig_size"].tolist() == [100, 200] and target["size"].tolist() == [100, 200]
    torch.testing.assert_close(_unnormalize(image)[:, 30, 40], torch.tensor([1.0, 0.0, 0.0]))
    assert list(ds.gt_annos(0)["name"]) == ["Car", "Van", "Pedestrian", "DontCare"]
    assert ds.image_size(0) == (100, 200)
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["image_id"] == 1


def test_kitti8_keeps_van(tiny_kitti):
    _, target = KittiDetection(tiny_kitti, "val", "kitti8")[0]
    assert target["labels"].tolist() == [0, 1, 3]  # Car, Van, Pedestrian in KITTI_CLASSES order
    torch.testing.assert_close(target["boxes"][1], torch.tensor([0.6, 0.4, 0.2, 0.4]))


def test_flip_and_resize(tiny_kitti):
    flip = Compose([RandomHorizontalFlip(1.0), Resize(50, 100), ToTensor(), Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    image, target = KittiDetection(tiny_kitti, "val", "kitti3", flip)[0]
    assert image.shape == (3, 50, 100)
    # Car x1, x2 = 20, 60 -> 200 - 60, 200 - 20 = 140, 180 -> cx 160 / 200
    torch.testing.assert_close(target["boxes"][0], torch.tensor([0.8, 0.3, 0.2, 0.4]))
    torch.testing.assert_close(target["boxes"][1], torch.tensor([0.2, 0.6, 0.1, 0.6]))
    assert target["size"].tolist() == [50, 100] and target["orig_size"].tolist() == [100, 200]
    rgb = _unnormalize(image)
    torch.testing.assert_close(rgb[:, 15, 80], torch.tensor([1.0, 0.0, 0.0]), atol=1e-2, rtol=0)  # red moved right
    assert rgb[0, 15, 20] < 0.6  # and left the left side


def test_flip_on_arrays_matches_pil():
    array = np.zeros((4, 6, 3), np.uint8)
    array[:, 0] = 255
    target = {"boxes": torch.tensor([[0.0, 1.0, 2.0, 3.0]])}
    out_array, t1 = RandomHorizontalFlip(1.0)(array, target)
    out_pil, t2 = RandomHorizontalFlip(1.0)(Image.fromarray(array), target)
    np.testing.assert_array_equal(out_array, np.asarray(out_pil))
    assert out_array[0, 5, 0] == 255 and out_array[0, 0, 0] == 0
    assert t1["boxes"].tolist() == t2["boxes"].tolist() == [[4.0, 1.0, 6.0, 3.0]]
    unchanged, t3 = RandomHorizontalFlip(0.0)(array, target)
    assert unchanged is array and t3["boxes"].tolist() == [[0.0, 1.0, 2.0, 3.0]]


def test_collate_and_build_dataset(tiny_kitti):
    cfg = DataConfig(root=str(tiny_kitti), img_size=[64, 128], hflip=0.5)
    ds = build_dataset(cfg, "val", train=True)
    images, targets = collate_fn([ds[0], ds[1]])
    assert images.shape == (2, 3, 64, 128)
    assert [t["frame_id"] for t in targets] == ["000000", "000001"]
    assert targets[0]["boxes"].shape == (2, 4) and targets[1]["boxes"].shape == (0, 4)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_fn)
    batch_images, batch_targets = next(iter(loader))
    assert batch_images.shape == (2, 3, 64, 128) and len(batch_targets) == 2


def test_missing_roots_and_files(tmp_path, tiny_kitti):
    default = DataConfig(root=str(tmp_path / "data" / "synth_kitti"))
    with pytest.raises(UserError, match="clock-deploy data synth --out .*synth_kitti --num-images 400"):
        build_dataset(default, "train", train=True)
    with pytest.raises(UserError, match="does not exist$"):
        build_dataset(DataConfig(root=str(tmp_path / "kitti_real")), "train", train=True)
    (tiny_kitti / "ImageSets/bad.txt").write_text("000000\n000009\n")
    with pytest.raises(UserError, match="000009.png is missing"):
        KittiDetection(tiny_kitti, "bad")


def test_coco_dataset(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.fromarray(np.zeros((100, 200, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    coco = {
        "images": [{"id": 7, "file_name": "a.png", "height": 100, "width": 200}],
        "categories": [{"id": 3, "name": "Cyclist"}, {"id": 1, "name": "Car"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [20, 10, 40, 40], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 1},
            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [100, 50, 20, 50]},
        ],
    }
    (tmp_path / "annotations" / "val.json").write_text(json.dumps(coco))
    ds = CocoDetection(tmp_path, "val")
    assert ds.classes == ["Car", "Cyclist"] and ds.frame_ids == ["a"] and ds.image_ids == [7]
    _, target = ds[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.2, 0.3, 0.2, 0.4], [0.55, 0.75, 0.1, 0.5]]))
    assert target["labels"].tolist() == [1, 0]  # the crowd box is not a target
    assert ds.image_size(0) == (100, 200) and len(ds.annotations[0]) == 3
    gt = ds.gt_annos(0)  # kitti.read_label format for the evaluator
    assert list(gt["name"]) == ["Cyclist", "DontCare", "Car"]
    np.testing.assert_array_equal(gt["bbox"], [[20, 10, 60, 50], [0, 0, 10, 10], [100, 50, 120, 100]])
    assert gt["occluded"].tolist() == [0, 0, 0] and gt["dimensions"].shape == (3, 3)
    (tmp_path / "annotations" / "bad.json").write_text('{"images": [],\n "annotations": [,]}')
    with pytest.raises(UserError, match="bad.json:2: not valid JSON"):
        CocoDetection(tmp_path, "bad")


def test_cli_synth_stats_convert(tmp_path):
    runner = CliRunner()
    root = tmp_path / "synth"
    result = runner.invoke(data_cli, ["synth", "--out", str(root), "--num-images", "6", "--height", "94",
                                      "--width", "310", "--val-fraction", "0.5", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "wrote 6 images" in result.output and "train 3, val 3" in result.output
    assert len(kitti.read_split(root, "val")) == 3

    result = runner.invoke(data_cli, ["stats", str(root), "--split", "val"])
    assert result.exit_code == 0, result.output
    annos = [kitti.read_label(kitti.label_path(root, f)) for f in kitti.read_split(root, "val")]
    cars = sum(int((a["name"] == "Car").sum()) for a in annos)
    car_row = next(line for line in result.output.splitlines() if "Car" in line)
    assert car_row.split("│")[2].strip() == str(cars)
    assert "3 images" in result.output and "box heights" in result.output

    out = tmp_path / "val.json"
    result = runner.invoke(data_cli, ["convert", "--kitti", str(root), "--split", "val", "--out", str(out)])
    assert result.exit_code == 0, result.output
    coco = json.loads(out.read_text())
    assert [img["frame_id"] for img in coco["images"]] == kitti.read_split(root, "val")
    assert coco["images"][0]["height"] == 94 and coco["images"][0]["width"] == 310
    assert [c["name"] for c in coco["categories"]] == ["Car", "Pedestrian", "Cyclist"]
