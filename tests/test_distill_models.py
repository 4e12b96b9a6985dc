"""Distillation with the real (tiny) detectors: zero-for-copies, gradients, isolation, export, resume."""
import copy
import io

import onnx
import pytest
import torch
from torch import nn

from clock_deploy.config import Config, ConfigError, load_config
from clock_deploy.distill import build_distiller
from clock_deploy.distill.queries import TargetQuerySampler, query_group
from clock_deploy.checkpoint import save_checkpoint
from clock_deploy.training.commands import load_teacher
from clock_deploy.training.trainer import TrainStep
from clock_deploy.errors import UserError
from clock_deploy.export.onnx import expected_tracing_notes_silenced
from clock_deploy.models.build import build_criterion, build_model

ARCHS = ["dab_detr", "deformable_detr", "dino"]
OTHER_FAMILY = {"dab_detr": "dino", "deformable_detr": "dab_detr", "dino": "deformable_detr"}


@pytest.mark.parametrize("method,arch", [("clock", "dab_detr"), ("clock", "deformable_detr"), ("clock", "dino"),
                                         ("kd_detr", "dab_detr"), ("fgd", "deformable_detr")])
def test_terms_zero_for_an_exact_copy_and_positive_otherwise(method, arch, make_distill_config, make_distill_model,
                                                             distill_losses, perturb):
    # KD-DETR supervises every student stage with the teacher's last one, so only a one-layer
    # copy matches it exactly; and only DAB-DETR's matching queries have the zero content the
    # student's copy of the teacher anchors gets
    cfg = make_distill_config(arch, method=method, dec_layers=1 if method == "kd_detr" else 2)
    teacher = make_distill_model(cfg)
    student = copy.deepcopy(teacher).train()
    distiller = build_distiller(cfg, teacher, student).train()
    _, losses = distill_losses(distiller, student)
    expected = {"clock": {"loss_mem", "loss_logit_cls", "loss_logit_box"},
                "kd_detr": {"loss_kd_anchor_cls", "loss_kd_anchor_box", "loss_kd_random_cls", "loss_kd_random_box"},
                "fgd": {"loss_fgd_focal", "loss_fgd_attn", "loss_fgd_global"}}[method]
    assert set(losses) == expected
    # not exactly 0: the teacher batches the queries differently (logits agree to ~5e-7), and the
    # KL's tau^2 = 100 scales that float noise up
    for name, value in losses.items():
        assert abs(value.item()) < 1e-5, name  # tau^2 = 100 scales float rounding
    perturb(student)
    _, losses = distill_losses(distiller, student)
    for name, value in losses.items():
        assert value.item() > 1e-4, name


@pytest.fixture(scope="module")
def cross_family(make_distill_config, make_distill_model):
    """cross_family(student_arch, method) -> (cfg, teacher, student, distiller): a student (hidden 32, 2 layers)
    and a teacher of another family (hidden 48, 3 layers)."""
    def build(student_arch, method):
        cfg = make_distill_config(student_arch, method=method)
        teacher = make_distill_model(make_distill_config(OTHER_FAMILY[student_arch], hidden=48, dec_layers=3), seed=5)
        student = make_distill_model(cfg).train()
        return cfg, teacher, student, build_distiller(cfg, teacher, student).train()
    return build


