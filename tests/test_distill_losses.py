"""CLoCK / baseline loss terms on hand-made DetrOutputs, checked against hand-computed values."""
import math

import pytest
import torch

from clock_deploy.distill.adapters import LevelAdapters, level_stride, pair_levels
from clock_deploy.distill.baselines import FgdLoss, attention_maps
from clock_deploy.distill.clock import (LcmdLoss, QueryDistillLoss, classification_kd, location_weights,
                                        stage_pairs)
from clock_deploy.distill.queries import (TargetQuerySampler, clip_to_image, embedding_anchors,
                                          ground_truth_queries, noisy_anchors)
from clock_deploy.config import FgdConfig
from clock_deploy.models.box_ops import box_cxcywh_to_xyxy
from clock_deploy.models.contract import DetrOutput, StageOutput
from clock_deploy.models.position import PositionEmbeddingSine


def target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.long)}


def output(memory=None, stages=None, groups=None, features=None):
    memory = memory or [torch.zeros(1, 4, 2, 2)]
    stages = stages or [StageOutput(torch.zeros(1, 1, 3), torch.full((1, 1, 4), 0.5))]
    return DetrOutput(memory=memory, memory_pos=[torch.zeros_like(m) for m in memory], stages=stages,
                      groups=groups or [], features=features or [])


# ---------------------------------------------------------------- GT location weights

def test_location_weights_by_hand():
    # 4 x 6 grid. Box A covers x in [0, 3], y in [1, 3] -> cols 0..2, rows 1..2 (6 pixels);
    # box B (inside A) covers x in [1.2, 1.8], y in [1.5, 1.9] -> only pixel (1, 1): smallest box wins there.
    big = [0.25, 0.5, 0.5, 0.5]
    small = [1.5 / 6, 1.7 / 4, 0.6 / 6, 0.4 / 4]
    fg, scale = location_weights([target([big, small], [0, 1]), target([], [])], 4, 6)
    expected_fg = torch.zeros(4, 6, dtype=torch.bool)
    expected_fg[1:3, 0:3] = True
    assert torch.equal(fg[0], expected_fg)
    assert scale[0, 1, 1] == pytest.approx(1.0)          # 1 / (1 x 1) of the small box
    assert scale[0, 2, 2] == pytest.approx(1 / 6)        # 1 / (2 x 3) of the big box
    assert scale[0, 0, 0] == pytest.approx(1 / 18)       # 24 - 6 background pixels
    assert not fg[1].any() and torch.allclose(scale[1], torch.full((4, 6), 1 / 24))


def test_location_weights_tiny_box_still_covers_a_pixel():
    fg, scale = location_weights([target([[0.51, 0.51, 0.01, 0.01]], [0])], 2, 3)
    assert fg[0].sum() == 1 and scale[0][fg[0]].item() == pytest.approx(1.0)


# ---------------------------------------------------------------- LCMD

def lcmd_outputs(student_value, teacher_value, channels=2):
    teacher = output(memory=[torch.full((1, channels, 4, 6), teacher_value)])
    student = output(memory=[torch.full((1, channels, 4, 6), student_value)])
    return student, teacher


def lcmd(adapters, **kwargs):
    """LcmdLoss with the hand-checkable un-normalized form unless asked."""
    kwargs = {"normalize": False, **kwargs}
    return LcmdLoss(adapters, **kwargs)


def test_lcmd_by_hand():
    # error per pixel = C * 1^2 = 2; fg scale sums to 1 (6 px x 1/6), bg scale sums to 1 (18 px x 1/18)
    student, teacher = lcmd_outputs(1.0, 0.0)
    loss = lcmd(LevelAdapters([16], 2, 2), alpha=3.0, beta=0.5, weight=2.0)
    targets = [target([[0.25, 0.5, 0.5, 0.5]], [0])]
    value = loss(student, teacher, targets, (64, 96))["loss_mem"]
    assert value.item() == pytest.approx(2.0 * (3.0 * 2 + 0.5 * 2))
    normalized = lcmd(LevelAdapters([16], 2, 2), alpha=3.0, beta=0.5, normalize=True)
    assert normalized(student, teacher, targets, (64, 96))["loss_mem"].item() == pytest.approx(3.0 + 0.5)


