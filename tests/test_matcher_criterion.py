"""Box ops, Hungarian matcher and SetCriterion against hand-computed values and brute force."""
import itertools
import math

import pytest
import torch

from clock_deploy.config import LossConfig, ModelConfig
from clock_deploy.models.box_ops import (box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,
                                         elementwise_generalized_box_iou, generalized_box_iou)
from clock_deploy.models.build import build_criterion
from clock_deploy.models.contract import DenoisingOutput, DetrOutput, StageOutput
from clock_deploy.models.criterion import num_boxes_across_processes, sigmoid_focal_loss
from clock_deploy.models.matcher import HungarianMatcher

LOG2 = math.log(2)


# ------------------------------------------------------------------ box ops

def test_box_conversions_round_trip():
    boxes = torch.tensor([[0.5, 0.4, 0.2, 0.6]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(boxes), torch.tensor([[0.4, 0.1, 0.6, 0.7]]))
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes)


def test_giou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [3.0, 0.0, 4.0, 2.0]])
    # overlap: inter 1, union 7, hull 9 -> 1/7 - 2/9; identical -> 1; disjoint: union 6, hull 8 -> -2/8
    expected = torch.tensor([[1 / 7 - 2 / 9, 1.0, -0.25]])
    torch.testing.assert_close(generalized_box_iou(a, b), expected)
    torch.testing.assert_close(elementwise_generalized_box_iou(a.expand(3, 4), b), expected[0])
    torch.testing.assert_close(box_iou(a, b)[0], torch.tensor([[1 / 7, 1.0, 0.0]]))


def test_giou_of_degenerate_boxes_is_finite():
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    assert torch.isfinite(generalized_box_iou(point, point)).all()
    assert torch.isfinite(elementwise_generalized_box_iou(point, point)).all()


# ------------------------------------------------------------------ matcher

def brute_force_cost(cost):
    """Minimum total cost of a one-to-one assignment of min(Q, n) pairs, over all permutations."""
    q, n = cost.shape
    if q >= n:
        return min(float(sum(cost[p[j], j] for j in range(n))) for p in itertools.permutations(range(q), n))
    return min(float(sum(cost[i, p[i]] for i in range(q))) for p in itertools.permutations(range(n), q))


@pytest.mark.parametrize("num_queries,num_targets,seed", [(5, 3, 0), (5, 3, 1), (4, 4, 2), (2, 3, 3), (6, 1, 4)])
def test_matcher_is_optimal(num_queries, num_targets, seed):
    g = torch.Generator().manual_seed(seed)
    matcher = HungarianMatcher()
    logits = torch.randn(1, num_queries, 4, generator=g)
    boxes = torch.rand(1, num_queries, 4, generator=g) * 0.5 + 0.2
    target = {"labels": torch.randint(0, 4, (num_targets,), generator=g),
              "boxes": torch.rand(num_targets, 4, generator=g) * 0.5 + 0.2}
    (rows, cols), = matcher(logits, boxes, [target])
    cost = matcher.cost_matrix(logits[0], boxes[0], target["labels"], target["boxes"])
    assert len(rows) == min(num_queries, num_targets) and len(set(rows.tolist())) == len(rows)
    assert cost[rows, cols].sum().item() == pytest.approx(brute_force_cost(cost), abs=1e-5)


def test_matcher_cost_hand_value_and_empty_targets():
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    cost = matcher.cost_matrix(torch.zeros(1, 2), box, torch.tensor([1]), box)
    # p = 0.5: focal(pos) - focal(neg) = (0.25 - 0.75) * 0.25 * log 2; L1 0; GIoU 1
    assert cost.item() == pytest.approx(2 * (-0.125 * LOG2) - 2.0, abs=1e-6)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    indices = matcher(torch.zeros(2, 3, 2), torch.rand(2, 3, 4), [empty, {"labels": torch.tensor([0]), "boxes": box}])
    assert [len(r) for r, _ in indices] == [0, 1]


# ------------------------------------------------------------------ criterion

def criterion(aux=True):
    return build_criterion(LossConfig(aux=aux), ModelConfig(num_classes=2))


def one_gt():
    return [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]


def shifted_stage():
    """2 queries, all logits 0; query 0 is the GT box moved right by 0.1, query 1 far away."""
    boxes = torch.tensor([[[0.6, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]])
    return StageOutput(logits=torch.zeros(1, 2, 2), boxes=boxes)


def test_focal_loss_hand_value():
    loss = sigmoid_focal_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))
    # p = 0.5: alpha * 0.25 * log 2 (positive) + (1 - alpha) * 0.25 * log 2 (negative)
    assert loss.item() == pytest.approx(0.25 * 0.25 * LOG2 + 0.75 * 0.25 * LOG2)