@pytest.mark.parametrize("method", ["clock", "kd_detr", "fgd"])
def test_gradients_reach_student_and_adapters_only(method, distill_losses, cross_family):
    cfg, teacher, student, distiller = cross_family("dino", method)
    _, losses = distill_losses(distiller, student)
    sum(losses.values()).backward()

    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    trainable = {n for n, p in distiller.named_parameters() if p.requires_grad}
    assert trainable == {"map_terms." + n for n, _ in distiller.map_terms.named_parameters()}
    assert set(distiller.trainable_state()) == set(distiller.map_terms.state_dict())
    if method == "kd_detr":
        assert not trainable  # no adapters: query terms compare outputs in the same class / box space
    else:
        adapter_grads = [p.grad for n, p in distiller.named_parameters() if "adapters" in n]
        assert adapter_grads and all(g is not None and g.abs().sum() > 0 for g in adapter_grads)
    grads = {n: p.grad for n, p in student.named_parameters()}
    reached = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
    if method != "kd_detr":
        assert any(n.startswith("backbone.") for n in reached)  # feature / memory terms reach the backbone
    if method != "fgd":
        assert any("class_embed" in n for n in reached)  # query terms reach the heads


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("training", [False, True])
def test_target_aware_group_does_not_change_normal_predictions(arch, training, make_distill_config,
                                                               make_distill_model, make_distill_batch,
                                                               assert_group_hides_padding):
    cfg = make_distill_config(arch)
    model = make_distill_model(cfg).train(training)
    images, targets = make_distill_batch()
    torch.manual_seed(4)
    spec = TargetQuerySampler(model.num_classes, 3, 0.1, 5)(images, targets)
    torch.manual_seed(7)
    plain = model(images, targets)
    torch.manual_seed(7)  # DINO's denoising queries draw the same noise
    with_group = model(images, targets, groups=[query_group(model, spec)])
    assert len(with_group.groups) == 1 and with_group.groups[0][-1].boxes.shape[1] == spec.num_queries
    for a, b in zip(plain.stages, with_group.stages):
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.boxes, a.boxes, rtol=1e-5, atol=1e-5)
    assert_group_hides_padding(model, images, targets, spec, with_group)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_distills_from_another_family(arch, make_distill_batch, distill_losses, cross_family):
    cfg, teacher, student, distiller = cross_family(arch, "clock")
    step = TrainStep(student, build_criterion(cfg.loss, cfg.model), distiller).train()
    assert not teacher.training and student.training
    teacher_before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    params = [p for p in step.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    images, targets = make_distill_batch()
    losses = step(images, targets)
    assert {"loss_mem", "loss_logit_cls", "loss_logit_box"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    optimizer.step()
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())

    # exact resume: a rebuilt distiller + the saved adapters give the same losses
    state = copy.deepcopy(distiller.trainable_state())
    rebuilt = build_distiller(cfg, teacher, student).train()
    rebuilt.load_trainable_state(state)
    a, b = distill_losses(distiller, student)[1], distill_losses(rebuilt, student)[1]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kd_detr_averages_its_l1_and_tcld_sums_it(make_distill_config, make_distill_model):
    for method, mean in [("kd_detr", True), ("clock", False)]:
        cfg = make_distill_config("dab_detr", method=method)
        distiller = build_distiller(cfg, make_distill_model(cfg), make_distill_model(cfg, seed=1))
        assert [term.l1_mean for term in distiller.query_terms.values()] == [mean] * len(distiller.query_terms)


@pytest.mark.parametrize("value", ["model", "sine"])
def test_removed_lcmd_position_option_is_refused(value, make_distill_config, make_distill_model):
    cfg = make_distill_config("dab_detr", method="clock")
    cfg.distill.mem.pos_embed = value
    with pytest.raises(UserError, match="distill.mem.pos_embed.*removed"):
        build_distiller(cfg, make_distill_model(cfg), make_distill_model(cfg, seed=1))


@pytest.mark.parametrize("key,value", [("weighting", "focal"), ("attention_temperature", "0"),
                                       ("attention_temperature", "-0.5")])
def test_lcmd_attention_weighting_keys_are_validated(key, value):
    with pytest.raises(ConfigError, match=f"distill.mem.{key}"):
        load_config(None, [f"distill.mem.{key}={value}"])


def test_lcmd_attention_weighting_builds_for_dino_and_changes_only_the_memory_term(distill_losses, same_family):
    # candidate C3 of studies/distill_ab_preregistration.md, from the config keys a run sets
    overrides = load_config(None, ["distill.mem.weighting=gt_attention", "distill.mem.attention_temperature=0.5"])
    assert Config().distill.mem.weighting == "gt"  # off by default: the shipped CLoCK is unchanged
    cfg, teacher, student, plain = same_family("dino")
    cfg.distill.mem = overrides.distill.mem
    weighted = build_distiller(cfg, teacher, student).train()
    weighted.load_state_dict(plain.state_dict())  # the same adapters
    lcmd = weighted.map_terms["lcmd"]
    assert (lcmd.weighting, lcmd.attention_temperature) == ("gt_attention", 0.5)
    assert plain.map_terms["lcmd"].weighting == "gt"
    _, on = distill_losses(weighted, student)
    _, off = distill_losses(plain, student)
    assert set(on) == set(off) == {"loss_mem", "loss_logit_cls", "loss_logit_box"}
    mem_on, mem_off = on["loss_mem"].item(), off["loss_mem"].item()
    assert mem_off > 0 and abs(mem_on - mem_off) > 1e-3 * mem_off
    assert on["loss_logit_cls"].item() == pytest.approx(off["loss_logit_cls"].item())
    assert on["loss_logit_box"].item() == pytest.approx(off["loss_logit_box"].item())


@pytest.mark.parametrize("arch,two_stage", [("dab_detr", False), ("deformable_detr", False),
                                            ("deformable_detr", True), ("dino", False), ("rt_detr", False)])
def test_teacher_skips_its_matching_queries_where_no_loss_reads_them(arch, two_stage, make_distill_config,
                                                                     make_distill_model, make_distill_batch):
    # every family answers its groups alone; the groups are isolated, so the answers are the same
    cfg = make_distill_config(arch, method="clock")
    cfg.model.two_stage = two_stage
    teacher, student = make_distill_model(cfg), make_distill_model(cfg, seed=1)
    distiller = build_distiller(cfg, teacher, student).train()
    images, targets = make_distill_batch()
    spec = distiller.sampler(images, targets)
    with torch.no_grad():
        full = teacher(images, groups=[query_group(teacher, spec, own_content=False)])
    alone = distiller.run_teacher(images, spec)
    assert full.stages[-1].logits.shape[1] == cfg.model.num_queries and alone.stages[-1].logits.shape[1] == 0
    for a, b in zip(full.groups[0], alone.groups[0]):
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.boxes, a.boxes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone.memory[0], full.memory[0])
    # KD-DETR's teacher-anchor term reads the matching predictions: its teacher keeps them
    kd_cfg = make_distill_config(arch, method="kd_detr")
    kd_cfg.model.two_stage = two_stage
    kd = build_distiller(kd_cfg, teacher, student)
    assert kd.run_teacher(images, kd.sampler(images, targets)).stages[-1].logits.shape[1] == cfg.model.num_queries


