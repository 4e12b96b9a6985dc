"""KITTI 2D object format: label files, split files and the directory layout.

Layout used by this project (the usual one for the 3712 / 3769 train / val split
of real KITTI):

    root/training/image_2/<frame>.png
    root/training/label_2/<frame>.txt
    root/ImageSets/{train,val,trainval}.txt     one 6-digit frame id per line

A label line has 15 columns (ground truth) or 16 (detections, the last one is
the score):

    type truncated occluded alpha x1 y1 x2 y2 h w l x y z rotation_y [score]

Class maps: "kitti8" trains on all eight KITTI classes; "kitti3" trains on
Car / Pedestrian / Cyclist only, so Van, Truck, Person_sitting, ... objects are
dropped from the training targets. Evaluation does not use the class map: it
reads the raw annotations (`read_label`) because the official KITTI metric
treats Van as a neighbour of Car and Person_sitting as a neighbour of
Pedestrian (detections on them are neither true nor false positives), and
ignores DontCare regions.
"""
import os
import re

import numpy as np

from clock_deploy.errors import UserError
from clock_deploy.io import write_text

KITTI_CLASSES = ["Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc"]
CLASS_MAPS = {
    "kitti8": KITTI_CLASSES,
    "kitti3": ["Car", "Pedestrian", "Cyclist"],
}
# names allowed in a label file: the 8 classes plus the regions annotators left out
LABEL_NAMES = set(KITTI_CLASSES) | {"DontCare"}

# Official KITTI object benchmark difficulties, the one table both `data stats` and the evaluator
# (clock_deploy.eval.kitti) use: (min box height px, max occlusion level, max truncation). As in the
# devkit an object must be taller than the min height (height <= 40 px is too small for Easy).
DIFFICULTIES = {
    "Easy": (40, 0, 0.15),
    "Moderate": (25, 1, 0.30),
    "Hard": (25, 2, 0.50),
}

GT_COLUMNS = 15
DET_COLUMNS = 16

# A frame id names files inside the dataset (and detection files inside --det), so it must be one
# plain file name: no folders, no leading dot ("..", hidden files), nothing a shell would mangle.
FRAME_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}\Z")
# Box corners / sizes / locations beyond this are not pixels or metres but broken files (1e30 ...)
MAX_COORDINATE = 1e6
MAX_OCCLUSION = 3  # KITTI: 0 fully visible, 1 partly, 2 largely occluded, 3 unknown
_NAME_OF_LOWER = {n.lower(): n for n in LABEL_NAMES}  # the devkit ignores the case of detection names


def class_names(map_name):
    """Class list of a class map ("kitti3" or "kitti8"); the index of a name is its label id."""
    if map_name not in CLASS_MAPS:
        raise UserError(f"unknown class map '{map_name}'; choose one of {sorted(CLASS_MAPS)}")
    return list(CLASS_MAPS[map_name])


def empty_annos(with_score=False):
    """Annotations of a frame without objects (the shapes `read_label` returns for an empty file)."""
    annos = {
        "name": np.zeros([0], dtype="<U14"),
        "truncated": np.zeros([0], dtype=np.float64),
        "occluded": np.zeros([0], dtype=np.int64),
        "alpha": np.zeros([0], dtype=np.float64),
        "bbox": np.zeros([0, 4], dtype=np.float64),
        "dimensions": np.zeros([0, 3], dtype=np.float64),
        "location": np.zeros([0, 3], dtype=np.float64),
        "rotation_y": np.zeros([0], dtype=np.float64),
    }
    if with_score:
        annos["score"] = np.zeros([0], dtype=np.float64)
    return annos


def check_frame_id(frame_id, where="frame id"):
    """`frame_id` if it is a plain file name stem (000123); else a UserError starting with `where`.

    Every reader of split files / manifests and every writer of per-frame files checks ids here,
    so no id can read or write outside its dataset or output folder."""
    if not isinstance(frame_id, str) or not FRAME_ID.match(frame_id):
        raise UserError(f"{where}: invalid frame id {frame_id!r} (expected a file name such as 000123: "
                        "letters, digits, '_', '-', '.', no folders, no leading dot)")
    return frame_id


