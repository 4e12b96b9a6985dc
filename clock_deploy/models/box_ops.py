"""Box format conversions and (generalized) IoU, in plain torch (ONNX-friendly).

Formats: cxcywh = (centre x, centre y, width, height); xyxy = (x0, y0, x1, y1).
"""
import torch

# Keeps IoU finite for degenerate (zero-area) boxes.
_EPS = 1e-7


def box_cxcywh_to_xyxy(boxes):
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes):
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes):
    """Area of xyxy boxes [..., 4] -> [...]."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1, boxes2):
    """Pairwise IoU of xyxy boxes [N, 4] x [M, 4] -> (iou [N, M], union [N, M])."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = (area1[:, None] + area2[None, :] - inter).clamp(min=_EPS)
    return inter / union, union


def generalized_box_iou(boxes1, boxes2):
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes -> [N, M] in [-1, 1]."""
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = (wh[..., 0] * wh[..., 1]).clamp(min=_EPS)
    return iou - (enclosing - union) / enclosing


def elementwise_generalized_box_iou(boxes1, boxes2):
    """GIoU of matching pairs of xyxy boxes [..., 4] x [..., 4] -> [...]."""
    top_left = torch.max(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = (box_area(boxes1) + box_area(boxes2) - inter).clamp(min=_EPS)
    outer_tl = torch.min(boxes1[..., :2], boxes2[..., :2])
    outer_br = torch.max(boxes1[..., 2:], boxes2[..., 2:])
    outer_wh = (outer_br - outer_tl).clamp(min=0)
    enclosing = (outer_wh[..., 0] * outer_wh[..., 1]).clamp(min=_EPS)
    return inter / union - (enclosing - union) / enclosing
