"""INT8 calibration sets: which training images, chosen how, written down as a manifest.

Every object of the split falls in a stratum (class, size bin), the size bin coming from
the box height relative to the image height. Images are picked greedily: each step takes
the image that adds the most coverage, where an image is worth sum over the strata it
contains of 1 / (1 + images already chosen for that stratum). Rare strata (cyclists,
large pedestrians) are therefore filled before common ones get more, so the activation
ranges see every kind of object the detector must handle. Ties go to the earlier image
in a seeded random order, so a seed gives the same manifest every time; images without
objects are only taken once nothing else adds coverage.

The manifest stores the dataset root as it was given, the split, the frame ids and the
per-stratum counts; the quantizer reads the images back from it (precision.py).
"""
import os

import numpy as np

from clock_deploy import __version__
from clock_deploy.data import kitti
from clock_deploy.data.images import image_size
from clock_deploy.errors import UserError
from clock_deploy.io import read_json, write_json

FORMAT = "clock-deploy-calibration-v1"
# box height / image height: below 0.1 is about KITTI's 40 px "Easy" limit at 375 px, above 0.25 is near
SIZE_BINS = {"small": (0.0, 0.10), "medium": (0.10, 0.25), "large": (0.25, np.inf)}
IGNORED = {"DontCare"}


def size_bin(relative_height):
    for name, (low, high) in SIZE_BINS.items():
        if low <= relative_height < high:
            return name
    raise ValueError(f"negative box height {relative_height}")


def frame_strata(annos, image_height):
    """{"Class/bin": object count} of one frame."""
    counts = {}
    heights = kitti.box_heights(annos) / image_height
    for name, h in zip(annos["name"], heights):
        if name in IGNORED:
            continue
        key = f"{name}/{size_bin(max(float(h), 0.0))}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def greedy_select(strata_per_frame, num, seed):
    """Indices of `num` frames chosen by the greedy coverage rule of the module docstring."""
    keys = sorted({k for counts in strata_per_frame for k in counts})
    present = np.zeros((len(strata_per_frame), len(keys)), dtype=np.float64)
    for i, counts in enumerate(strata_per_frame):
        for k, n in counts.items():
            present[i, keys.index(k)] = n > 0
    order = np.random.default_rng(seed).permutation(len(strata_per_frame))
    present = present[order]
    chosen_per_stratum = np.zeros(len(keys))
    available = np.ones(len(order), dtype=bool)
    picked = []
    for _ in range(min(num, len(order))):
        gain = present @ (1.0 / (1.0 + chosen_per_stratum))
        gain[~available] = -1.0
        best = int(np.argmax(gain))  # first maximum = earliest in the seeded order
        picked.append(int(order[best]))
        available[best] = False
        chosen_per_stratum += present[best]
    return picked


def choose_calibration_set(root, split, num, seed=0):
    """Manifest dict for `num` images of KITTI `split` under `root`, stratified by class and size."""
    if num < 1:
        raise UserError(f"num must be at least 1, got {num}")
    frame_ids = kitti.read_split(root, split)
    if not frame_ids:
        raise UserError(f"{root}: split '{split}' is empty")
    strata = []
    for frame_id in frame_ids:
        annos = kitti.read_label(kitti.label_path(root, frame_id))
        height, _ = image_size(kitti.image_path(root, frame_id), verify=True)
        strata.append(frame_strata(annos, height))
    picked = greedy_select(strata, num, seed)
    return {
        "format": FORMAT,
        "tool": f"clock-deploy {__version__}",
        "dataset_root": os.fspath(root),
        "split": split,
        "seed": seed,
        "num_requested": num,
        "num_selected": len(picked),
        "selection": {
            "method": "greedy stratified coverage",
            "strata": "class x size bin of the box height relative to the image height",
            "size_bins": {name: [low, None if high == np.inf else high] for name, (low, high) in SIZE_BINS.items()},
            "rule": "repeatedly take the image maximizing sum over its strata of 1 / (1 + images chosen "
                    "for the stratum); ties by a random order drawn from the seed",
        },
        "strata": _stratum_table(strata, picked),
        "frame_ids": [frame_ids[i] for i in picked],
    }


def _stratum_table(strata, picked):
    table = {}
    for counts in strata:
        for key in counts:
            row = table.setdefault(key, {"images_in_split": 0, "images_selected": 0, "objects_selected": 0})
            row["images_in_split"] += 1
    for i in picked:
        for key, n in strata[i].items():
            table[key]["images_selected"] += 1
            table[key]["objects_selected"] += n
    return dict(sorted(table.items()))


def write_manifest(path, manifest):
    write_json(path, manifest)


def read_manifest(path):
    """Load and check a calibration manifest; problems are UserErrors naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"calibration manifest not found: {path} (make one with `clock-deploy calibrate`)")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a calibration manifest (expected format '{FORMAT}')")
    for key in ("dataset_root", "split", "frame_ids"):
        if key not in manifest:
            raise UserError(f"{path}: missing key '{key}'")
    if not isinstance(manifest["dataset_root"], str):
        raise UserError(f"{path}: dataset_root must be a string, got {manifest['dataset_root']!r}")
    if not isinstance(manifest["frame_ids"], list):
        raise UserError(f"{path}: frame_ids must be a list of frame ids, got {type(manifest['frame_ids']).__name__}")
    if not manifest["frame_ids"]:
        raise UserError(f"{path}: lists no images")
    for i, frame_id in enumerate(manifest["frame_ids"]):
        kitti.check_frame_id(frame_id, f"{path}: frame_ids[{i}]")
    return manifest


def manifest_images(path, root=None, limit=0):
    """Image paths of the manifest at `path` (the first `limit` when limit > 0).

    `root` overrides the dataset root written in the manifest (e.g. data moved elsewhere).
    """
    manifest = read_manifest(path)
    root = root or manifest["dataset_root"]
    frame_ids = manifest["frame_ids"][:limit] if limit > 0 else manifest["frame_ids"]
    paths = [kitti.image_path(root, f) for f in frame_ids]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{path}: {len(missing)} of its {len(paths)} images are missing under '{root}' "
                        f"(first: {missing[0]}); create the dataset or pass its location as calib_root")
    return paths
