"""Distillation with RT-DETR students and teachers: zero-for-copies, isolation of the query groups
from matching and denoising queries, cross-family (DINO teacher -> RT-DETR student) steps, KD-DETR
anchors. (Kept apart from test_distill_models.py, which the other three families share.)"""
import copy

import pytest
import torch

from clock_deploy.distill import build_distiller
from clock_deploy.distill.queries import TargetQuerySampler, query_group
from clock_deploy.models.build import build_criterion
from clock_deploy.training.trainer import TrainStep


@pytest.fixture(scope="module")
def make_config(make_distill_config):
    """make_config(arch="rt_detr", hidden=32, dec_layers=2, method="none"): make_distill_config with one encoder
    layer, students and teachers alike."""
    def config(arch="rt_detr", **settings):
        return make_distill_config(arch, enc_layers=1, **settings)
    return config


@pytest.mark.parametrize("method", ["clock", "fgd"])
def test_terms_zero_for_an_exact_copy_and_positive_otherwise(method, make_config, make_distill_model, distill_losses,
                                                              perturb):
    cfg = make_config(method=method)
    teacher = make_distill_model(cfg)
    # eval: RT-DETR's encoder BatchNorms would use batch statistics in training, the teacher running ones
    student = copy.deepcopy(teacher).eval()
    distiller = build_distiller(cfg, teacher, student).train()
    _, losses = distill_losses(distiller, student)
    expected = {"clock": {"loss_mem", "loss_logit_cls", "loss_logit_box"},
                "fgd": {"loss_fgd_focal", "loss_fgd_attn", "loss_fgd_global"}}[method]
    assert set(losses) == expected
    for name, value in losses.items():
        assert abs(value.item()) < 1e-5, name
    perturb(student)
    _, losses = distill_losses(distiller, student)
    for name, value in losses.items():
        assert value.item() > 1e-4, name


@pytest.mark.parametrize("training", [False, True])
def test_target_aware_group_does_not_change_matching_or_denoising_predictions(training, make_config,
                                                                              make_distill_model, make_distill_batch,
                                                                              assert_group_hides_padding):
    cfg = make_config()
    model = make_distill_model(cfg).train(training)
    images, targets = make_distill_batch()
    torch.manual_seed(4)
    spec = TargetQuerySampler(model.num_classes, 3, 0.1, 5)(images, targets)
    torch.manual_seed(7)
    plain = model(images, targets)
    torch.manual_seed(7)  # the same denoising noise
    with_group = model(images, targets, groups=[query_group(model, spec)])
    assert (plain.denoising is not None) == training
    pairs = list(zip(plain.stages, with_group.stages))
    if training:
        pairs += list(zip(plain.denoising.stages, with_group.denoising.stages))
    for a, b in pairs:
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.boxes, a.boxes, rtol=1e-5, atol=1e-5)
    assert with_group.groups[0][-1].boxes.shape[1] == spec.num_queries
    assert_group_hides_padding(model, images, targets, spec, with_group)


@pytest.mark.parametrize("teacher_arch,student_arch,method", [
    ("dino", "rt_detr", "clock"), ("dino", "rt_detr", "kd_detr"), ("dino", "rt_detr", "fgd"),
    ("rt_detr", "deformable_detr", "clock")])
def test_one_distill_step_across_families(teacher_arch, student_arch, method, make_config, make_distill_model,
                                          make_distill_batch):
    """A DINO teacher (48 wide, 3 layers) distils an RT-DETR student (32 wide): adapters bridge widths and
    levels; the teacher stays as it was, the student moves, the terms reach the student."""
    cfg = make_config(student_arch, method=method)
    teacher = make_distill_model(make_config(teacher_arch, hidden=48, dec_layers=3), seed=5)
    student = make_distill_model(cfg).train()
    distiller = build_distiller(cfg, teacher, student).train()
    step = TrainStep(student, build_criterion(cfg.loss, cfg.model), distiller).train()
    teacher_before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    optimizer = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=1e-3)
    images, targets = make_distill_batch()
    losses = step(images, targets)
    distill_terms = {"clock": {"loss_mem", "loss_logit_cls", "loss_logit_box"},
                     "kd_detr": {"loss_kd_anchor_cls", "loss_kd_random_cls"},
                     "fgd": {"loss_fgd_focal", "loss_fgd_global"}}[method]
    assert distill_terms <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    reached = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    if method != "kd_detr":
        assert any(n.startswith("backbone.") for n in reached)
    optimizer.step()
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())