def test_wrong_trainable_state_is_a_user_error(make_distill_config, cross_family):
    cfg, teacher, student, distiller = cross_family("dino", "clock")
    fgd_cfg = make_distill_config("dino", method="fgd")
    other = build_distiller(fgd_cfg, teacher, student)
    with pytest.raises(UserError, match="distill.method"):
        distiller.load_trainable_state(other.trainable_state())


def test_batch_without_ground_truth(make_distill_config, make_distill_model, make_distill_batch):
    cfg = make_distill_config("deformable_detr", method="clock")
    cfg.distill.logit.random_queries = 0
    teacher, student = make_distill_model(cfg), make_distill_model(cfg, seed=1)
    distiller = build_distiller(cfg, teacher, student).train()
    images, _ = make_distill_batch()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    out, losses = distiller(student, images, empty)
    assert out.groups == [] and losses["loss_logit_cls"] == 0 and losses["loss_logit_box"] == 0
    assert losses["loss_mem"] > 0  # background pixels still distil (beta term)


class Predictions(nn.Module):
    """The model alone in eval mode, as the exporter sees it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        out = self.model(images)
        return out.pred_logits, out.pred_boxes


def onnx_summary(model):
    buffer = io.BytesIO()
    with expected_tracing_notes_silenced():
        torch.onnx.export(Predictions(model).eval(), torch.randn(1, 3, 64, 96), buffer, dynamo=False,
                          opset_version=17, input_names=["images"], output_names=["logits", "boxes"])
    graph = onnx.load_from_string(buffer.getvalue()).graph
    return {"bytes": len(buffer.getvalue()), "ops": [n.op_type for n in graph.node],
            "initializers": sorted(tuple(t.dims) for t in graph.initializer)}


@pytest.mark.parametrize("arch", ARCHS)
def test_distilled_student_exports_like_an_undistilled_one(arch, make_distill_model, make_distill_batch, cross_family):
    cfg, teacher, student, distiller = cross_family(arch, "clock")
    never_distilled = make_distill_model(cfg, seed=9)
    step = TrainStep(student, build_criterion(cfg.loss, cfg.model), distiller).train()
    optimizer = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=1e-3)
    images, targets = make_distill_batch()
    sum(step(images, targets).values()).backward()
    optimizer.step()

    # same modules, parameter names and shapes as a model that never saw a teacher
    assert [(n, p.shape) for n, p in student.state_dict().items()] == \
        [(n, p.shape) for n, p in never_distilled.state_dict().items()]
    assert [n for n, _ in student.named_modules()] == [n for n, _ in never_distilled.named_modules()]
    assert not student._forward_hooks and not student._forward_pre_hooks
    # and its ONNX graph is exactly the one of a plain model holding the same weights
    plain = build_model(cfg.model)
    plain.load_state_dict(student.state_dict())
    distilled, undistilled = onnx_summary(student.eval()), onnx_summary(plain.eval())
    assert distilled == undistilled
    assert len(distilled["initializers"]) > 20


def test_distill_needs_a_teacher_with_the_same_classes(tmp_path, make_distill_config):
    cfg = make_distill_config("dab_detr", method="clock")
    with pytest.raises(UserError, match="distill.teacher"):
        load_teacher(cfg, "cpu")
    cfg.distill.teacher = str(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="not found"):
        load_teacher(cfg, "cpu")

    teacher_cfg = make_distill_config("dino", hidden=48)
    teacher_cfg.model.num_classes, teacher_cfg.data.classes = 8, "kitti8"
    from clock_deploy.data.kitti import class_names
    save_checkpoint(tmp_path / "t8.pt", build_model(teacher_cfg.model), teacher_cfg, class_names("kitti8"), 1, 10)
    cfg.distill.teacher = str(tmp_path / "t8.pt")
    with pytest.raises(UserError, match="classes"):
        load_teacher(cfg, "cpu")

    teacher_cfg.model.num_classes, teacher_cfg.data.classes = 3, "kitti3"
    save_checkpoint(tmp_path / "t3.pt", build_model(teacher_cfg.model), teacher_cfg, class_names("kitti3"), 1, 10)
    cfg.distill.teacher = str(tmp_path / "t3.pt")
    state = torch.get_rng_state()
    teacher = load_teacher(cfg, "cpu")
    assert torch.equal(torch.get_rng_state(), state)  # a distilled run draws what the plain run draws
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert build_distiller(cfg, teacher, build_model(cfg.model)) is not None

    wrong = make_distill_config("dab_detr", method="clock")
    wrong.model.num_classes = 8
    with pytest.raises(UserError, match="classes"):
        build_distiller(wrong, teacher, build_model(wrong.model))


@pytest.mark.parametrize("name,method", [("distill", "clock"), ("distill_kd_detr", "kd_detr"),
                                         ("distill_fgd", "fgd")])
def test_demo_distill_configs_build(name, method):
    cfg = load_config(f"configs/demo/{name}.yaml")
    student_cfg = load_config("configs/demo/student.yaml")
    assert cfg.distill.method == method and cfg.model == student_cfg.model and cfg.data == student_cfg.data
    teacher_cfg = load_config("configs/demo/teacher.yaml")
    assert cfg.distill.teacher == teacher_cfg.output_dir + "/last.pt"  # where `clock-deploy train` leaves it
    teacher = build_model(teacher_cfg.model)
    distiller = build_distiller(cfg, teacher, build_model(cfg.model))
    adapters = [n for n, _ in distiller.named_parameters() if n.endswith("weight") and "adapters" in n]
    # student and teacher both keep strides 8, 16, 32; widths 64 -> 128 need a conv per level
    assert len(adapters) == (0 if method == "kd_detr" else 3)


# ---------------------------------------------------------------- queries in each model's own language

@pytest.fixture(scope="module")
def same_family(make_distill_config, make_distill_model):
    """same_family(arch, method="clock", **model_overrides) -> (cfg, teacher, student, distiller): a student
    (hidden 32, 2 layers) and a wider, deeper teacher of the same family (hidden 48, 3 layers)."""
    def build(arch, method="clock", **overrides):
        cfg = make_distill_config(arch, method=method)
        for key, value in overrides.items():
            setattr(cfg.model, key, value)
        teacher_cfg = make_distill_config(arch, hidden=48, dec_layers=3)
        for key, value in overrides.items():
            setattr(teacher_cfg.model, key, value)
        teacher, student = make_distill_model(teacher_cfg, seed=5), make_distill_model(cfg).train()
        return cfg, teacher, student, build_distiller(cfg, teacher, student).train()
    return build


@pytest.mark.parametrize("arch", ARCHS)
def test_query_content_comes_from_each_models_own_embedding(arch, make_distill_batch, same_family):
    cfg, teacher, student, distiller = same_family(arch)
    images, targets = make_distill_batch()
    torch.manual_seed(4)
    spec = distiller.sampler(images, targets)
    has_class = spec.labels < cfg.model.num_classes
    assert has_class.any() and (~has_class).any()
    for model in (teacher, student):
        content = query_group(model, spec).content
        assert content.shape == (*spec.labels.shape, model.hidden_dim)
        if arch == "dino":  # DINO's own denoising label embedding; class-free slots get zero, as DINO pads
            assert torch.equal(content[has_class], model.label_enc.weight[spec.labels[has_class]])
            assert not content[~has_class].any()
        else:  # DAB-DETR / Deformable DETR queries start from zero content
            assert not content.any()


@pytest.mark.parametrize("content", ["own", "zero"])
def test_distill_logit_content_zero_asks_dino_without_its_label_embedding(content, make_distill_config,
                                                                          make_distill_model, distill_losses):
    cfg = make_distill_config("dino", method="clock")
    cfg.distill.logit.content = content
    teacher = make_distill_model(make_distill_config("dino", hidden=48, dec_layers=3), seed=5)
    student = make_distill_model(cfg).train()
    distiller = build_distiller(cfg, teacher, student).train()
    asked, embedded = {}, []
    for name, model in (("teacher", teacher), ("student", student)):
        model.register_forward_hook(lambda m, args, kwargs, out, name=name: asked.update({name: kwargs["groups"]}),
                                    with_kwargs=True)
        model.label_enc.register_forward_hook(lambda m, args, out, name=name: embedded.append(name))
    _, losses = distill_losses(distiller, student)
    for groups in asked.values():
        (group,) = groups
        assert group.content.any() == (content == "own")  # "own": label_enc of the GT slots' classes
    # "own" asks the teacher in the teacher's words (and the student in its own; the student's label_enc
    # also serves its denoising queries, so only the teacher tells "zero" apart)
    assert ("teacher" in embedded) == (content == "own") and (content == "zero" or "student" in embedded)
    assert losses["loss_logit_cls"] > 0


def test_target_aware_queries_have_zero_content_by_default(make_distill_config):
    # chosen on the tuning split by the second DINO follow-up (studies/archive/distill_content/report.md)
    assert make_distill_config("dino", method="clock").distill.logit.content == "zero"


def test_deformable_group_position_carries_box_size(make_distill_config, make_distill_model, make_distill_batch,
                                                    perturb):
    from clock_deploy.distill.queries import class_free
    cfg = make_distill_config("deformable_detr")  # one-stage: the reference point is only the centre
    model = make_distill_model(cfg).eval()
    perturb(model, 0.2)  # Deformable DETR starts with zero sampling-offset / attention weights
    images, _ = make_distill_batch()
    boxes = torch.tensor([[[0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.6, 0.4]]]).expand(2, -1, -1)
    with torch.no_grad():
        out = model(images, groups=[query_group(model, class_free(boxes, 3))])
    first = out.groups[0][0]
    assert not torch.allclose(first.logits[:, 0], first.logits[:, 1])
    assert not torch.allclose(first.boxes[:, 0, 2:], first.boxes[:, 1, 2:])


# ---------------------------------------------------------------- KD-DETR as published

def count_forwards(model):
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(out), with_kwargs=True)
    return calls


def student_groups(model):
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("groups")), with_kwargs=True)
    return seen


@pytest.mark.parametrize("arch,two_stage", [("dab_detr", False), ("deformable_detr", False),
                                            ("deformable_detr", True), ("dino", False)])
def test_kd_detr_anchors_come_from_the_teacher_queries_and_the_teacher_runs_once(arch, two_stage, distill_losses,
                                                                                 same_family):
    cfg, teacher, student, distiller = same_family(arch, "kd_detr", two_stage=two_stage)
    teacher_calls, groups = count_forwards(teacher), student_groups(student)
    _, losses = distill_losses(distiller, student)
    assert len(teacher_calls) == 1  # one teacher forward per step, random points included
    assert set(losses) == {"loss_kd_anchor_cls", "loss_kd_anchor_box", "loss_kd_random_cls", "loss_kd_random_box"}
    anchors, random = groups[0]
    teacher_out = teacher_calls[0]
    assert anchors.boxes.shape[1] == teacher.num_queries and random.boxes.shape[1] == 5
    if arch == "dab_detr":  # the learned anchor embedding
        expected = teacher.refpoint_embed.weight.sigmoid()[None].expand(2, -1, -1)
    elif arch == "dino" or two_stage:  # the encoder proposals the matching queries start from
        expected = teacher_out.encoder.boxes
    else:  # learned reference points (centres) with the size the first layer gives them
        centres = teacher.reference_points(teacher.query_embed.weight[:, :teacher.hidden_dim]).sigmoid()
        expected = torch.cat([centres[None].expand(2, -1, -1), teacher_out.stages[0].boxes[..., 2:]], -1)
    torch.testing.assert_close(anchors.boxes, expected.float())
    assert not anchors.content.any() and not random.content.any()  # zero content, as in KD-DETR
    assert torch.equal(random.boxes[0], random.boxes[1])  # one nn.Embedding(n, 4) draw for the batch
    assert distiller.query_terms["anchors"].tau == 10


def test_teacher_runs_under_inference_mode_and_optional_bf16(distill_losses, same_family):
    cfg, teacher, student, distiller = same_family("dino")
    calls = []
    teacher.register_forward_hook(lambda m, args, out: calls.append(
        (torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"))))
    _, fp32 = distill_losses(distiller, student)
    cfg.distill.teacher_dtype = "bf16"
    bf16_distiller = build_distiller(cfg, teacher, student).train()
    del calls[1:]  # building probes the teacher once
    _, bf16 = distill_losses(bf16_distiller, student)
    assert calls == [(True, False), (True, True)]
    sum(bf16.values()).backward()
    for key in fp32:
        assert torch.isfinite(bf16[key]) and bf16[key].dtype == torch.float32
        assert bf16[key].item() == pytest.approx(fp32[key].item(), rel=0.1, abs=1e-3)
    cfg.distill.teacher_dtype = "fp16"
    with pytest.raises(UserError, match="CUDA"):
        build_distiller(cfg, teacher, student)


def test_repeats_without_noise_is_a_user_error(make_distill_config, make_distill_model):
    cfg = make_distill_config("dab_detr", method="clock")
    cfg.distill.logit.box_noise = 0.0
    with pytest.raises(UserError, match="box_noise"):
        build_distiller(cfg, make_distill_model(cfg), make_distill_model(cfg))


# ---------------------------------------------------------------- gradient shares

def test_gradient_shares_by_hand():
    from clock_deploy.training.trainer import gradient_shares
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    losses = {"loss_ce": (3 * w).sum(), "loss_mem": (w * w).sum(), "class_error": torch.tensor(5.0)}
    shares = gradient_shares(losses, ("loss_mem",), [w])
    # |d det| = |(3, 3)| = 4.243, |d mem| = |(2, 4)| = 4.472
    assert shares["grad_norm_detection"] == pytest.approx(18 ** 0.5, rel=1e-5)
    assert shares["grad_norm_loss_mem"] == pytest.approx(20 ** 0.5, rel=1e-5)
    assert shares["grad_share_loss_mem"] == pytest.approx(20 ** 0.5 / (18 ** 0.5 + 20 ** 0.5), abs=1e-4)
    assert w.grad is None  # nothing accumulated: the real backward is still to come


def test_distill_run_logs_gradient_shares(tmp_path, make_synthetic_data, make_train_config):
    import json
    from clock_deploy.training.commands import run_training
    data = make_synthetic_data(tmp_path / "data", num_images=4)  # its own: the logged iterations depend on the size
    teacher_cfg = make_train_config(data, str(tmp_path / "teacher"), extra=["train.max_iters=1", "train.eval_every=-1"])
    run_training(teacher_cfg, progress=False)
    cfg = make_train_config(data, str(tmp_path / "distill"), extra=[
        "distill.method=clock", f"distill.teacher={tmp_path / 'teacher' / 'last.pt'}", "distill.grad_share_every=2",
        "distill.logit.random_queries=5", "train.epochs=3", "train.eval_every=-1"])
    run_training(cfg, progress=False)
    records = [json.loads(line) for line in (tmp_path / "distill" / "log.jsonl").read_text().splitlines()]
    shares = [r for r in records if "grad_share_detection" in r]
    assert [r["iteration"] for r in shares] == [1, 3]
    for r in shares:
        keys = {"detection", "loss_mem", "loss_logit_cls", "loss_logit_box"}
        assert {f"grad_share_{k}" for k in keys} <= set(r)
        assert sum(r[f"grad_share_{k}"] for k in keys) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("method", ["clock", "kd_detr", "fgd"])
def test_distilling_leaves_the_global_rng_stream_as_plain_training(method, make_distill_batch, same_family):
    # paired A/B: a distilled run of a seed must see the same flips and denoising noise as the plain run
    cfg, teacher, student, _ = same_family("dino", method)
    images, targets = make_distill_batch()
    torch.manual_seed(11)
    student(images, targets)
    plain = torch.get_rng_state()
    torch.manual_seed(11)
    distiller = build_distiller(cfg, teacher, student).train()
    groups = student_groups(student)
    distiller(student, images, targets)
    assert torch.equal(torch.get_rng_state(), plain)
    if method != "fgd":  # the random queries still change from step to step (the side stream is seeded per step)
        distiller.begin_step(epoch=0, iteration=1)
        distiller(student, images, targets)
        assert not torch.equal(groups[0][-1].boxes, groups[1][-1].boxes)


# ---------------------------------------------------------------- C4: the student's matching anchors (logit.anchors)

@pytest.fixture(scope="module")
def c4_family(same_family):
    """c4_family(arch, anchors="student", two_stage=False): same_family's pair with distill.logit.anchors set."""
    def build(arch, anchors="student", two_stage=False):
        cfg, teacher, student, _ = same_family(arch, two_stage=two_stage)
        cfg.distill.logit.anchors = anchors
        return cfg, teacher, student, build_distiller(cfg, teacher, student).train()
    return build