def test_lcmd_zero_for_equal_memory_and_ignores_position_maps():
    targets = [target([[0.25, 0.5, 0.5, 0.5]], [0])]
    student, teacher = lcmd_outputs(0.3, 0.3, channels=4)
    adapters = LevelAdapters([16], 4, 4, learnable=True)
    assert isinstance(adapters.convs["16"], torch.nn.Conv2d)  # learnable although the widths agree ...
    x = torch.randn(1, 4, 4, 6)
    assert torch.allclose(adapters(x, 16, (4, 6)), x)          # ... and the identity at the start
    # the models' position maps differ (level embeddings) but LCMD compares the memories only:
    # its location awareness is the GT mask (the position option was removed, issue 42)
    grid = PositionEmbeddingSine(2)(teacher.memory[0])
    teacher.memory_pos = [grid + torch.tensor([0.5, -0.5, 0.2, 0.0])[None, :, None, None]]
    student.memory_pos = [grid + torch.tensor([-0.1, 0.3, 0.0, 0.4])[None, :, None, None]]
    assert lcmd(adapters)(student, teacher, targets, (64, 96))["loss_mem"] == 0


def lcmd_attention_run(weighting, teacher_map, student_map, targets, temperature=0.5):
    """(loss, d loss / d student memory, d loss / d teacher memory) of a normalized LCMD, identity phi."""
    loss = LcmdLoss(LevelAdapters([16], 3, 3), alpha=2.0, beta=1.0, normalize=True, weighting=weighting,
                    attention_temperature=temperature)
    value = loss(output(memory=[student_map]), output(memory=[teacher_map]), targets, (64, 96))["loss_mem"]
    student_grad, teacher_grad = torch.autograd.grad(value, [student_map, teacher_map])
    return value.item(), student_grad, teacher_grad


def test_lcmd_attention_weighting_by_hand():
    # candidate C3: e_p = A^S_p sum_c A^C_c (T_pc - S_pc)^2 / C, the teacher's FGD attention (T = 0.5)
    torch.manual_seed(0)
    teacher_map = (torch.randn(2, 3, 4, 6) * torch.tensor([0.5, 1.0, 2.0])[None, :, None, None]).requires_grad_()
    student_map = torch.randn(2, 3, 4, 6, requires_grad=True)
    # the same box in both images: rows 1..2, cols 0..2 -> 6 fg pixels of S = 1/6, 18 bg pixels of S = 1/18
    box = [0.25, 0.5, 0.5, 0.5]
    targets = [target([box], [0]), target([box], [1])]
    spatial, channel = attention_maps(teacher_map.detach(), 0.5)
    expected = 0.0
    for b in range(2):
        for row in range(4):
            for col in range(6):
                fg = 1 <= row <= 2 and col <= 2
                weight = 2.0 / 6 if fg else 1.0 / 18  # alpha S_p or beta S_p
                error = sum(spatial[b, row, col] * channel[b, c]
                            * (teacher_map[b, c, row, col] - student_map[b, c, row, col]) ** 2 for c in range(3)) / 3
                expected += weight * error.item()
    expected /= 2  # mean over the batch
    on, on_grad, on_teacher_grad = lcmd_attention_run("gt_attention", teacher_map, student_map, targets)
    off, off_grad, _ = lcmd_attention_run("gt", teacher_map, student_map, targets)
    assert on == pytest.approx(expected, rel=1e-5)
    assert abs(on - off) > 0.05 * off  # the weighting changes the loss ...
    # ... and the direction of the student's gradient, not only its scale
    cosine = torch.nn.functional.cosine_similarity(on_grad.flatten(), off_grad.flatten(), dim=0)
    assert cosine < 0.999
    # the attention is the teacher's, detached: the loss reaches the teacher only through (T - S)^2
    assert torch.allclose(on_teacher_grad, -on_grad, atol=1e-7)
    # another temperature is another weighting
    assert lcmd_attention_run("gt_attention", teacher_map, student_map, targets, 2.0)[0] != pytest.approx(on)


def test_lcmd_attention_weighting_is_the_gt_loss_for_a_uniform_teacher():
    # both attentions average 1: a teacher of the same magnitude everywhere weighs every error by 1
    teacher_map = torch.full((2, 3, 4, 6), 0.7, requires_grad=True)
    student_map = torch.randn(2, 3, 4, 6, requires_grad=True)
    targets = [target([[0.25, 0.5, 0.5, 0.5]], [0]), target([], [])]
    on, on_grad, _ = lcmd_attention_run("gt_attention", teacher_map, student_map, targets)
    off, off_grad, _ = lcmd_attention_run("gt", teacher_map, student_map, targets)
    assert on == pytest.approx(off, rel=1e-6) and torch.allclose(on_grad, off_grad, atol=1e-7)
    with pytest.raises(ValueError, match="weighting"):
        LcmdLoss(LevelAdapters([16], 3, 3), weighting="focal")