def test_kd_detr_anchors_are_the_rt_detr_teachers_selected_queries(make_config, make_distill_model, distill_losses):
    cfg = make_config(method="kd_detr")
    teacher, student = make_distill_model(make_config(hidden=48, dec_layers=3), seed=5), make_distill_model(cfg).train()
    distiller = build_distiller(cfg, teacher, student).train()
    calls, groups = [], []
    teacher.register_forward_hook(lambda m, args, out: calls.append(out))
    student.register_forward_pre_hook(lambda m, args, kwargs: groups.append(kwargs.get("groups")), with_kwargs=True)
    distill_losses(distiller, student)
    assert len(calls) == 1
    anchors = groups[0][0]
    torch.testing.assert_close(anchors.boxes, calls[0].encoder.boxes.float())
    assert not anchors.content.any()


def test_own_content_is_the_rt_detr_denoising_embedding(make_config, make_distill_model, make_distill_batch):
    cfg = make_config(method="clock")
    model = make_distill_model(cfg)
    images, targets = make_distill_batch()
    torch.manual_seed(4)
    spec = TargetQuerySampler(model.num_classes, 3, 0.1, 5)(images, targets)
    has_class = spec.labels < model.num_classes
    content = query_group(model, spec, own_content=True).content
    assert torch.equal(content[has_class], model.label_enc.weight[spec.labels[has_class]])
    assert not content[~has_class].any()


def test_rt_detr_teacher_runs_in_bf16_autocast(make_config, make_distill_model, distill_losses):
    """The teacher under bf16 autocast gives the fp32 terms to bf16 precision (untrained box heads start at
    zero, so both models answer the shared anchors with the anchors themselves: box term 0)."""
    values = {}
    for dtype in ("fp32", "bf16"):
        cfg = make_config(method="clock")
        cfg.distill.teacher_dtype = dtype
        teacher = make_distill_model(make_config(hidden=48, dec_layers=3), seed=5)
        student = make_distill_model(cfg).train()
        distiller = build_distiller(cfg, teacher, student).train()
        values[dtype] = {k: v.item() for k, v in distill_losses(distiller, student)[1].items()}
    assert values["bf16"].keys() == {"loss_mem", "loss_logit_cls", "loss_logit_box"}
    assert values["fp32"]["loss_mem"] > 0 and values["fp32"]["loss_logit_cls"] > 0
    for key, value in values["fp32"].items():
        assert values["bf16"][key] == pytest.approx(value, rel=2e-2, abs=1e-6), key


@pytest.mark.parametrize("teacher_arch", ["rt_detr", "dino"])
def test_c4_teacher_answers_the_rt_detr_students_selected_queries(teacher_arch, make_config, make_distill_model,
                                                                  distill_losses):
    """distill.logit.anchors=student (C4): the teacher is asked the anchors of the student's selected queries
    (zero content), then the general queries, and the term reaches the student's matching predictions."""
    cfg = make_config(method="clock")
    cfg.distill.logit.anchors = "student"
    teacher = make_distill_model(make_config(teacher_arch, hidden=48, dec_layers=3), seed=5)
    student = make_distill_model(cfg).train()
    distiller = build_distiller(cfg, teacher, student).train()
    calls = []
    teacher.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs), with_kwargs=True)
    student_out, losses = distill_losses(distiller, student)
    ((group,),) = [kwargs["groups"] for kwargs in calls]
    queries = cfg.model.num_queries
    assert group.segments == (queries, 5) and not group.content.any()
    torch.testing.assert_close(group.boxes[:, :queries], student_out.anchors, rtol=0, atol=0)
    torch.testing.assert_close(student_out.anchors, student_out.encoder.boxes.detach())
    assert losses["loss_logit_cls"] > 0 and all(torch.isfinite(v) for v in losses.values())
    (grad,) = torch.autograd.grad(losses["loss_logit_cls"], student_out.stages[-1].logits)
    assert grad.abs().sum() > 0
