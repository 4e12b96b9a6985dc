"""Collect a model's detections frame by frame, then report COCO mAP and KITTI AP in one dict."""

import numpy as np

from clock_deploy.data.coco import detections_to_coco, kitti_to_coco
from clock_deploy.data.kitti import frame_file, write_label
from clock_deploy.eval.coco import coco_map, coco_per_class
from clock_deploy.eval.kitti import CLASS_MIN_OVERLAP, DIFFICULTIES, kitti_eval


def detection_annos(boxes, scores, labels, classes):
    """Detections as the annos dict of a 16-column KITTI file (2D fields only; 3D fields are the
    KITTI "unknown" values)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    n = len(boxes)
    return {
        "name": np.asarray(classes)[np.asarray(labels, np.int64)].astype(str).reshape(n),
        "truncated": np.full(n, -1.0),
        "occluded": np.full(n, -1, np.int64),
        "alpha": np.full(n, -10.0),
        "bbox": boxes,
        "dimensions": np.full((n, 3), -1.0),
        "location": np.full((n, 3), -1000.0),
        "rotation_y": np.full(n, -10.0),
        "score": np.asarray(scores, np.float64).reshape(n),
    }


class DetectionEvaluator:
    """Evaluate detections against KITTI-style ground truth.

    classes: label names (label i of `update` is classes[i]); gt_annos / image_sizes (H, W) /
    frame_ids: one entry per frame of the split, in dataset order.
    """

    def __init__(self, classes, gt_annos, image_sizes, frame_ids):
        if not len(gt_annos) == len(image_sizes) == len(frame_ids):
            raise ValueError("gt_annos, image_sizes and frame_ids must have one entry per frame")
        self.classes = list(classes)
        self.gt_annos = list(gt_annos)
        self.image_sizes = list(image_sizes)
        self.frame_ids = list(frame_ids)
        self.detections = [detection_annos(np.zeros((0, 4)), [], [], self.classes) for _ in self.gt_annos]

    def update(self, index, boxes, scores, labels):
        """Set the detections of frame `index`: boxes [n, 4] x1y1x2y2 in original-image pixels."""
        self.detections[int(index)] = detection_annos(boxes, scores, labels, self.classes)

    def kitti_classes(self):
        return [c for c in self.classes if c.lower() in CLASS_MIN_OVERLAP]

    def summarize(self):
        """{"mAP", "AP50", "AP75", "APs", "APm", "APl"} (COCO, 0..1) and, for Car / Pedestrian /
        Cyclist among the classes, "kitti_<Class>_<difficulty>" and "kitti_easy" / "kitti_moderate" /
        "kitti_hard" (R40, percent; each averages the classes with ground truth at that difficulty,
        nan if none has)."""
        coco = coco_map(*self._coco())
        metrics = {"mAP": coco["AP"], **{k: coco[k] for k in ("AP50", "AP75", "APs", "APm", "APl")}}
        kitti_classes = self.kitti_classes()
        if kitti_classes:
            kitti = kitti_eval(self.gt_annos, self.detections, kitti_classes)
            for cls in kitti_classes:
                for difficulty in DIFFICULTIES:
                    metrics[f"kitti_{cls}_{difficulty}"] = kitti[cls]["R40"][difficulty]
            for difficulty in DIFFICULTIES:
                metrics[f"kitti_{difficulty}"] = kitti[f"mAP_{difficulty}_R40"]
        return metrics

    def per_class_coco(self):
        """{class: {"AP", "AP50", "AP70"}}: COCO AP of each class apart (summarize averages them)."""
        return coco_per_class(*self._coco())

    def _coco(self):
        """(ground truth, detections) in COCO form."""
        frames = [(f, h, w, a) for f, (h, w), a in zip(self.frame_ids, self.image_sizes, self.gt_annos)]
        coco_gt = kitti_to_coco(frames, self.classes)
        image_ids = [image["id"] for image in coco_gt["images"]]
        return coco_gt, detections_to_coco(image_ids, self.detections, self.classes)


def write_kitti_detections(out_dir, frame_ids, dets, classes):
    """Write KITTI detection files; dets[i] = (boxes [n,4] x1y1x2y2, scores [n], labels [n]) or None."""
    no_dets = (np.zeros((0, 4)), [], [])
    _write_annos(out_dir, frame_ids, [detection_annos(*(d if d is not None else no_dets), classes) for d in dets])


def _write_annos(out_dir, frame_ids, all_annos):
    for frame_id, annos in zip(frame_ids, all_annos):
        write_label(frame_file(out_dir, frame_id, ".txt"), annos)
