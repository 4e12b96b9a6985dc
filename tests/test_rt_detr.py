"""RT-DETR(v2): the model against transformers' RTDetrV2ForObjectDetection through the importer,
its parts (ResNet-vd, discrete sampling, per-level points), and its loss against transformers' RTDetrLoss."""
import pytest
import torch

from clock_deploy.convert.importer import build_imported_model, import_checkpoint
from clock_deploy.models.deform_attn import MSDeformAttn, ms_deform_attn, ms_deform_attn_points

transformers = pytest.importorskip("transformers")


def max_diffs(hf_model, project_model, image):
    with torch.no_grad():
        ref, own = hf_model(pixel_values=image), project_model(image)
    return ((ref.logits - own.pred_logits).abs().max().item(), (ref.pred_boxes - own.pred_boxes).abs().max().item())


def imported(folder):
    return build_imported_model(import_checkpoint(folder), str(folder))


@pytest.mark.parametrize("method", ["default", "discrete"])
@pytest.mark.parametrize("num_labels", [1, 3])
@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"], ids=["r18vd", "r50vd"])
def test_rt_detr_v2_matches_transformers(tmp_path, layer_type, num_labels, method, make_hf_rt_detr):
    hf_model = make_hf_rt_detr(tmp_path, num_labels, layer_type, method)
    cfg, model = imported(tmp_path)
    m = cfg.model
    assert (m.arch, m.num_classes, m.rt_detr.method, m.backbone.depth) == \
        ("rt_detr", num_labels, method, 18 if layer_type == "basic" else 50)
    image = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    logits_diff, boxes_diff = max_diffs(hf_model, model, image)
    assert logits_diff <= 1e-4 and boxes_diff <= 1e-4, (logits_diff, boxes_diff)


def test_sampling_method_is_what_makes_discrete_match(tmp_path, make_hf_rt_detr):
    """The check can fail: the bilinear rule on the discrete reference gives other outputs."""
    hf_model = make_hf_rt_detr(tmp_path, 3, "basic", "discrete")
    imp = import_checkpoint(tmp_path)
    imp.overrides["rt_detr"]["method"] = "default"
    _, model = build_imported_model(imp, str(tmp_path))
    logits_diff, _ = max_diffs(hf_model, model, torch.randn(1, 3, 64, 96))
    assert logits_diff > 1e-3


def test_rt_detr_v1_matches_transformers(tmp_path, make_hf_rt_detr):
    hf_model = make_hf_rt_detr(tmp_path, 3, "basic", version=1)
    _, model = imported(tmp_path)
    logits_diff, boxes_diff = max_diffs(hf_model, model, torch.randn(2, 3, 64, 96))
    assert logits_diff <= 1e-4 and boxes_diff <= 1e-4, (logits_diff, boxes_diff)


def test_discrete_sampling_reads_the_nearest_pixel_clamped_to_the_map():
    value = torch.arange(12.0).view(1, 12, 1, 1)  # one level 3 x 4, one head, one channel
    # (x, y) -> pixel floor(x * 4 + 0.5), floor(y * 3 + 0.5), clamped
    locations = torch.tensor([[0.0, 0.0], [0.3, 0.5], [0.9, 0.9], [-0.5, 2.0]]).view(1, 4, 1, 1, 2)
    weights = torch.ones(1, 4, 1, 1)
    out = ms_deform_attn_points(value, [(3, 4)], locations, weights, [1], discrete=True)
    expected = [0 * 4 + 0, 2 * 4 + 1, 2 * 4 + 3, 2 * 4 + 0]
    assert out.flatten().tolist() == expected


def test_per_level_points_equal_uniform_points_when_all_levels_have_the_same_count():
    torch.manual_seed(0)
    shapes = [(4, 6), (2, 3)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 2, 8)
    locations = torch.rand(2, 5, 2, 2, 3, 2)
    weights = torch.rand(2, 5, 2, 2, 3)
    a = ms_deform_attn(value, shapes, locations, weights)
    b = ms_deform_attn_points(value, shapes, locations.flatten(3, 4), weights.flatten(3, 4), [3, 3])
    assert torch.equal(a, b)
    module = MSDeformAttn(16, 2, 2, [1, 4])
    assert module.sampling_offsets.out_features == 2 * 5 * 2
    query, refs = torch.randn(2, 5, 16), torch.rand(2, 5, 2, 4) * 0.5 + 0.25
    out = module(query, refs, torch.randn(2, sum(h * w for h, w in shapes), 16), shapes)
    assert out.shape == (2, 5, 16) and torch.isfinite(out).all()


