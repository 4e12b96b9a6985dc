"""Torch detection datasets (KITTI layout or COCO json) with one target format for every model.

`dataset[i]` returns (image, target):
    image     float32 [3, H, W], resized to the network input and normalized (transforms.py)
    target    boxes     float32 [n, 4] cx, cy, w, h relative to the image (in [0, 1])
              labels    int64 [n] indices into `dataset.classes`
              image_id  int, position of the image in the split
              frame_id  str, KITTI frame id / COCO file name stem
              orig_size int64 [2] H, W of the image file
              size      int64 [2] H, W of the network input

The split itself (frame ids, image paths, ground truth, objects) is read by the torch-free readers
of annotations.py, which these datasets extend with images and transforms.
"""
import os

import torch

from clock_deploy.config import DataConfig
from clock_deploy.data.annotations import CocoSplit, KittiSplit
from clock_deploy.data.images import read_rgb
from clock_deploy.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Compose, Normalize, ToTensor, build_transforms
from clock_deploy.errors import UserError


class _Detection(torch.utils.data.Dataset):
    """Shared __getitem__ over a split reader's `frame_ids`, `image_path(i)` and `objects(i)`."""

    def __init__(self, transforms):
        # without transforms the image keeps its size but still gets the common tensor format
        self.transforms = transforms or Compose([ToTensor(), Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __getitem__(self, i):
        image = read_rgb(self.image_path(i))
        boxes, labels = self.objects(i)
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


class KittiDetection(KittiSplit, _Detection):
    """A KITTI split (annotations.KittiSplit) as a torch Dataset."""

    def __init__(self, root, split, classes="kitti3", transforms=None):
        KittiSplit.__init__(self, root, split, classes)
        _Detection.__init__(self, transforms)


class CocoDetection(CocoSplit, _Detection):
    """A COCO split (annotations.CocoSplit) as a torch Dataset."""

    def __init__(self, root, split, transforms=None):
        CocoSplit.__init__(self, root, split)
        _Detection.__init__(self, transforms)


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