def teacher_calls(model):
    """(kwargs, output) of every forward of the model."""
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append((kwargs, out)), with_kwargs=True)
    return calls


@pytest.mark.parametrize("arch,two_stage", [("dab_detr", False), ("deformable_detr", False),
                                            ("deformable_detr", True), ("dino", False)])
def test_c4_teacher_answers_the_students_matching_anchors_of_the_step(arch, two_stage, distill_losses, c4_family,
                                                                      perturb):
    cfg, teacher, student, distiller = c4_family(arch, two_stage=two_stage)
    perturb(student)  # untrained box heads start at zero: both models would answer the anchors with themselves
    calls = teacher_calls(teacher)
    student_out, losses = distill_losses(distiller, student)
    assert set(losses) == {"loss_mem", "loss_logit_cls", "loss_logit_box"}
    ((kwargs, teacher_out),) = calls  # one teacher forward, after the student's, without its matching queries
    (group,) = kwargs["groups"]
    assert kwargs["matching"] is False and teacher_out.stages[0].logits.shape[1] == 0
    queries = cfg.model.num_queries
    assert group.segments == (queries, 5)  # the student's anchors, then the general queries: no GT copies
    assert not group.content.any() and not group.pad_mask.any()
    assert student_out.anchors.shape == (2, queries, 4) and not student_out.anchors.requires_grad
    torch.testing.assert_close(group.boxes[:, :queries], student_out.anchors, rtol=0, atol=0)
    if arch == "dino" or two_stage:  # the selected encoder proposals its decoder starts from
        torch.testing.assert_close(student_out.anchors, student_out.encoder.boxes.detach())
    elif arch == "dab_detr":  # the learned anchors
        learned = student.refpoint_embed.weight.sigmoid()[None].expand(2, -1, -1)
        torch.testing.assert_close(student_out.anchors, learned)
    for value in losses.values():
        assert torch.isfinite(value) and value > 0
    # the student's matching predictions take the term's gradient (shipped CLoCK: only its extra group does)
    matching_logits = student_out.stages[-1].logits
    (grad,) = torch.autograd.grad(losses["loss_logit_cls"], matching_logits, retain_graph=True)
    assert grad.abs().sum() > 0