def test_level_pairing_by_stride_and_resize():
    image_hw = (64, 96)
    teacher = [torch.zeros(1, 4, 8, 12), torch.zeros(1, 4, 4, 6), torch.zeros(1, 4, 2, 3), torch.zeros(1, 4, 1, 2)]
    student = [torch.zeros(1, 2, 2, 3)]
    assert [level_stride(image_hw, m.shape[-2:]) for m in teacher] == [8, 16, 32, 64]
    assert pair_levels(teacher, student, image_hw) == [(32, 2, 0)]
    adapters = LevelAdapters([32], 2, 4)
    assert adapters(torch.ones(1, 2, 3, 4), 32, (2, 3)).shape == (1, 4, 2, 3)
    assert isinstance(LevelAdapters([32], 4, 4).convs["32"], torch.nn.Identity)


# ---------------------------------------------------------------- TCLD

def test_stage_pairs():
    assert stage_pairs(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert stage_pairs(2, 6) == [(0, 2), (1, 5)]
    assert stage_pairs(6, 2) == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (5, 1)]
    assert stage_pairs(2, 6, "last") == [(0, 5), (1, 5)]


def test_kl_and_bce_by_hand():
    zs, zt = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    tau = 2.0
    pt = [math.exp(0.0) / (1 + math.exp(1.0)), math.exp(1.0) / (1 + math.exp(1.0))]
    ps = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    kl = tau ** 2 * sum(p * math.log(p / q) for p, q in zip(pt, ps))
    assert classification_kd(zs, zt, tau, "kl").item() == pytest.approx(kl, rel=1e-5)

    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    binary_kl = sum(sig(t) * math.log(sig(t) / sig(s)) + (1 - sig(t)) * math.log((1 - sig(t)) / (1 - sig(s)))
                    for s, t in [(1.0, 0.0), (0.0, 2.0)])
    assert classification_kd(zs, zt, tau, "bce").item() == pytest.approx(binary_kl, rel=1e-5)
    assert classification_kd(zt, zt, tau, "bce").item() == 0
    # same gradient as the BCE with soft targets
    zs_grad = zs.clone().requires_grad_(True)
    classification_kd(zs_grad, zt, tau, "bce").sum().backward()
    assert torch.allclose(zs_grad.grad, zs.sigmoid() - zt.sigmoid())


def test_class_term_zero_for_identical_logits_and_sees_an_objectness_shift():
    logits = torch.tensor([[-6.0, 1.0, 0.5]])
    for kind in ("bce", "kl"):
        assert classification_kd(logits, logits, 10.0, kind).item() == pytest.approx(0.0, abs=1e-6)
    teacher, student = torch.full((1, 3), -6.0), torch.full((1, 3), 3.0)  # same softmax, other objectness
    assert classification_kd(student, teacher, 10.0, "bce").item() > 9.0
    assert classification_kd(student, teacher, 10.0, "kl").item() == pytest.approx(0.0, abs=1e-6)
    assert QueryDistillLoss().cls_loss == "bce"  # the default for sigmoid / focal detectors