# ------------------------------------------------------------------ loss

def hf_loss_key(key, layers):
    """Project loss name -> transformers RTDetrLoss name (aux stages, encoder as the last aux, denoising)."""
    term, _, suffix = key.removeprefix("loss_").partition("_")
    term = "vfl" if term == "cls" else term
    if suffix == "":
        return f"loss_{term}"
    if suffix == "enc":
        return f"loss_{term}_aux_{layers - 1}"
    if suffix == "dn":
        return f"loss_{term}_dn_{layers - 1}"
    return f"loss_{term}_{suffix}" if suffix.startswith("dn_") else f"loss_{term}_aux_{suffix}"


def test_loss_matches_transformers_rt_detr_loss():
    """Varifocal + L1 + GIoU on every decoder stage, the encoder selection and the denoising queries,
    on one batch of random predictions: the same numbers as transformers' RTDetrLoss."""
    from transformers.loss.loss_rt_detr import RTDetrForObjectDetectionLoss

    from clock_deploy.config import DenoisingConfig, LossConfig, ModelConfig
    from clock_deploy.models.build import build_criterion
    from clock_deploy.models.contract import DenoisingOutput, DetrOutput, StageOutput
    from clock_deploy.models.dino import build_denoising_queries

    g = torch.Generator().manual_seed(0)
    batch, queries, classes, layers = 2, 12, 3, 3
    targets = [{"labels": torch.tensor([0, 2, 1]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2],
                                                                          [0.5, 0.5, 0.4, 0.4]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.6, 0.3, 0.5]])}]
    _, _, _, meta = build_denoising_queries(targets, classes, torch.nn.Embedding(classes + 1, 8),
                                            DenoisingConfig(num_queries=7), queries, queries_per_gt=1)
    num_dn = meta["labels"].shape[1]

    def stage(count):
        boxes = torch.cat([torch.rand(batch, count, 2, generator=g) * 0.6 + 0.2,
                           torch.rand(batch, count, 2, generator=g) * 0.4 + 0.1], -1)
        return StageOutput(logits=torch.randn(batch, count, classes, generator=g), boxes=boxes)

    stages, dn_stages, encoder = [stage(queries) for _ in range(layers)], [stage(num_dn) for _ in range(layers)], \
        stage(queries)
    out = DetrOutput(memory=[], memory_pos=[], stages=stages, encoder=encoder,
                     denoising=DenoisingOutput(stages=dn_stages, meta=meta))
    criterion = build_criterion(LossConfig(cls=1.0), ModelConfig(arch="rt_detr", num_classes=classes))
    ours = {hf_loss_key(k, layers): v.item() for k, v in criterion(out, targets).items()}

    positive = (meta["valid"] & meta["positive"][None])
    hf_meta = {"dn_positive_idx": [row.nonzero()[:, 0] for row in positive], "dn_num_group": meta["num_groups"],
               "dn_num_split": [num_dn, queries]}
    outputs_class = torch.stack([torch.cat([d.logits, s.logits], 1) for d, s in zip(dn_stages, stages)], 1)
    outputs_coord = torch.stack([torch.cat([d.boxes, s.boxes], 1) for d, s in zip(dn_stages, stages)], 1)
    config = transformers.RTDetrV2Config(num_labels=classes, decoder_layers=layers)
    hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    _, reference, _ = RTDetrForObjectDetectionLoss(
        outputs_class[:, -1], hf_targets, "cpu", outputs_coord[:, -1], config, outputs_class, outputs_coord,
        enc_topk_logits=encoder.logits, enc_topk_bboxes=encoder.boxes, denoising_meta_values=hf_meta)
    reference = {k: v.item() for k, v in reference.items()}
    assert ours.keys() == reference.keys() and len(ours) == 3 * (2 * layers + 1)
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


