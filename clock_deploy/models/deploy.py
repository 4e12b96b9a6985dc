"""The deployed form of a detector: raw DETR outputs -> top-k detections in pixels.

PostProcess runs in evaluation and inside exported graphs; ExportWrapper (detector + PostProcess)
is what is traced to ONNX and what the runtime's torch backend runs, so both give the same outputs.
"""
import torch
from torch import nn

from clock_deploy.models.box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Sigmoid scores, top-k over all (query, class) pairs (Deformable DETR convention).

    forward(logits [B, Q, K], boxes [B, Q, 4] cxcywh normalized, image_hw) ->
    scores [B, k] float, labels [B, k] int64, boxes [B, k, 4] xyxy in pixels, with
    k = min(topk, Q * K). `image_hw` is a [B, 2] float tensor of (H, W) or one fixed (H, W).
    """

    def __init__(self, topk=100):
        super().__init__()
        self.topk = topk

    def forward(self, logits, boxes, image_hw):
        num_queries, num_classes = logits.shape[1:]
        k = min(self.topk, num_queries * num_classes)  # static: shapes are known when exporting
        scores, index = torch.topk(logits.sigmoid().flatten(1), k, dim=1)
        labels = index % num_classes
        query = torch.div(index, num_classes, rounding_mode="floor")
        picked = torch.gather(boxes, 1, query[..., None].expand(-1, -1, 4))
        if not torch.is_tensor(image_hw):
            image_hw = torch.tensor([image_hw], dtype=boxes.dtype, device=boxes.device)
        height, width = image_hw[:, 0:1].to(boxes.dtype), image_hw[:, 1:2].to(boxes.dtype)
        scale = torch.stack([width, height, width, height], dim=-1)  # [B or 1, 1, 4]
        return scores, labels, box_cxcywh_to_xyxy(picked) * scale


class ExportWrapper(nn.Module):
    """Detector + PostProcess: normalized images -> (scores, labels, boxes in input pixels)."""

    def __init__(self, model, topk, image_hw):
        super().__init__()
        self.model = model
        self.postprocess = PostProcess(topk)
        self.image_hw = (int(image_hw[0]), int(image_hw[1]))

    def forward(self, images):
        out = self.model(images)
        return self.postprocess(out.pred_logits, out.pred_boxes, self.image_hw)