def test_c4_compares_slot_to_slot_with_the_students_matching_predictions(make_distill_config, make_distill_model,
                                                                         distill_losses, perturb):
    # DAB-DETR's matching queries have zero content on their anchors: a copy asked its own anchors with zero
    # content answers exactly as its matching queries, so the term is 0 only if the slots line up
    cfg = make_distill_config("dab_detr", method="clock")
    cfg.distill.logit.anchors = "student"
    teacher = make_distill_model(cfg)
    student = copy.deepcopy(teacher).train()
    distiller = build_distiller(cfg, teacher, student).train()
    _, losses = distill_losses(distiller, student)
    assert abs(losses["loss_logit_cls"].item()) < 1e-5 and abs(losses["loss_logit_box"].item()) < 1e-5
    perturb(student)
    _, losses = distill_losses(distiller, student)
    assert losses["loss_logit_cls"] > 1e-4 and losses["loss_logit_box"] > 1e-4


def test_c4_without_general_queries_distils_the_matching_predictions_alone(distill_losses, same_family):
    cfg, teacher, student, _ = same_family("dino")
    cfg.distill.logit.anchors, cfg.distill.logit.random_queries = "student", 0
    distiller = build_distiller(cfg, teacher, student).train()
    calls = teacher_calls(teacher)
    student_out, losses = distill_losses(distiller, student)
    (group,) = calls[0][0]["groups"]
    assert student_out.groups == [] and group.boxes.shape[1] == cfg.model.num_queries
    assert losses["loss_logit_cls"] > 0 and losses["loss_logit_box"] > 0