def test_criterion_hand_values_with_aux_stages():
    out = DetrOutput(memory=[], memory_pos=[], stages=[shifted_stage(), shifted_stage()])
    losses = criterion()(out, one_gt())
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_giou", "loss_cls_0", "loss_bbox_0", "loss_giou_0"}
    # cls: one positive + three negatives at p = 0.5, weight 2; L1 0.1, weight 5; GIoU 1/3, weight 2
    assert losses["loss_cls"].item() == pytest.approx(2 * (0.0625 + 3 * 0.1875) * LOG2, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(5 * 0.1, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(2 * (1 - 1 / 3), rel=1e-5)
    assert losses["loss_giou_0"].item() == pytest.approx(losses["loss_giou"].item())
    only_last = criterion(aux=False)(out, one_gt())
    assert set(only_last) == {"loss_cls", "loss_bbox", "loss_giou"}


def test_criterion_is_near_zero_for_perfect_predictions():
    targets = one_gt() + [{"labels": torch.tensor([0, 1]),
                           "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.4], [0.7, 0.6, 0.3, 0.3]])}]
    logits = torch.full((2, 3, 2), -12.0)
    boxes = torch.rand(2, 3, 4) * 0.2 + 0.4
    logits[0, 2, 1] = 12.0
    boxes[0, 2] = targets[0]["boxes"][0]
    logits[1, 0, 0], logits[1, 1, 1] = 12.0, 12.0
    boxes[1, :2] = targets[1]["boxes"]
    out = DetrOutput(memory=[], memory_pos=[], stages=[StageOutput(logits, boxes)])
    losses = criterion()(out, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    assert 0 <= losses["loss_cls"].item() < 1e-6
    # worse boxes -> larger losses
    worse = DetrOutput(memory=[], memory_pos=[], stages=[StageOutput(logits, boxes + 0.05)])
    worse_losses = criterion()(worse, targets)
    assert worse_losses["loss_bbox"] > 0.1 and worse_losses["loss_giou"] > 0.1


def test_criterion_without_any_target():
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    losses = criterion()(DetrOutput(memory=[], memory_pos=[], stages=[shifted_stage()]), empty)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    # every (query, class) is a negative at p = 0.5, normalized by max(1, 0 boxes)
    assert losses["loss_cls"].item() == pytest.approx(2 * 4 * 0.1875 * LOG2, rel=1e-5)
    assert num_boxes_across_processes(empty, "cpu") == 1
    assert num_boxes_across_processes(one_gt() * 3, "cpu") == 3


def test_denoising_and_encoder_losses():
    # 1 group, 1 GT slot: slot 0 positive, slot 1 negative; image 1 has no GT (padding slots)
    meta = {"num_groups": 1, "max_gt": 1,
            "labels": torch.tensor([[1, 1], [0, 0]]),
            "boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 2, [[0.5, 0.5, 0.5, 0.5]] * 2]),
            "valid": torch.tensor([[True, True], [False, False]]),
            "positive": torch.tensor([True, False])}
    logits = torch.zeros(2, 2, 2)
    logits[1] = 5.0  # padding slots: ignored
    boxes = torch.tensor([[[0.6, 0.5, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]], [[0.1, 0.1, 0.1, 0.1]] * 2])
    dn = DenoisingOutput(stages=[StageOutput(logits, boxes)], meta=meta)
    stage = StageOutput(torch.zeros(2, 2, 2), boxes)
    out = DetrOutput(memory=[], memory_pos=[], stages=[stage], encoder=stage, denoising=dn)
    targets = one_gt() + [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    losses = criterion()(out, targets)
    extra = {"loss_cls_enc", "loss_bbox_enc", "loss_giou_enc", "loss_cls_dn", "loss_bbox_dn", "loss_giou_dn"}
    assert extra <= set(losses)
    # positive: class 1 positive + class 0 negative; negative slot: two negatives
    assert losses["loss_cls_dn"].item() == pytest.approx(2 * (0.0625 + 3 * 0.1875) * LOG2, rel=1e-5)
    assert losses["loss_bbox_dn"].item() == pytest.approx(5 * 0.1, rel=1e-5)
    assert losses["loss_giou_dn"].item() == pytest.approx(2 * (1 - 1 / 3), rel=1e-5)
    # the normalizer is num_boxes * num_groups
    doubled = dict(meta, num_groups=2)
    half = criterion().denoising_losses(dn.stages[0], doubled, 1.0)
    assert half["loss_bbox_dn"].item() == pytest.approx(5 * 0.1 / 2, rel=1e-5)


def test_deformable_two_stage_proposals_learn_every_object_as_class_0():
    """Deformable DETR ranks its proposals by class 0 (model.proposal_rank=first_class), so their loss
    is class-agnostic; with max_class, and in DINO, they learn the real labels."""
    encoder = StageOutput(logits=torch.tensor([[[2.0, -1.0], [0.0, 0.5]]]), boxes=shifted_stage().boxes)
    out = DetrOutput(memory=[], memory_pos=[], stages=[shifted_stage()], encoder=encoder)
    as_class_0 = [{**one_gt()[0], "labels": torch.tensor([0])}]

    def enc_loss(targets, **model):
        cfg = ModelConfig(num_classes=2, two_stage=True, **{"arch": "deformable_detr", **model})
        return build_criterion(LossConfig(), cfg)(out, targets)["loss_cls_enc"]

    assert enc_loss(one_gt()) == pytest.approx(enc_loss(as_class_0, proposal_rank="max_class").item())
    assert enc_loss(one_gt(), proposal_rank="max_class") != pytest.approx(enc_loss(as_class_0).item())
    assert enc_loss(one_gt(), arch="dino") == pytest.approx(enc_loss(one_gt(), proposal_rank="max_class").item())
