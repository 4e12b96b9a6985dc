"""KITTI annotations <-> COCO json (ground truth and detection results).

COCO has no notion of KITTI's "ignored" objects, so `kitti_to_coco` expresses them with the one
ignore mechanism COCO evaluation has, crowd regions (iscrowd=1): a detection that overlaps a crowd
region of its category (intersection / detection area >= the IoU threshold) is neither a true nor
a false positive.
- DontCare regions become one crowd annotation per category, so detections of any class inside
  them are not false positives (KITTI does the same for every evaluated class).
- Neighbour classes become crowd annotations of the class they neighbour when that class is
  evaluated but they are not: Van for Car, Person_sitting for Pedestrian (KITTI neither rewards
  nor penalizes a Car detection on a Van). With the 8-class map they are ordinary annotations.
Objects of other classes (e.g. Truck with the 3-class map) are dropped: a detection on them is a
false positive, as in KITTI.
"""
import math
import os

import numpy as np

from clock_deploy.data.kitti import MAX_COORDINATE, check_frame_id
from clock_deploy.errors import UserError
from clock_deploy.io import read_json

NEIGHBOUR_OF = {"Van": "Car", "Person_sitting": "Pedestrian"}
DONTCARE = "DontCare"


def _xywh(box):
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def kitti_to_coco(frames, classes):
    """COCO ground-truth dict from [(frame_id, height, width, annos)]; image ids are 1..N in order.

    Category ids are 1..K in the order of `classes`.
    """
    category_id = {name: i + 1 for i, name in enumerate(classes)}
    images, annotations = [], []

    def add(image_id, cat, box, iscrowd):
        bbox = _xywh(box)
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                            "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": iscrowd})

    for image_id, (frame_id, height, width, annos) in enumerate(frames, start=1):
        images.append({"id": image_id, "file_name": f"{frame_id}.png", "frame_id": str(frame_id),
                       "height": int(height), "width": int(width)})
        for name, box in zip(annos["name"], annos["bbox"]):
            if name in category_id:
                add(image_id, category_id[name], box, 0)
            elif name == DONTCARE:
                for cat in category_id.values():
                    add(image_id, cat, box, 1)
            elif NEIGHBOUR_OF.get(name) in category_id:
                add(image_id, category_id[NEIGHBOUR_OF[name]], box, 1)
    categories = [{"id": i, "name": name} for name, i in category_id.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def detections_to_coco(image_ids, detections, classes):
    """COCO results list from per-image detection annos (name, bbox x1y1x2y2, score).

    Detections whose name is not in `classes` are dropped.
    """
    category_id = {name: i + 1 for i, name in enumerate(classes)}
    results = []
    for image_id, annos in zip(image_ids, detections):
        boxes = np.asarray(annos["bbox"], np.float64).reshape(-1, 4)
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
        for name, bbox, score in zip(annos["name"], xywh, np.asarray(annos["score"], np.float64).tolist()):
            if name in category_id:
                results.append({"image_id": int(image_id), "category_id": category_id[name],
                                "bbox": bbox, "score": score})
    return results


def load_coco(path):
    """Read a COCO ground-truth json (images, annotations, categories)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"COCO json not found: {path}")
    data = read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: a COCO json must be an object, got {type(data).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise UserError(f"{path}: COCO json lacks {missing}")
    _check_coco(data, path)
    return data


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_entries(data, key, path, required):
    """data[key] is a list of objects that each have the `required` {field: check} fields."""
    if not isinstance(data[key], list):
        raise UserError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    for i, entry in enumerate(data[key]):
        if not isinstance(entry, dict):
            raise UserError(f"{path}: {key}[{i}] must be an object, got {type(entry).__name__}")
        for name, (check, expected) in required.items():
            if name not in entry or not check(entry[name]):
                raise UserError(f"{path}: {key}[{i}].{name} must be {expected}, got {entry.get(name)!r}")


def _is_box(box):
    return (isinstance(box, list) and len(box) == 4 and all(_is_number(v) and abs(v) <= MAX_COORDINATE for v in box)
            and box[2] >= 0 and box[3] >= 0)


def _check_coco(data, path):
    """Types and ranges of every field the datasets and evaluators read, so bad input stops here."""
    _check_entries(data, "images", path, {"id": (_is_int, "an integer"),
                                          "file_name": (lambda v: isinstance(v, str), "a string")})
    _check_entries(data, "categories", path, {"id": (_is_int, "an integer"),
                                              "name": (lambda v: isinstance(v, str), "a string")})
    _check_entries(data, "annotations", path, {"image_id": (_is_int, "an integer"),
                                               "category_id": (_is_int, "an integer"),
                                               "bbox": (_is_box, "[x, y, w, h] with w, h >= 0, "
                                                                 f"|v| <= {MAX_COORDINATE:g}")})
    seen = set()
    for i, image in enumerate(data["images"]):
        # images are read from root/images/<file_name> and detections written as <stem>.txt
        stem, _ = os.path.splitext(image["file_name"])
        check_frame_id(stem, f"{path}: images[{i}].file_name")
        if image["id"] in seen:
            raise UserError(f"{path}: images[{i}].id {image['id']} appears twice")
        seen.add(image["id"])
        for key in ("height", "width"):
            if key in image and not (_is_int(image[key]) and image[key] > 0):
                raise UserError(f"{path}: images[{i}].{key} must be a positive integer, got {image[key]!r}")