# ------------------------------------------------------------------ import command and COCO -> KITTI

def test_import_command_and_coco_to_kitti_class_head(tmp_path, capsys, make_hf_rt_detr):
    """`clock-deploy import` of a transformers RT-DETRv2 folder writes a checkpoint whose class head
    (decoder heads, query-selection head, denoising embedding) model.pretrained maps onto KITTI classes."""
    from clock_deploy.checkpoint import load_model, read_checkpoint
    from clock_deploy.cli import cli, run
    from clock_deploy.config import Config
    from clock_deploy.models.build import build_model
    from clock_deploy.training.pretrained import load_pretrained

    hf = tmp_path / "hf"
    hf_model = make_hf_rt_detr(hf, 3, "basic")
    hf_model.config.id2label = {0: "person", 1: "bicycle", 2: "car"}
    hf_model.config.save_pretrained(hf)
    ckpt = tmp_path / "rt_detr.pt"
    run(cli, ["import", str(hf), "--out", str(ckpt)])
    out = capsys.readouterr().out
    assert "ResNet-vd-18" in out and "method=default" in out and "re-initialized: none" in out
    assert read_checkpoint(ckpt)["classes"] == ["person", "bicycle", "car"]
    imported, imported_cfg, _ = load_model(ckpt)

    cfg = Config()
    cfg.model = imported_cfg.model
    cfg.model.num_classes, cfg.model.pretrained = 3, str(ckpt)
    cfg.model.class_map = {"Pedestrian": "person", "Cyclist": "bicycle"}
    model = build_model(cfg.model)
    lines = load_pretrained(model, cfg.model, ["Car", "Pedestrian", "Cyclist"])
    assert "  Car <- car" in lines and "  Pedestrian <- person" in lines
    for key in ("class_embed.2.weight", "selection.enc_class_embed.bias", "label_enc.weight"):
        new, old = model.state_dict()[key], imported.state_dict()[key]
        assert torch.equal(new[0], old[2]) and torch.equal(new[1], old[0]) and torch.equal(new[2], old[1]), key
    # the denoising embedding's padding row carries over
    assert torch.equal(model.state_dict()["label_enc.weight"][3], imported.state_dict()["label_enc.weight"][3])
    assert not model.backbone.stem[0].conv.weight.requires_grad  # pretrained: stem frozen


# ------------------------------------------------------------------ recipes = the published checkpoints

PUBLISHED = {  # transformers' PekingU RT-DETRv2 configs (config.json), ResNet-vd backbones
    "rt_detr_r18vd_coco_finetune.yaml": dict(layer_type="basic", depths=[2, 2, 2, 2], width=64, decoder_layers=3,
                                             hidden_expansion=0.5),
    "rt_detr_r50vd_coco_finetune.yaml": dict(layer_type="bottleneck", depths=[3, 4, 6, 3], width=64,
                                             decoder_layers=6, hidden_expansion=1.0),
}


