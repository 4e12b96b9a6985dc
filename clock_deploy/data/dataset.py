"""Detection datasets (KITTI layout or COCO json) with one target format for every model.

`dataset[i]` returns (image, target):
    image     float32 [3, H, W], resized to the network input and normalized (transforms.py)
    target    boxes     float32 [n, 4] cx, cy, w, h relative to the image (in [0, 1])
              labels    int64 [n] indices into `dataset.classes`
              image_id  int, position of the image in the split
              frame_id  str, KITTI frame id / COCO file name stem
              orig_size int64 [2] H, W of the image file
              size      int64 [2] H, W of the network input

KITTI: see kitti.py for the layout; objects outside the class map (DontCare, and Van,
Person_sitting, ... for "kitti3") are not targets. `gt_annos(i)` gives the raw labels,
DontCare included, for evaluation.

COCO layout:
    root/annotations/<split>.json    images, annotations (bbox = x, y, w, h px), categories
    root/images/<file_name>
Classes are the json categories ordered by id; crowd annotations are not targets (they are
DontCare regions in `gt_annos`).
"""
import os

import numpy as np
import torch

from clock_deploy.config import DataConfig
from clock_deploy.data import kitti
from clock_deploy.data.coco import load_coco
from clock_deploy.data.images import image_size, read_rgb
from clock_deploy.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Compose, Normalize, ToTensor, build_transforms
from clock_deploy.errors import UserError


class _Detection(torch.utils.data.Dataset):
    """Shared __getitem__: subclasses provide `frame_ids`, `image_path(i)` and `_objects(i)`."""

    def __init__(self, transforms):
        # without transforms the image keeps its size but still gets the common tensor format
        self.transforms = transforms or Compose([ToTensor(), Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self):
        return len(self.frame_ids)

    def image_size(self, i):
        """(H, W) of image i, read from the file header only."""
        return image_size(self.image_path(i))

    def __getitem__(self, i):
        image = read_rgb(self.image_path(i))
        boxes, labels = self._objects(i)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # no degenerate boxes
        target = {
            "boxes": torch.as_tensor(boxes[keep], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(labels[keep], dtype=torch.int64),
            "image_id": i,
            "frame_id": self.frame_ids[i],
            "orig_size": torch.tensor([image.height, image.width], dtype=torch.int64),
            "size": torch.tensor([image.height, image.width], dtype=torch.int64),
        }
        return self.transforms(image, target)


class KittiDetection(_Detection):
    """Frames of root/ImageSets/<split>.txt with targets restricted to class map `classes`."""

    def __init__(self, root, split, classes="kitti3", transforms=None):
        super().__init__(transforms)
        self.root = os.fspath(root)
        self.split = split
        self.classes = kitti.class_names(classes)
        self.frame_ids = kitti.read_split(self.root, split)
        for frame_id in self.frame_ids:  # fail now, not in a DataLoader worker mid-epoch
            for path in (kitti.image_path(self.root, frame_id), kitti.label_path(self.root, frame_id)):
                if not os.path.isfile(path):
                    raise UserError(f"{path} is missing (frame {frame_id} of split '{split}')")

    def image_path(self, i):
        return kitti.image_path(self.root, self.frame_ids[i])

    def gt_annos(self, i):
        """Raw labels of frame i (all classes, DontCare included), as kitti.read_label returns them."""
        return kitti.read_label(kitti.label_path(self.root, self.frame_ids[i]))

    def _objects(self, i):
        annos = self.gt_annos(i)
        keep = np.isin(annos["name"], self.classes)
        labels = np.array([self.classes.index(n) for n in annos["name"][keep]], dtype=np.int64)
        return annos["bbox"][keep], labels


class CocoDetection(_Detection):
    """Images of root/annotations/<split>.json; classes are its categories ordered by id."""

    def __init__(self, root, split, transforms=None):
        super().__init__(transforms)
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

    def image_path(self, i):
        return os.path.join(self.root, "images", self.images[i]["file_name"])

    def image_size(self, i):
        img = self.images[i]
        if "height" in img and "width" in img:
            return int(img["height"]), int(img["width"])
        return super().image_size(i)

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

    def _objects(self, i):
        anns = [a for a in self.annotations[i] if not a.get("iscrowd", 0)]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # x, y, w, h -> x1, y1, x2, y2
        labels = np.array([self._label_of[a["category_id"]] for a in anns], dtype=np.int64)
        return boxes, labels


def collate_fn(batch):
    """[(image, target), ...] -> (images [B, 3, H, W], [target, ...]); all images share one size."""
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


def _missing_root_message(cfg_data):
    message = f"data.root '{cfg_data.root}' does not exist"
    synthetic = os.path.normpath(cfg_data.root) == os.path.normpath(DataConfig().root)
    if cfg_data.format == "kitti" and (synthetic or "synth" in os.path.basename(os.path.normpath(cfg_data.root))):
        s = cfg_data.synth
        message += (f"; generate the synthetic data first: clock-deploy data synth --out {cfg_data.root} "
                    f"--num-images {s.num_images} --seed {s.seed} --height {s.height} --width {s.width} "
                    f"--val-fraction {s.val_fraction} --max-objects {s.max_objects}")
    return message


def build_dataset(cfg_data, split, train):
    """Dataset of `split` with the training or evaluation transforms of `cfg_data` (a DataConfig)."""
    if not os.path.isdir(cfg_data.root):
        raise UserError(_missing_root_message(cfg_data))
    transforms = build_transforms(cfg_data, train)
    if cfg_data.format == "kitti":
        return KittiDetection(cfg_data.root, split, cfg_data.classes, transforms)
    if cfg_data.format == "coco":
        return CocoDetection(cfg_data.root, split, transforms)
    raise UserError(f"data.format must be 'kitti' or 'coco', got '{cfg_data.format}'")
