"""One Detector over three backends: PyTorch checkpoints, ONNX (onnxruntime), TensorRT engines.

    detector = Detector.load("runs/dino/export/model.onnx")
    for det in detector(["frame1.png", frame2_rgb_array]):
        print(det.boxes, det.scores, det.names)

Preprocessing (resize + normalization) comes from the artifact's metadata sidecar, and
boxes come back in the pixels of the original images. Loading an .onnx or .engine
never imports torch.
"""
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
from PIL import Image

from clock_deploy.artifact import read_metadata
from clock_deploy.errors import UserError
from clock_deploy.runtime.preprocess import boxes_to_original, preprocess

BACKEND_OF_SUFFIX = {".pt": "torch", ".pth": "torch", ".onnx": "onnxruntime",
                     ".engine": "tensorrt", ".plan": "tensorrt"}
BACKENDS = ("torch", "onnxruntime", "tensorrt")
# one image: a file path, a PIL image or an H x W x 3 uint8 RGB array
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


@dataclass
class Detections:
    """Detections of one image, best first."""
    boxes: np.ndarray   # [n, 4] float32 x1, y1, x2, y2 in original-image pixels
    scores: np.ndarray  # [n] float32
    labels: np.ndarray  # [n] int64 class indices
    names: list[str]    # [n] class names

    def __len__(self) -> int:
        return len(self.scores)


def _is_single_image(images):
    return isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim == 3)


class Detector:
    def __init__(self, backend, meta: dict, score_threshold: float = 0.3):
        self.backend = backend
        self.meta = meta
        self.classes = list(meta["classes"])
        self.score_threshold = score_threshold
        self.input_hw = (meta["input"]["height"], meta["input"]["width"])

    @classmethod
    def load(cls, path: Union[str, os.PathLike], backend: Optional[str] = None, device: str = "cpu",
             providers: Optional[list] = None, score_threshold: float = 0.3) -> "Detector":
        """Detector for a checkpoint (.pt), ONNX file (.onnx) or TensorRT engine (.engine / .plan).

        backend: "torch" | "onnxruntime" | "tensorrt", default from the file suffix.
        device: "cpu", "cuda" or "cuda:N" (TensorRT always runs on a GPU).
        providers: explicit onnxruntime execution providers (default: chosen for `device`).
        """
        path = os.fspath(path)
        suffix = os.path.splitext(path)[1].lower()
        backend = backend or BACKEND_OF_SUFFIX.get(suffix)
        if backend not in BACKENDS:
            raise UserError(f"{path}: cannot tell the backend from the suffix '{suffix}'; pass backend= one of "
                            f"{list(BACKENDS)} (suffixes: {sorted(BACKEND_OF_SUFFIX)})")
        if not os.path.isfile(path):
            raise UserError(f"model file not found: {path}")
        if backend == "torch":
            from clock_deploy.runtime.backend_torch import load_checkpoint  # torch-free: torch only for a .pt
            impl, meta = load_checkpoint(path, device)
            return cls(impl, meta, score_threshold)
        meta = read_metadata(path)
        if backend == "onnxruntime":
            from clock_deploy.runtime.backend_onnx import OnnxBackend  # start-up: onnxruntime only for an ONNX
            impl = OnnxBackend(path, meta, device, providers)
        else:
            from clock_deploy.runtime.backend_tensorrt import TensorRTBackend  # optional: TensorRT
            impl = TensorRTBackend(path, meta, "cuda" if device == "cpu" else device)
        return cls(impl, meta, score_threshold)

    @classmethod
    def for_model(cls, model, classes: Sequence[str], image_hw: tuple[int, int], topk: int,
                  device: str = "cpu") -> "Detector":
        """Detector over an in-memory torch model (training-time evaluation, export parity): the
        deployment preprocessing, every one of the `topk` detections kept. Puts the model in eval mode."""
        from clock_deploy.runtime.backend_torch import model_backend  # torch-free: torch only for a torch model
        impl, meta = model_backend(model, classes, image_hw, topk, device)
        return cls(impl, meta, score_threshold=0.0)

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw contract outputs for a preprocessed batch [N, 3, H, W]: (scores, labels, boxes in input pixels).

        Batches larger than the backend takes are split; a static-batch model gets its last
        chunk padded with zeros (the padding's outputs are dropped).
        """
        step = self.backend.max_batch or len(batch)
        outputs = []
        for start in range(0, len(batch), step):
            chunk = batch[start:start + step]
            count = len(chunk)
            if self.backend.static and count < step:
                chunk = np.concatenate([chunk, np.zeros((step - count, *chunk.shape[1:]), chunk.dtype)])
            outputs.append([o[:count] for o in self.backend(chunk)])
        return tuple(np.concatenate(parts) for parts in zip(*outputs))

    def __call__(self, images: Union[ImageInput, Sequence[ImageInput]],
                 score_threshold: Optional[float] = None) -> list[Detections]:
        """Detect objects in one image or a list of images (paths, PIL images, HxWx3 uint8 RGB arrays).

        Returns a list of Detections, one per image, with scores >= the score threshold.
        """
        if _is_single_image(images):
            images = [images]
        if len(images) == 0:
            return []
        threshold = self.score_threshold if score_threshold is None else score_threshold
        batch, sizes = preprocess(images, self.meta["input"])
        scores, labels, boxes = self.infer(batch)
        results = []
        for s, l, b, size in zip(scores, labels, boxes, sizes):
            keep = s >= threshold
            l = l[keep].astype(np.int64)
            if len(l) and not 0 <= l.min() <= l.max() < len(self.classes):
                raise UserError(f"the model returned class {int(l.max())} but its metadata lists only "
                                f"{len(self.classes)} classes {self.classes}; model and metadata do not match")
            results.append(Detections(boxes=boxes_to_original(b[keep].astype(np.float32), self.input_hw, size),
                                      scores=s[keep].astype(np.float32), labels=l,
                                      names=[self.classes[i] for i in l]))
        return results