@pytest.mark.parametrize("recipe", sorted(PUBLISHED))
def test_kitti_recipe_is_the_model_the_published_checkpoint_imports_as(recipe):
    """The fine-tune recipe builds exactly the model (config and every weight shape) that the importer
    derives from the published RT-DETRv2 config, so model.pretrained loads it with only the class head remapped."""
    import os

    from clock_deploy.config import Config, from_dict, load_config
    from clock_deploy.convert import rt_detr
    from clock_deploy.models.build import build_model

    p = PUBLISHED[recipe]
    expansion = 4 if p["layer_type"] == "bottleneck" else 1
    backbone = transformers.RTDetrResNetConfig(
        embedding_size=p["width"], hidden_sizes=[p["width"] * expansion * 2 ** i for i in range(4)],
        depths=p["depths"], layer_type=p["layer_type"], out_indices=[2, 3, 4])
    config = transformers.RTDetrV2Config(backbone_config=backbone, encoder_in_channels=backbone.hidden_sizes[1:],
                                         decoder_layers=p["decoder_layers"], hidden_expansion=p["hidden_expansion"],
                                         num_labels=80)
    with torch.device("meta"):  # shapes only: nothing to compute
        hf_state = transformers.RTDetrV2ForObjectDetection(config).state_dict()
    hf_state = {k: v for k, v in hf_state.items() if k.startswith("model.")}  # the heads as saved (tied copies)
    overrides, state, _ = rt_detr.hf_to_project(hf_state, config.to_dict())
    imported = from_dict({"model": overrides}, Config).model
    recipe_cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "kitti", recipe))
    ours = recipe_cfg.model
    for key in ("arch", "hidden_dim", "nheads", "enc_layers", "dec_layers", "ffn_dim", "num_queries",
                "num_feature_levels", "n_points", "rt_detr", "dn"):
        assert getattr(ours, key) == getattr(imported, key), key
    assert (ours.backbone.depth, ours.backbone.width, ours.backbone.return_levels) == \
        (imported.backbone.depth, imported.backbone.width, imported.backbone.return_levels)
    with torch.device("meta"):
        expected = build_model(ours).state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes.keys() == expected.keys()
    wrong = [k for k, v in expected.items() if tuple(v.shape) != shapes[k] and not k.startswith(
        ("class_embed.", "selection.enc_class_embed.", "label_enc."))]
    assert wrong == []


def test_input_sizes_that_are_not_multiples_of_32_run():
    """KITTI's 375 x 1242 (and any size): the top-down path upsamples onto the finer map's own size."""
    from clock_deploy.config import BackboneConfig, ModelConfig
    from clock_deploy.models.build import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="rt_detr", hidden_dim=32, nheads=2, ffn_dim=64, enc_layers=1, dec_layers=1,
                                    num_queries=10, num_feature_levels=3,
                                    backbone=BackboneConfig(depth=18, width=8))).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 75, 122))
    assert [tuple(m.shape[-2:]) for m in out.memory] == [(10, 16), (5, 8), (3, 4)]
    assert torch.isfinite(out.pred_logits).all()


def test_discrete_decoder_freezes_its_sampling_offsets_and_trains_the_rest():
    """As the original: nearest-pixel sampling gives the offsets no gradient, so they are not trained
    (no weight decay either); every other parameter gets a gradient from the loss."""
    from clock_deploy.config import BackboneConfig, DenoisingConfig, LossConfig, ModelConfig, RtDetrConfig
    from clock_deploy.models.build import build_criterion, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(arch="rt_detr", hidden_dim=32, nheads=2, ffn_dim=64, enc_layers=1, dec_layers=2, num_queries=10,
                      num_feature_levels=3, backbone=BackboneConfig(depth=18, width=8),
                      dn=DenoisingConfig(num_queries=6), rt_detr=RtDetrConfig(method="discrete"))
    model = build_model(cfg).train()
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])}]
    losses = build_criterion(LossConfig(cls=1.0), cfg)(model(torch.randn(1, 3, 64, 96), targets), targets)
    sum(losses.values()).backward()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"decoder.{i}.cross_attn.sampling_offsets.{w}" for i in range(2) for w in ("weight", "bias")}
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


# ------------------------------------------------------------------ the original RT-DETRv2 .pth layout

def official_fixture(name):
    import json
    import os

    with open(os.path.join(os.path.dirname(__file__), "fixtures", name)) as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["rt_detr_v2_r50vd_official_params.json", "rt_detr_v2_r18vd_official_params.json"])
