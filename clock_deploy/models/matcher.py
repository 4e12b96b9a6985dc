"""Hungarian matching between predictions and ground truth (DETR), with a focal class cost."""
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from clock_deploy.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimizing cost_class * focal + cost_bbox * L1 + cost_giou * (-GIoU).

    Targets: list (per image) of dicts with "labels" int64 [n] and "boxes" [n, 4] cxcywh normalized.
    """

    def __init__(self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def cost_matrix(self, logits, boxes, tgt_labels, tgt_boxes):
        """Cost of assigning each of Q predictions to each of n targets of one image -> [Q, n]."""
        prob = logits.float().sigmoid()[:, tgt_labels]
        alpha, gamma = self.focal_alpha, self.focal_gamma
        # focal loss of predicting the class minus that of not predicting it
        pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        neg = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
        cost_l1 = torch.cdist(boxes.float(), tgt_boxes.float(), p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes.float()), box_cxcywh_to_xyxy(tgt_boxes.float()))
        return self.cost_class * (pos - neg) + self.cost_bbox * cost_l1 + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, logits, boxes, targets):
        """logits [B, Q, K], boxes [B, Q, 4] -> per image (pred_idx, tgt_idx) int64 tensors, sorted by pred_idx."""
        indices = []
        for b, target in enumerate(targets):
            if len(target["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            cost = self.cost_matrix(logits[b], boxes[b], target["labels"], target["boxes"])
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