def _parse_line(fields, where, detection=False):
    """(name, 15 or 16 floats) of one label line. Detections are read as the official devkit reads
    them: the class name in any case (returned capitalized as in KITTI_CLASSES) and y2 < y1 allowed
    (it uses the absolute height); the caller counts those and warns once."""
    name = fields[0]
    if detection and name not in LABEL_NAMES:
        name = _NAME_OF_LOWER.get(name.lower(), name)
    if name not in LABEL_NAMES:
        raise UserError(f"{where}: unknown object type {name!r} (expected one of {KITTI_CLASSES + ['DontCare']})")
    try:
        values = [float(v) for v in fields[1:]]
    except ValueError:
        bad = next(v for v in fields[1:] if not _is_number(v))
        raise UserError(f"{where}: non-numeric field {bad!r}") from None
    if not all(np.isfinite(values)):
        raise UserError(f"{where}: field is not a finite number")
    if any(abs(v) > MAX_COORDINATE for v in values[:14]):
        raise UserError(f"{where}: value out of range (|value| > {MAX_COORDINATE:g}): "
                        f"{next(f for f, v in zip(fields[1:], values) if abs(v) > MAX_COORDINATE)}")
    occluded = values[1]
    if occluded != int(occluded) or not -1 <= occluded <= MAX_OCCLUSION:
        raise UserError(f"{where}: occluded must be an integer level -1..{MAX_OCCLUSION}, got {fields[2]}")
    x1, y1, x2, y2 = values[3:7]
    if x2 < x1 or (y2 < y1 and not detection):
        raise UserError(f"{where}: negative box size (x1={x1}, y1={y1}, x2={x2}, y2={y2})")
    return name, values