def test_every_official_rt_detr_v2_name_maps_with_its_shape(name, tmp_path):
    """Every parameter and buffer of the original RT-DETRv2 R50vd / R18vd (tests/official_params_rt_detr.py)
    maps onto the project model with its shape, through `clock-deploy import` of a .pth holding them as EMA."""
    import json

    from official_params_rt_detr import FIXTURES, fixture

    data = official_fixture(name)
    assert json.loads(json.dumps(fixture(FIXTURES[name]))) == data  # the file is what the generator writes
    state = {key: torch.zeros(shape) for key, shape in data["params"]}
    state["decoder.decoder.layers.0.cross_attn.num_points_scale"] = torch.full([12], 0.25)
    torch.save({"model": {}, "ema": {"module": state, "updates": 1}, "last_epoch": 71}, tmp_path / "rtdetrv2.pth")
    imported = import_checkpoint(tmp_path / "rtdetrv2.pth")
    cfg, _ = build_imported_model(imported, name)  # raises on any missing, extra or misshaped weight
    m, c = cfg.model, data["config"]
    assert imported.arch == "rt_detr" and imported.source == "official"
    assert (m.backbone.depth, m.backbone.width, m.backbone.return_levels, m.backbone.frozen_bn) == \
        (c["depth"], 64, [1, 2, 3], c["freeze_norm"])
    assert (m.hidden_dim, m.ffn_dim, m.nheads, m.enc_layers, m.dec_layers, m.num_classes, m.num_feature_levels,
            m.n_points) == (c["hidden_dim"], c["ffn"], c["nheads"], c["enc_layers"], c["dec_layers"], c["num_classes"],
                            c["levels"], c["points"])
    assert (m.rt_detr.expansion, m.rt_detr.csp_blocks) == (c["expansion"], c["csp_blocks"])
    assert any("anchors for a fixed eval size" in n for n in imported.notes)


def test_official_rt_detr_v2_parameter_count_is_transformers_at_the_same_config():
    """Cross-check of the hand-written generator: the learned tensors of the original R50vd list hold as many
    numbers as transformers' RTDetrV2ForObjectDetection at that config (buffers and tied copies left out)."""
    data = official_fixture("rt_detr_v2_r50vd_official_params.json")
    buffers = ("running_mean", "running_var", "num_batches_tracked", "num_points_scale", "anchors", "valid_mask")
    ours = sum(torch.Size(shape).numel() for key, shape in data["params"] if not key.endswith(buffers))
    backbone = transformers.RTDetrResNetConfig(out_indices=[2, 3, 4])  # ResNet-50-vd
    with torch.device("meta"):
        model = transformers.RTDetrV2ForObjectDetection(transformers.RTDetrV2Config(backbone_config=backbone,
                                                                                    num_labels=80))
    state = {k: v for k, v in model.state_dict().items() if k.startswith("model.")}  # heads as saved (tied copies)
    reference = sum(v.numel() for k, v in state.items() if not k.endswith(buffers + ("n_points_scale",)))
    assert ours == reference


