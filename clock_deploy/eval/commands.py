"""`clock-deploy eval`: KITTI AP (and COCO mAP) of a folder of KITTI detection files."""
import os

import click
from tqdm import tqdm

from clock_deploy.data.coco import detections_to_coco, kitti_to_coco
from clock_deploy.data.kitti import (CLASS_MAPS, KITTI_CLASSES, check_frame_id, class_names, empty_annos, image_path,
                                     read_label, read_label_counted, read_split, read_split_file)
from clock_deploy.errors import UserError
from clock_deploy.eval.coco import coco_map
from clock_deploy.eval.evaluator import write_kitti_detections
from clock_deploy.eval.kitti import CLASS_MIN_OVERLAP, format_kitti, kitti_eval
from clock_deploy.eval.units import ap_text
from clock_deploy.io import is_inside, write_json
from clock_deploy.runtime import Detector


def _label_dir(gt):
    """A label_2 folder given either itself or a dataset root (root/training/label_2)."""
    for candidate in (os.path.join(gt, "training", "label_2"), os.path.join(gt, "label_2"), gt):
        if os.path.isdir(candidate):
            return candidate
    raise UserError(f"--gt: no such folder: {gt}")


def _frame_ids(gt, label_dir, split):
    """Frames to evaluate: all label files, a split file, or a split name under <root>/ImageSets."""
    if split is None:
        return sorted(check_frame_id(f[:-4], os.path.join(label_dir, f))
                      for f in os.listdir(label_dir) if f.endswith(".txt"))
    if os.path.isfile(split):
        return read_split_file(split)
    # a split name: the dataset root is --gt itself or two levels above training/label_2
    roots = [gt, os.path.dirname(os.path.dirname(os.path.abspath(label_dir)))]
    root = next((r for r in roots if os.path.isfile(os.path.join(r, "ImageSets", f"{split}.txt"))), gt)
    return read_split(root, split)


def _class_list(classes):
    if classes in CLASS_MAPS:
        return class_names(classes)
    names = [c.strip() for c in classes.split(",") if c.strip()]
    unknown = [c for c in names if c not in KITTI_CLASSES]
    if unknown or not names:
        raise UserError(f"--classes: expected {sorted(CLASS_MAPS)} or a comma list of {KITTI_CLASSES}, "
                        f"got '{classes}'")
    return names


def _read_detections(path):
    """(annos, lines accepted only by the devkit's leniency: lowercase class, y2 < y1)."""
    if not os.path.isfile(path):
        return empty_annos(with_score=True), 0  # no file: the model found nothing in this frame
    annos, fixes = read_label_counted(path)
    if "score" not in annos:
        if len(annos["name"]):
            raise UserError(f"{path}: detection files need 16 columns (the last one is the score)")
        annos["score"] = empty_annos(with_score=True)["score"]
    return annos, fixes


def _check_det_outside_dataset(det, gt, label_dir):
    """--model writes --det: never into the dataset it evaluates against (it would replace ground truth)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(label_dir)))
    for folder in (gt, label_dir, os.path.join(root, "training")):
        if os.path.isdir(folder) and is_inside(det, folder):
            raise UserError(f"--det {det} is inside the dataset folder {folder} that --gt reads; "
                            "write detections to a folder outside the dataset")


def _detect(model, label_dir, frame_ids, det, device):
    """Run `model` on the frames' images (<root>/training/image_2) and write its KITTI detection files."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(label_dir)))
    detector = Detector.load(model, device=device, score_threshold=0.0)
    dets = []
    for frame_id in tqdm(frame_ids, desc=f"detect ({os.path.basename(model)})"):
        (found,) = detector(image_path(root, frame_id))
        dets.append((found.boxes, found.scores, found.labels))
    write_kitti_detections(det, frame_ids, dets, detector.classes)
    click.echo(f"wrote {len(frame_ids)} detection files to {det}")


@click.command("eval")
@click.option("--gt", "gt", required=True, type=click.Path(), help="KITTI label_2 folder or dataset root.")
@click.option("--det", "det", required=True, type=click.Path(file_okay=False),
              help="Folder of 16-column KITTI detection files (<frame>.txt); written first with --model.")
@click.option("--model", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Run this .pt / .onnx / .engine on the split's images and write --det before evaluating.")
@click.option("--device", default="cpu", show_default=True, help="Device for --model (cpu, cuda).")
@click.option("--split", default=None, help="Split file (one frame id per line) or split name in ImageSets/.")
@click.option("--classes", default="kitti3", show_default=True,
              help="Class map (kitti3, kitti8) or comma list of KITTI classes.")
@click.option("--coco", "with_coco", is_flag=True, help="Also report COCO mAP (faster-coco-eval).")
@click.option("--json", "json_path", default=None, type=click.Path(), help="Write all metrics to this json.")
def eval_cmd(gt, det, model, device, split, classes, with_coco, json_path):
    """KITTI 2D AP (R40 and R11, official devkit rules) of detection files against KITTI labels."""
    label_dir = _label_dir(gt)
    frame_ids = _frame_ids(gt, label_dir, split)
    if not frame_ids:
        raise UserError(f"--gt: no label files to evaluate in {label_dir}")
    if model:
        _check_det_outside_dataset(det, gt, label_dir)
        _detect(model, label_dir, frame_ids, det, device)
    elif not os.path.isdir(det):
        raise UserError(f"--det: no such folder: {det} (or pass --model to write it)")
    class_list = _class_list(classes)
    gt_annos = [read_label(os.path.join(label_dir, f"{f}.txt")) for f in frame_ids]
    det_annos, fixes = map(list, zip(*[_read_detections(os.path.join(det, f"{f}.txt")) for f in frame_ids]))
    if sum(fixes):
        click.echo(f"warning: {sum(fixes)} detections in {det} have a lowercase class name or y2 < y1; "
                   "evaluated as the official devkit does (case ignored, box height taken as |y2 - y1|)", err=True)
    found = sum(os.path.isfile(os.path.join(det, f"{f}.txt")) for f in frame_ids)
    click.echo(f"{len(frame_ids)} frames, {found} detection files (a missing file means no detections)")

    report = {"frames": len(frame_ids)}
    kitti_classes = [c for c in class_list if c.lower() in CLASS_MIN_OVERLAP]
    if kitti_classes:
        report["kitti"] = kitti_eval(gt_annos, det_annos, kitti_classes)
        click.echo("KITTI 2D AP (%), official devkit rules")
        click.echo(format_kitti(report["kitti"]))
    else:
        click.echo("KITTI AP skipped: it is defined for Car, Pedestrian and Cyclist only")
    if with_coco:
        # COCO box evaluation does not use image sizes, so none are read here
        coco_gt = kitti_to_coco([(f, 0, 0, a) for f, a in zip(frame_ids, gt_annos)], class_list)
        image_ids = [image["id"] for image in coco_gt["images"]]
        report["coco"] = coco_map(coco_gt, detections_to_coco(image_ids, det_annos, class_list))
        click.echo("COCO bbox AP (%, " + ", ".join(class_list) + "): "
                   + "  ".join(f"{k} {ap_text(k, v)}" for k, v in report["coco"].items()))
    if json_path:
        write_json(json_path, report)
        click.echo(f"wrote {json_path}")