def read_text_lines(path, what="file"):
    """Lines of a UTF-8 text file (a BOM is skipped); unreadable, binary or missing files are a
    UserError naming the file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected a {what}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a UTF-8 text file (byte {e.start}); expected a {what}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_label(path):
    """Read a KITTI label / detection file into a dict of numpy arrays (one entry per object).

    Keys: name, truncated, occluded, alpha, bbox [n,4] (x1,y1,x2,y2), dimensions [n,3] (h,w,l),
    location [n,3], rotation_y, and score only when the file has 16 columns (detections).
    Blank lines are skipped; any malformed line is a UserError naming file:line.
    """
    return read_label_counted(path)[0]


def read_label_counted(path):
    """(read_label(path), lines the devkit leniency accepted): detection files are read as the
    official devkit reads them (see `_parse_line`), and the caller warns once about the count."""
    path = os.fspath(path)
    lines = read_text_lines(path, "label file")
    names, rows, ncols, fixes = [], [], None, 0
    for lineno, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        if len(fields) not in (GT_COLUMNS, DET_COLUMNS):
            raise UserError(f"{where}: expected {GT_COLUMNS} (ground truth) or {DET_COLUMNS} (detection) "
                            f"columns, got {len(fields)}")
        if ncols is not None and len(fields) != ncols:
            raise UserError(f"{where}: {len(fields)} columns but earlier lines have {ncols}; "
                            "ground truth and detections cannot be mixed in one file")
        ncols = len(fields)
        name, values = _parse_line(fields, where, detection=ncols == DET_COLUMNS)
        fixes += name != fields[0] or values[6] < values[4]  # y2 < y1
        names.append(name)
        rows.append(values)
    if not rows:
        return empty_annos(), 0
    table = np.array(rows, dtype=np.float64)
    annos = {
        "name": np.array(names),
        "truncated": table[:, 0],
        "occluded": table[:, 1].astype(np.int64),
        "alpha": table[:, 2],
        "bbox": table[:, 3:7],
        "dimensions": table[:, 7:10],
        "location": table[:, 10:13],
        "rotation_y": table[:, 13],
    }
    if ncols == DET_COLUMNS:
        annos["score"] = table[:, 14]
    return annos, fixes


def format_label(annos):
    """KITTI text of `annos` with the precision of the official files (scores get 4 decimals)."""
    lines = []
    with_score = "score" in annos
    for i in range(len(annos["name"])):
        values = [annos["truncated"][i], int(annos["occluded"][i]), annos["alpha"][i], *annos["bbox"][i],
                  *annos["dimensions"][i], *annos["location"][i], annos["rotation_y"][i]]
        text = "{} {:.2f} {:d} {:.2f} {:.2f} {:.2f} {:.2f} {:.2f} {:.2f} {:.2f} {:.2f} {:.2f} {:.2f} {:.2f} {:.2f}"
        line = text.format(annos["name"][i], *values)
        if with_score:
            line += f" {annos['score'][i]:.4f}"
        lines.append(line)
    return "".join(line + "\n" for line in lines)


def write_label(path, annos):
    """Write `annos` (the dict `read_label` returns) atomically; 16 columns when it has a score."""
    write_text(path, format_label(annos))


def read_split(root, split):
    """Frame ids listed in root/ImageSets/<split>.txt, in file order."""
    path = os.path.join(os.fspath(root), "ImageSets", f"{split}.txt")
    if not os.path.isfile(path):
        raise UserError(f"split file not found: {path} (expected one frame id per line)")
    return read_split_file(path)


def read_split_file(path):
    """Frame ids of a split file (one per line, blank lines skipped); each one checked."""
    frame_ids = []
    for lineno, line in enumerate(read_text_lines(path, "split file"), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 1:
            raise UserError(f"{path}:{lineno}: expected one frame id, got {line.strip()!r}")
        frame_ids.append(check_frame_id(fields[0], f"{path}:{lineno}"))
    return frame_ids


def write_split(root, split, frame_ids):
    text = "".join(check_frame_id(f) + "\n" for f in frame_ids)
    write_text(os.path.join(os.fspath(root), "ImageSets", f"{split}.txt"), text)


def frame_file(folder, frame_id, suffix):
    """<folder>/<frame_id><suffix>, for a checked frame id only."""
    return os.path.join(os.fspath(folder), check_frame_id(frame_id) + suffix)


def image_path(root, frame_id):
    return frame_file(os.path.join(os.fspath(root), "training", "image_2"), frame_id, ".png")


def label_path(root, frame_id):
    return frame_file(os.path.join(os.fspath(root), "training", "label_2"), frame_id, ".txt")


def box_heights(annos):
    bbox = annos["bbox"]
    return bbox[:, 3] - bbox[:, 1]


def counts_for_difficulty(height, occluded, truncated, difficulty):
    """Boolean mask of the objects that count for a KITTI difficulty ("Easy" ...), from arrays of box
    heights, occlusion levels and truncations: the devkit's cleanData rule for ground truth."""
    min_height, max_occlusion, max_truncation = DIFFICULTIES[difficulty]
    return (height > min_height) & (occluded <= max_occlusion) & (truncated <= max_truncation)


def difficulty_mask(annos, difficulty):
    """Objects that count for a KITTI difficulty (cumulative, as the benchmark: Hard includes Moderate)."""
    return counts_for_difficulty(box_heights(annos), annos["occluded"], annos["truncated"], difficulty)


def label_stats(all_annos):
    """Counts per class and difficulty plus box heights, over a list of annotation dicts."""
    per_class = {}
    heights = []
    for annos in all_annos:
        for name in np.unique(annos["name"]):
            keep = annos["name"] == name
            row = per_class.setdefault(str(name), {"objects": 0, **{d: 0 for d in DIFFICULTIES},
                                                   "truncated": 0, "occluded": 0})
            row["objects"] += int(keep.sum())
            if name == "DontCare":
                continue
            for d in DIFFICULTIES:
                row[d] += int((keep & difficulty_mask(annos, d)).sum())
            row["truncated"] += int((keep & (annos["truncated"] > 0)).sum())
            row["occluded"] += int((keep & (annos["occluded"] > 0)).sum())
        heights.append(box_heights(annos)[annos["name"] != "DontCare"])
    heights = np.concatenate(heights) if heights else np.zeros([0])
    order = [n for n in KITTI_CLASSES + ["DontCare"] if n in per_class]
    return {"images": len(all_annos), "classes": {n: per_class[n] for n in order}, "heights": heights}
