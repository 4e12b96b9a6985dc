"""Accuracy of a runtime Detector (any backend: checkpoint, ONNX, TensorRT) on a dataset split."""
from tqdm import tqdm

from clock_deploy.errors import UserError
from clock_deploy.eval.evaluator import DetectionEvaluator
from clock_deploy.runtime import Detector


def evaluate_detector(detector, dataset, limit=0, batch=1, progress=False):
    """COCO / KITTI metrics (DetectionEvaluator.summarize) of a runtime Detector on the first `limit`
    images of `dataset` (0 = all), `batch` images per call; export parity and the bench both use it."""
    return collect_detections(detector, dataset, limit, batch, progress).summarize()


def collect_detections(detector, dataset, limit=0, batch=1, progress=False):
    """A DetectionEvaluator holding a runtime Detector's detections on the first `limit` images of
    `dataset` (0 = all), for metrics beyond summarize (per class, per detection).

    Images are read from their files and go through the runtime preprocessing, as in deployment.
    """
    if list(detector.classes) != list(dataset.classes):
        raise UserError(f"the model's classes {detector.classes} differ from the dataset's {dataset.classes}")
    count = len(dataset) if limit <= 0 else min(limit, len(dataset))
    evaluator = DetectionEvaluator(dataset.classes, [dataset.gt_annos(i) for i in range(count)],
                                   [dataset.image_size(i) for i in range(count)], dataset.frame_ids[:count])
    for start in tqdm(range(0, count, batch), desc="eval", leave=False, disable=not progress):
        paths = [dataset.image_path(i) for i in range(start, min(start + batch, count))]
        for i, det in enumerate(detector(paths, score_threshold=0.0), start):
            evaluator.update(i, det.boxes, det.scores, det.labels)
    return evaluator


def evaluate_model(model, dataset, image_hw, topk=100, device="cpu", batch=8, progress=False):
    """evaluate_detector for an in-memory torch model (training-time evaluation, the A/B benchmark),
    run at `image_hw` with `topk` detections per image as its export would be. The model's
    train/eval mode and the global RNG are left as they were, so evaluating does not change a run.
    """
    import torch  # torch-free: evaluating an ONNX or an engine needs no torch

    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]):
            detector = Detector.for_model(model, dataset.classes, image_hw, topk, device)
            return evaluate_detector(detector, dataset, batch=batch, progress=progress)
    finally:
        model.train(was_training)


def evaluate_artifact(path, dataset, limit=0, device="cpu", backend=None):
    """Metrics of an exported model (.onnx / .engine) or a checkpoint (.pt) through the runtime."""
    return evaluate_detector(Detector.load(path, backend=backend, device=device), dataset, limit)