def project_to_official(state):
    """The project's RT-DETR state dict under the original RT-DETRv2 names (written independently of
    convert/rt_detr.py, from tests/official_params_rt_detr.py's layout), q/k/v fused into in_proj."""
    import re

    rules = [
        (r"backbone\.stem\.(\d)\.(.*)", lambda m: f"backbone.conv1.conv1_{int(m[1]) + 1}.{m[2]}"),
        (r"backbone\.layer(\d)\.(\d+)\.convs\.(\d)\.(.*)",
         lambda m: f"backbone.res_layers.{int(m[1]) - 1}.blocks.{m[2]}.branch2{'abc'[int(m[3])]}.{m[4]}"),
        (r"backbone\.layer(\d)\.(\d+)\.shortcut\.1\.(.*)",
         lambda m: f"backbone.res_layers.{int(m[1]) - 1}.blocks.{m[2]}.short.conv.{m[3]}"),
        (r"backbone\.layer(\d)\.(\d+)\.shortcut\.(.*)",
         lambda m: f"backbone.res_layers.{int(m[1]) - 1}.blocks.{m[2]}.short.{m[3]}"),
        (r"input_proj\.(\d)\.0\.(.*)", r"encoder.input_proj.\1.conv.\2"),
        (r"input_proj\.(\d)\.1\.(.*)", r"encoder.input_proj.\1.norm.\2"),
        (r"encoder\.aifi\.(\d)\.ffn\.(.*)", r"encoder.encoder.0.layers.\1.\2"),
        (r"encoder\.aifi\.(\d)\.(.*)", r"encoder.encoder.0.layers.\1.\2"),
        (r"encoder\.(.*)", r"encoder.\1"),
        (r"decoder_input_proj\.(\d)\.0\.(.*)", r"decoder.input_proj.\1.conv.\2"),
        (r"decoder_input_proj\.(\d)\.1\.(.*)", r"decoder.input_proj.\1.norm.\2"),
        (r"decoder\.(\d)\.ffn\.(.*)", r"decoder.decoder.layers.\1.\2"),
        (r"decoder\.(\d)\.(.*)", r"decoder.decoder.layers.\1.\2"),
        (r"label_enc\.weight", "decoder.denoising_class_embed.weight"),
        (r"query_pos_head\.(.*)", r"decoder.query_pos_head.\1"),
        (r"selection\.enc_output\.0\.(.*)", r"decoder.enc_output.proj.\1"),
        (r"selection\.enc_output\.1\.(.*)", r"decoder.enc_output.norm.\1"),
        (r"selection\.enc_class_embed\.(.*)", r"decoder.enc_score_head.\1"),
        (r"selection\.enc_bbox_embed\.(.*)", r"decoder.enc_bbox_head.\1"),
        (r"class_embed\.(.*)", r"decoder.dec_score_head.\1"),
        (r"bbox_embed\.(.*)", r"decoder.dec_bbox_head.\1"),
    ]
    out = {}
    for key, value in state.items():
        pattern, target = next((p, t) for p, t in rules if re.fullmatch(p, key))
        m = re.fullmatch(pattern, key)
        out[target(m) if callable(target) else m.expand(target)] = value
    for key in [k for k in out if k.endswith("self_attn.q_proj.weight") or k.endswith("self_attn.q_proj.bias")]:
        prefix, kind = key.rsplit(".q_proj.", 1)
        out[f"{prefix}.in_proj_{kind}"] = torch.cat([out.pop(f"{prefix}.{p}_proj.{kind}") for p in "qkv"])
    for i in range(max(int(k.split(".")[3]) for k in out if k.startswith("decoder.decoder.layers.")) + 1):
        out[f"decoder.decoder.layers.{i}.cross_attn.num_points_scale"] = torch.full([9], 1 / 3)
    return out


def test_official_rt_detr_v2_pth_gives_the_reference_outputs(tmp_path, make_hf_rt_detr):
    """transformers' RT-DETRv2 weights, written under the original names into an RT-DETRv2-style .pth
    (EMA module), imported: the same logits and boxes as transformers' model."""
    hf_model = make_hf_rt_detr(tmp_path / "hf", 3, "bottleneck")
    project_state = import_checkpoint(tmp_path / "hf").state
    torch.save({"model": {}, "ema": {"module": project_to_official(project_state)}}, tmp_path / "v2.pth")
    imported = import_checkpoint(tmp_path / "v2.pth")
    imported.overrides["num_queries"] = 20  # not in the weights: the fixture's setting
    _, model = build_imported_model(imported, "v2.pth")
    logits_diff, boxes_diff = max_diffs(hf_model, model, torch.randn(2, 3, 64, 96))
    assert logits_diff <= 1e-4 and boxes_diff <= 1e-4, (logits_diff, boxes_diff)


@pytest.mark.parametrize("points", [[4, 4], [4, 0, 4]])
def test_points_per_level_must_fit_the_levels(points):
    from clock_deploy.config import BackboneConfig, ModelConfig, RtDetrConfig
    from clock_deploy.errors import UserError
    from clock_deploy.models.build import build_model

    cfg = ModelConfig(arch="rt_detr", hidden_dim=32, nheads=2, ffn_dim=64, num_feature_levels=3, num_queries=10,
                      dec_layers=2, backbone=BackboneConfig(depth=18, width=8),
                      rt_detr=RtDetrConfig(points_per_level=points))
    with pytest.raises(UserError, match="model.rt_detr.points_per_level must hold one count >= 1 per level"):
        build_model(cfg)
    cfg.rt_detr.points_per_level = [2, 3, 4]
    model = build_model(cfg).eval()
    assert model.decoder[0].cross_attn.points_per_level == [2, 3, 4]
    assert model.decoder[0].cross_attn.sampling_offsets.out_features == 2 * 9 * 2  # heads x points x (x, y)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 96)).pred_logits).all()