def flat_grad(loss, model):
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return torch.cat([g.flatten() for g in grads if g is not None])


def test_c4_changes_the_loss_and_the_direction_of_the_students_gradient(distill_losses, c4_family, perturb):
    values, grads = {}, {}
    for anchors in ("gt", "student"):
        cfg, teacher, student, distiller = c4_family("dino", anchors)
        perturb(student)  # untrained box heads start at zero: the box term would be 0 either way
        _, losses = distill_losses(distiller, student)
        values[anchors] = {k: v.item() for k, v in losses.items()}
        grads[anchors] = flat_grad(losses["loss_logit_cls"] + losses["loss_logit_box"], student)
    assert values["gt"]["loss_mem"] == pytest.approx(values["student"]["loss_mem"], rel=1e-6)  # LCMD is as it was
    for key in ("loss_logit_cls", "loss_logit_box"):
        assert values["gt"][key] != pytest.approx(values["student"][key], rel=1e-3), key
    cosine = torch.nn.functional.cosine_similarity(grads["gt"], grads["student"], dim=0)
    assert cosine < 0.999


@pytest.mark.parametrize("arch,two_stage", [("dab_detr", False), ("deformable_detr", False),
                                            ("deformable_detr", True), ("dino", False)])
def test_c4_student_anchor_segment_is_isolated_from_the_general_queries(arch, two_stage, make_distill_batch, c4_family,
                                                                        perturb):
    from clock_deploy.distill.queries import class_free, concat
    cfg, teacher, student, distiller = c4_family(arch, two_stage=two_stage)
    perturb(teacher, 0.2)  # Deformable DETR starts with zero sampling-offset / attention weights
    images, targets = make_distill_batch()
    with torch.no_grad():
        anchors = class_free(student(images, targets).anchors, student.num_classes)
    general = distiller.sampler(images, targets)
    both = distiller.run_teacher(images, concat(anchors, general))
    alone = distiller.run_teacher(images, anchors)
    queries = cfg.model.num_queries
    for a, b in zip(alone.groups[0], both.groups[0]):
        torch.testing.assert_close(b.logits[:, :queries], a.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.boxes[:, :queries], a.boxes, rtol=1e-5, atol=1e-5)
    # and the general queries are seen by nothing else: moving them leaves the anchors' answers alone
    moved = concat(anchors, class_free(general.boxes.flip(1), student.num_classes))
    for a, b in zip(alone.groups[0], distiller.run_teacher(images, moved).groups[0]):
        torch.testing.assert_close(b.logits[:, :queries], a.logits, rtol=1e-5, atol=1e-5)


def test_c4_needs_a_teacher(make_distill_config, make_distill_model):
    cfg = make_distill_config("dino", method="gt_denoise")
    cfg.distill.logit.anchors = "student"
    with pytest.raises(UserError, match="distill.logit.anchors"):
        build_distiller(cfg, None, make_distill_model(cfg))


def test_c4_is_off_by_default(make_distill_config):
    assert make_distill_config("dino", method="clock").distill.logit.anchors == "gt"