def test_query_distill_by_hand_with_padding():
    # two slots; the second is padding and holds garbage that must not count
    teacher_stage = StageOutput(logits=torch.tensor([[[0.0, 0.0, 0.0], [9.0, -9.0, 3.0]]]),
                                boxes=torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]]))
    student_stage = StageOutput(logits=torch.tensor([[[1.0, 0.0, 0.0], [-9.0, 9.0, 0.0]]]),
                                boxes=torch.tensor([[[0.6, 0.5, 0.2, 0.2], [0.9, 0.9, 0.3, 0.3]]]))
    pad = torch.tensor([[False, True]])
    loss = QueryDistillLoss(tau=1.0, cls_loss="kl", w_l1=5.0, w_giou=2.0, weight=1.0)
    student, teacher = output(groups=[[student_stage]]), output(groups=[[teacher_stage]])
    terms = loss(student, teacher, pad)
    # slot 0: teacher uniform over 3 classes; KL(u || softmax([1, 0, 0]))
    q = [math.e / (math.e + 2), 1 / (math.e + 2), 1 / (math.e + 2)]
    kl = sum(1 / 3 * math.log((1 / 3) / qi) for qi in q)
    # boxes [0.4, 0.6] x [0.4, 0.6] and [0.5, 0.7] x [0.4, 0.6]: IoU = 0.02 / 0.06, enclosing = union
    giou = 0.02 / 0.06
    assert terms["loss_logit_cls"].item() == pytest.approx(kl, rel=1e-5)  # weights cancel with one slot
    assert terms["loss_logit_box"].item() == pytest.approx(5 * 0.1 + 2 * (1 - giou), rel=1e-5)
    # weighted by teacher confidence across slots
    both = loss(student, teacher, torch.tensor([[False, False]]))
    w0, w1 = 0.5, 1 / (1 + math.exp(-9.0))
    assert both["loss_logit_box"].item() > terms["loss_logit_box"].item()
    l1_1, iou1 = 5 * (0.8 + 0.8 + 0.2 + 0.2), 0.0
    outer = 1.0 * 1.0  # enclosing box [0.05, 1.05] x [0.05, 1.05]
    giou1 = iou1 - (outer - (0.01 + 0.09)) / outer
    expected = (w0 * (5 * 0.1 + 2 * (1 - giou)) + w1 * (l1_1 + 2 * (1 - giou1))) / (w0 + w1)
    assert both["loss_logit_box"].item() == pytest.approx(expected, rel=1e-4)


def test_kd_detr_l1_averages_the_four_coordinates():
    # one slot, boxes apart by (0.1, 0, 0, 0.2): summed L1 0.3 (TCLD, DETR), averaged 0.075 (KD-DETR's code)
    teacher = output(groups=[[StageOutput(torch.zeros(1, 1, 3), torch.tensor([[[0.6, 0.5, 0.2, 0.4]]]))]])
    student = output(groups=[[StageOutput(torch.zeros(1, 1, 3), torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]))]])
    summed = QueryDistillLoss(w_l1=5.0, w_giou=0.0)(student, teacher)["loss_logit_box"]
    averaged = QueryDistillLoss(w_l1=5.0, w_giou=0.0, l1_mean=True)(student, teacher)["loss_logit_box"]
    assert summed.item() == pytest.approx(5 * 0.3, rel=1e-5)
    assert averaged.item() == pytest.approx(5 * 0.075, rel=1e-5)


def test_query_distill_without_group_is_zero():
    terms = QueryDistillLoss()(output(), output(), None)
    assert terms["loss_logit_cls"] == 0 and terms["loss_logit_box"] == 0


# ---------------------------------------------------------------- queries

def test_ground_truth_queries_layout():
    targets = [target([[0.2, 0.3, 0.1, 0.2], [0.6, 0.6, 0.3, 0.3]], [1, 2]), target([], [])]
    spec = ground_truth_queries(targets, num_classes=3, repeats=3, box_noise=0.0)
    assert spec.boxes.shape == (2, 6, 4)
    assert spec.labels[0].tolist() == [1, 2, 1, 2, 1, 2] and spec.labels[1].tolist() == [3] * 6
    assert torch.allclose(spec.boxes[0, 2:4], targets[0]["boxes"])
    assert not spec.pad_mask[0].any() and spec.pad_mask[1].all()
    assert spec.segments == (2, 2, 2)  # one attention block per repeat, as DN-DETR's denoising groups
    # DN-DETR's layout: every repeat padded to the most GT boxes of an image, not only the last one
    uneven = ground_truth_queries([targets[0], target([[0.5, 0.5, 0.2, 0.2]], [0])], 3, 2, 0.0)
    assert uneven.labels.tolist() == [[1, 2, 1, 2], [0, 3, 0, 3]]
    assert uneven.pad_mask.tolist() == [[False] * 4, [False, True, False, True]]

    torch.manual_seed(0)
    sampler = TargetQuerySampler(num_classes=3, repeats=3, box_noise=0.4, random_count=5)
    spec = sampler(torch.zeros(2, 3, 8, 8), targets)
    assert spec.boxes.shape == (2, 11, 4) and spec.labels[:, 6:].eq(3).all() and not spec.pad_mask[:, 6:].any()
    assert spec.segments == (2, 2, 2, 5)  # the general queries are their own block too
    gt = targets[0]["boxes"].repeat(3, 1)
    shift = (spec.boxes[0, :6, :2] - gt[:, :2]).abs()
    assert (shift <= 0.2 * gt[:, 2:] + 1e-6).all() and (shift > 0).all()
    # images without GT and no random queries: nothing to ask
    assert TargetQuerySampler(3, 3, 0.4, 0)(torch.zeros(1, 3, 8, 8), [target([], [])]) is None


