"""PyTorch backend: a checkpoint (.pt) run as the exported graph would run it.

The model is wrapped with the same ExportWrapper (detector + PostProcess) that is traced
to ONNX, and a checkpoint's model is fused for inference as the export fuses it (models/fuse.py),
so torch and ONNX backends are comparable output for output. On a CPU its convolutions then run
channels_last with weights packed once for oneDNN (cpu_layout.py).
"""
import numpy as np
import torch

from clock_deploy.artifact import batch_spec, build_metadata, input_spec
from clock_deploy.checkpoint import load_model
from clock_deploy.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from clock_deploy.models.deform_attn import model_sampling
from clock_deploy.models.deploy import ExportWrapper
from clock_deploy.models.fuse import fuse_for_inference
from clock_deploy.runtime.cpu_layout import prepare_for_cpu


class TorchBackend:
    name = "torch"
    max_batch = None
    static = False

    def __init__(self, wrapper, device="cpu"):
        self.device = torch.device(device)
        self.wrapper = wrapper.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images):
        scores, labels, boxes = self.wrapper(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))
        return scores.cpu().numpy(), labels.cpu().numpy(), boxes.cpu().numpy()


def model_backend(model, classes, image_hw, topk, device="cpu"):
    """(TorchBackend, metadata) for an in-memory model run at `image_hw` with `topk` detections."""
    meta = {"classes": list(classes), "input": input_spec(image_hw[0], image_hw[1], IMAGENET_MEAN, IMAGENET_STD)}
    return TorchBackend(ExportWrapper(model, topk, image_hw), device), meta


def checkpoint_metadata(cfg, classes, model, source=None):
    """The metadata an export of this checkpoint would carry (fp32, dynamic batch)."""
    height, width = cfg.data.img_size
    return build_metadata(kind="torch", arch=cfg.model.arch, classes=classes, height=height, width=width,
                          mean=IMAGENET_MEAN, std=IMAGENET_STD, precision="fp32", topk=cfg.export.topk,
                          batch=batch_spec(True, 1), source=source, sampling=model_sampling(model))


def inference_model(model, device="cpu"):
    """An eval-mode model loaded only to be run, as this backend runs it: fused, and on a CPU in
    cpu_layout's packed channels_last convolutions (in place; returns it)."""
    model = fuse_for_inference(model)
    return prepare_for_cpu(model) if torch.device(device).type == "cpu" else model


def load_checkpoint(path, device="cpu"):
    """(TorchBackend, metadata) for a training checkpoint, its model prepared by `inference_model` (it is
    loaded here only to be run)."""
    model, cfg, ckpt = load_model(path)
    model = inference_model(model, device)
    backend, _ = model_backend(model, ckpt["classes"], cfg.data.img_size, cfg.export.topk, device)
    return backend, checkpoint_metadata(cfg, ckpt["classes"], model, source={"checkpoint": str(path)})
