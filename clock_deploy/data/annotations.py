"""Torch-free readers of a dataset split: frame ids, image paths and sizes, the ground truth in the
kitti.read_label format (for the evaluator) and the training objects (boxes, labels).

data/dataset.py wraps them into torch Datasets for training; evaluating a deployed model (bench jobs,
export parity) reads them directly, so an ONNX or TensorRT model is evaluated without torch.

KITTI: see kitti.py for the layout; objects outside the class map (DontCare, and Van,
Person_sitting, ... for "kitti3") are not training objects. `gt_annos(i)` gives the raw labels,
DontCare included, for evaluation.

COCO layout:
    root/annotations/<split>.json    images, annotations (bbox = x, y, w, h px), categories
    root/images/<file_name>
Classes are the json categories ordered by id; crowd annotations are not training objects (they
are DontCare regions in `gt_annos`).
"""
import os

import numpy as np

from clock_deploy.data import kitti
from clock_deploy.data.coco import load_coco
from clock_deploy.data.images import image_size
from clock_deploy.errors import UserError


class KittiSplit:
    """Frames of root/ImageSets/<split>.txt; training objects restricted to class map `classes`."""

    def __init__(self, root, split, classes="kitti3"):
        self.root = os.fspath(root)
        self.split = split
        self.classes = kitti.class_names(classes)
        self.frame_ids = kitti.read_split(self.root, split)
        for frame_id in self.frame_ids:  # fail now, not in a DataLoader worker mid-epoch
            for path in (kitti.image_path(self.root, frame_id), kitti.label_path(self.root, frame_id)):
                if not os.path.isfile(path):
                    raise UserError(f"{path} is missing (frame {frame_id} of split '{split}')")

    def __len__(self):
        return len(self.frame_ids)

    def image_path(self, i):
        return kitti.image_path(self.root, self.frame_ids[i])

    def image_size(self, i):
        """(H, W) of image i, read from the file header only."""
        return image_size(self.image_path(i))

    def gt_annos(self, i):
        """Raw labels of frame i (all classes, DontCare included), as kitti.read_label returns them."""
        return kitti.read_label(kitti.label_path(self.root, self.frame_ids[i]))

    def objects(self, i):
        """(boxes [n, 4] x1 y1 x2 y2 px, labels [n] indices into `classes`) to train on."""
        annos = self.gt_annos(i)
        keep = np.isin(annos["name"], self.classes)
        labels = np.array([self.classes.index(n) for n in annos["name"][keep]], dtype=np.int64)
        return annos["bbox"][keep], labels


class CocoSplit:
    """Images of root/annotations/<split>.json; classes are its categories ordered by id."""

    def __init__(self, root, split):
        self.root = os.fspath(root)
        self.split = split
        self.ann_file = os.path.join(self.root, "annotations", f"{split}.json")
        data = load_coco(self.ann_file)
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.classes = [c["name"] for c in categories]
        label_of = {c["id"]: i for i, c in enumerate(categories)}
        self.images = data["images"]
        self.image_ids = [img["id"] for img in self.images]
        self.frame_ids = [os.path.splitext(img["file_name"])[0] for img in self.images]
        position = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self.annotations = [[] for _ in self.images]
        for ann in data["annotations"]:
            if ann["image_id"] not in position:
                raise UserError(f"{self.ann_file}: annotation {ann.get('id')} refers to unknown image "
                                f"{ann['image_id']}")
            if ann["category_id"] not in label_of:
                raise UserError(f"{self.ann_file}: annotation {ann.get('id')} has unknown category "
                                f"{ann['category_id']}")
            self.annotations[position[ann["image_id"]]].append(ann)
        self._label_of = label_of

    def __len__(self):
        return len(self.frame_ids)

    def image_path(self, i):
        return os.path.join(self.root, "images", self.images[i]["file_name"])

    def image_size(self, i):
        """(H, W) of image i: the json's, else read from the file header."""
        img = self.images[i]
        if "height" in img and "width" in img:
            return int(img["height"]), int(img["width"])
        return image_size(self.image_path(i))

    def gt_annos(self, i):
        """Annotations of image i in the kitti.read_label format, so one evaluator serves both layouts.

        Crowd regions become DontCare; truncation / occlusion are unknown in COCO and set to 0;
        the 3D fields get KITTI's "unknown" values. The raw dicts are in `self.annotations[i]`.
        """
        anns = self.annotations[i]
        n = len(anns)
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        names = ["DontCare" if a.get("iscrowd", 0) else self.classes[self._label_of[a["category_id"]]] for a in anns]
        return {
            "name": np.array(names, dtype=str).reshape(n),
            "truncated": np.zeros(n),
            "occluded": np.zeros(n, dtype=np.int64),
            "alpha": np.full(n, -10.0),
            "bbox": boxes,
            "dimensions": np.full((n, 3), -1.0),
            "location": np.full((n, 3), -1000.0),
            "rotation_y": np.full(n, -10.0),
        }

    def objects(self, i):
        """(boxes [n, 4] x1 y1 x2 y2 px, labels [n] indices into `classes`) to train on."""
        anns = [a for a in self.annotations[i] if not a.get("iscrowd", 0)]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # x, y, w, h -> x1, y1, x2, y2
        labels = np.array([self._label_of[a["category_id"]] for a in anns], dtype=np.int64)
        return boxes, labels


def open_split(root, data_format, split, classes="kitti3"):
    """The reader of `split` of a "kitti" or "coco" dataset at `root` (`classes`: KITTI class map)."""
    if data_format == "kitti":
        return KittiSplit(root, split, classes)
    if data_format == "coco":
        return CocoSplit(root, split)
    raise UserError(f"data.format must be 'kitti' or 'coco', got '{data_format}'")