def test_noisy_anchors_stay_inside_the_image_and_differ_across_repeats():
    torch.manual_seed(0)
    # boxes at the borders and corners, large and tiny
    gt = target([[0.02, 0.5, 0.04, 0.3], [0.97, 0.97, 0.06, 0.06], [0.5, 0.5, 1.0, 1.0], [0.3, 0.01, 0.002, 0.02]],
                [0, 1, 2, 0])
    spec = ground_truth_queries([gt], num_classes=3, repeats=5, box_noise=0.4)
    corners = box_cxcywh_to_xyxy(spec.boxes[0])
    assert corners.min() >= 0 and corners.max() <= 1 + 1e-6
    assert (spec.boxes[0, :, 2:] >= 1e-3 - 1e-7).all()
    copies = spec.boxes[0].reshape(5, 4, 4)  # repeat r of GT j at slot r * 4 + j
    for j in range(4):
        assert len({tuple(copies[r, j].tolist()) for r in range(5)}) == 5
    # the noise is DN-DETR's: centre within noise * size / 2, sides within 1 +- noise (before clipping)
    inner = noisy_anchors(torch.tensor([[0.5, 0.5, 0.2, 0.1]]).repeat(200, 1), 0.4)
    assert ((inner[:, :2] - 0.5).abs() <= 0.4 * torch.tensor([0.2, 0.1]) / 2 + 1e-6).all()
    assert ((inner[:, 2:] / torch.tensor([0.2, 0.1]) - 1).abs() <= 0.4 + 1e-5).all()
    assert torch.allclose(clip_to_image(torch.tensor([[0.0, 0.5, 0.4, 0.2]])), torch.tensor([[0.1, 0.5, 0.2, 0.2]]))


def test_kd_detr_random_anchors_are_embedding_style_and_shared_by_the_batch():
    torch.manual_seed(0)
    spec = embedding_anchors(3, 100, 3, "cpu")
    assert spec.boxes.shape == (3, 100, 4) and torch.equal(spec.boxes[0], spec.boxes[2])
    assert spec.labels.eq(3).all() and not spec.pad_mask.any()
    torch.manual_seed(0)
    assert torch.allclose(spec.boxes[0], torch.randn(100, 4).sigmoid())


# ---------------------------------------------------------------- FGD

def test_fgd_attention_maps_and_terms():
    features = torch.zeros(1, 2, 2, 2)
    features[0, 0, 0, 0] = 4.0
    spatial, channel = attention_maps(features, temperature=1.0)
    # mean_c |F| = 2 at (0, 0), else 0 -> H W softmax
    e = math.exp(2.0)
    assert spatial[0, 0, 0].item() == pytest.approx(4 * e / (e + 3))
    assert channel[0].tolist() == pytest.approx([2 * math.exp(1.0) / (math.exp(1.0) + 1), 2 / (math.exp(1.0) + 1)])

    cfg = FgdConfig()
    loss = FgdLoss(LevelAdapters([16], 2, 2), 2, cfg)
    teacher = output(features=[torch.randn(2, 2, 4, 6)])
    targets = [target([[0.25, 0.5, 0.5, 0.5]], [0]), target([], [])]
    zero = loss(teacher, teacher, targets, (64, 96))
    assert all(v == 0 for v in zero.values())
    student = output(features=[teacher.features[0] + 0.5 * torch.randn(2, 2, 4, 6)])
    terms = loss(student, teacher, targets, (64, 96))
    assert all(v > 0 for v in terms.values())
    # the relation block starts as the identity: global term = lambda_rela * ||F_T - F_S||^2 / B
    expected = cfg.lambda_rela * (teacher.features[0] - student.features[0]).pow(2).sum() / 2
    assert terms["loss_fgd_global"].item() == pytest.approx(expected.item(), rel=1e-5)
