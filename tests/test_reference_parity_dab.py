"""DAB-DETR equals the reference: HF transformers' DabDetrForObjectDetection with random weights,
converted by clock_deploy.convert.dab_detr, gives the same logits and boxes (<= 1e-4)."""
import argparse
import json
import re

import pytest
import torch

from clock_deploy.config import ModelConfig, from_dict
from clock_deploy.convert.dab_detr import hf_to_project, official_to_project
from clock_deploy.errors import UserError
from clock_deploy.models.build import build_model

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DabDetrForObjectDetection"):
    pytest.skip(f"transformers {transformers.__version__} has no DAB-DETR", allow_module_level=True)

TOL = 1e-4


def state_and_config(model):
    return dict(model.state_dict()), model.config.to_dict()


def project_model(overrides, state):
    model = build_model(from_dict(overrides, cls=ModelConfig))
    model.load_state_dict(state)
    return model.eval()


def max_diffs(hf_model, model, images):
    with torch.no_grad():
        ref = hf_model(pixel_values=images)
        out = model(images).stages[-1]
    return (ref.logits - out.logits).abs().max().item(), (ref.pred_boxes - out.boxes).abs().max().item()


@pytest.mark.parametrize("num_labels,layer_type", [(1, "basic"), (3, "basic"), (3, "bottleneck")])
def test_dab_detr_matches_transformers(num_labels, layer_type, make_hf_dab):
    hf_model = make_hf_dab(num_labels, layer_type)
    overrides, state = hf_to_project(*state_and_config(hf_model))
    assert overrides["backbone"]["depth"] == (18 if layer_type == "basic" else 50)
    assert overrides["dab"] == {"activation": "prelu", "pos_temperature": 20.0}
    model = project_model(overrides, state)
    images = torch.randn(2, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    logits_diff, boxes_diff = max_diffs(hf_model, model, images)
    assert logits_diff <= TOL and boxes_diff <= TOL, (logits_diff, boxes_diff)
    # the comparison can fail: the project's former position temperature (10000) is far off
    model.position.temperature = 10000
    assert max(max_diffs(hf_model, model, images)) > 10 * TOL


def test_relu_and_other_temperature_convert(make_hf_dab):
    hf_model = make_hf_dab(activation_function="relu", temperature_height=10000, temperature_width=10000,
                           decoder_layers=1)
    overrides, state = hf_to_project(*state_and_config(hf_model))
    assert overrides["dab"] == {"activation": "relu", "pos_temperature": 10000.0}
    images = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    assert max(max_diffs(hf_model, project_model(overrides, state), images)) <= TOL


def test_saved_folder_with_tied_box_head_converts(tmp_path, make_hf_dab):
    """save_pretrained stores the tied box head once (bbox_predictor)."""
    from safetensors.torch import load_file

    hf_model = make_hf_dab()
    hf_model.save_pretrained(tmp_path)
    hf_state = load_file(tmp_path / "model.safetensors")
    assert not any(k.startswith("model.decoder.bbox_embed.") for k in hf_state)
    overrides, state = hf_to_project(hf_state, json.loads((tmp_path / "config.json").read_text()))
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    assert max(max_diffs(hf_model, project_model(overrides, state), images)) <= TOL


def test_unknown_missing_and_unsupported_are_user_errors(make_hf_dab):
    state, config = state_and_config(make_hf_dab())
    with pytest.raises(UserError, match=r"1 unknown keys .*model\.extra\.weight"):
        hf_to_project({**state, "model.extra.weight": torch.zeros(1)}, config)
    with pytest.raises(UserError, match="1 missing weights: encoder.query_scale.layers.0.weight"):
        hf_to_project({k: v for k, v in state.items() if k != "model.encoder.query_scale.layers.0.weight"}, config)
    with pytest.raises(UserError, match="keep_query_pos=True is not supported"):
        hf_to_project(state, {**config, "keep_query_pos": True})
    with pytest.raises(UserError, match="model_type='deformable_detr'"):
        hf_to_project(state, {**config, "model_type": "deformable_detr"})
    with pytest.raises(UserError, match="wrong shapes: refpoint_embed.weight"):
        hf_to_project(state, {**config, "num_queries": 7})


# ---------------------------------------------------------------- official checkpoint names

def to_official(project_state):
    """Project keys -> IDEA-Research/DAB-DETR's (written from its models/DAB_DETR/*.py): torchvision
    backbone under backbone.0.body, nn.MultiheadAttention's packed in_proj in the encoder, the shared
    box MLP registered twice."""
    out = {}
    for key, value in project_state.items():
        new = re.sub(r"^backbone\.", "backbone.0.body.", key)
        new = re.sub(r"^(encoder|decoder)\.", r"transformer.\1.", new)
        new = re.sub(r"\.ffn\.(linear\d|activation)\.", r".\1.", new)
        new = re.sub(r"(decoder\.layers\.\d+)\.sa_out_proj\.", r"\1.self_attn.out_proj.", new)
        new = re.sub(r"(decoder\.layers\.\d+)\.ca_out_proj\.", r"\1.cross_attn.out_proj.", new)
        if new.startswith("transformer.decoder.bbox_embed."):
            out[new[len("transformer.decoder."):]] = value
        out[new] = value
    for key in [k for k in out if re.search(r"encoder\.layers\.\d+\.self_attn\.q_proj\.", k)]:
        base, kind = key.split(".q_proj.")
        parts = [out.pop(f"{base}.{p}_proj.{kind}") for p in "qkv"]
        out[f"{base}.in_proj_{kind}"] = torch.cat(parts)
    return out


def test_official_names_convert_to_the_same_model(make_hf_dab):
    hf_overrides, state = hf_to_project(*state_and_config(make_hf_dab(num_labels=91)))
    official = to_official(state)
    assert "transformer.encoder.layers.0.self_attn.in_proj_weight" in official
    assert "transformer.decoder.layers.0.activation.weight" in official and "bbox_embed.layers.2.bias" in official
    args = {"modelname": "dab_detr", "nheads": 4, "transformer_activation": "prelu", "pe_temperatureH": 20,
            "pe_temperatureW": 20, "backbone": "resnet18", "num_patterns": 0, "pre_norm": False}
    overrides, converted = official_to_project(official, args)
    assert overrides == hf_overrides
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], state[k]) for k in state)
    # args as the .pth stores them; without args everything but nheads (default 8) is read from the weights
    assert official_to_project(official, argparse.Namespace(**args))[0] == hf_overrides
    assert official_to_project(official, {"nheads": 4})[0] == hf_overrides
    with pytest.raises(UserError, match="num_patterns=3 is not supported"):
        official_to_project(official, {**args, "num_patterns": 3})
    with pytest.raises(UserError, match="not a DAB-DETR checkpoint"):
        official_to_project({"foo": torch.zeros(1)}, None)


@pytest.mark.parametrize("form", ["transformers5", "transformers4"])
def test_timm_backbone_names_convert(form, make_hf_dab):
    """The hub's DAB-DETR folders use a timm ResNet: torchvision names under ..._backbone."""
    from clock_deploy.models.backbone import ResNetBackbone

    state, config = state_and_config(make_hf_dab())
    state = {k: v for k, v in state.items() if ".backbone." not in k}
    resnet = ResNetBackbone(18, 64, [3]).state_dict()
    state.update({f"model.backbone.conv_encoder.model._backbone.{k}": v for k, v in resnet.items()})
    state["model.input_projection.weight"] = torch.randn(32, 512, 1, 1)  # ResNet-18's 512 channels
    if form == "transformers5":
        config["backbone_config"] = {"model_type": "timm_backbone", "backbone": "resnet18", "out_indices": [1, 2, 3, 4]}
    else:
        config.update(backbone_config=None, use_timm_backbone=True, backbone="resnet18")
    overrides, converted = hf_to_project(state, config)
    assert overrides["backbone"] == {"depth": 18, "width": 64, "return_levels": [3], "weights": None}
    assert all(torch.equal(converted[f"backbone.{k}"], v) for k, v in resnet.items())
    config["backbone_config"] = {"model_type": "timm_backbone", "backbone": "efficientnet_b0"}
    config["backbone"] = "efficientnet_b0"
    with pytest.raises(UserError, match="backbone 'efficientnet_b0' is not supported"):
        hf_to_project(state, config)


def official_dab_r50_params(d=256, ffn=2048, layers=6, queries=300, classes=91):
    """(name, shape) of every tensor in an official DAB-DETR-R50 checkpoint, written from
    IDEA-Research/DAB-DETR models/DAB_DETR/{DABDETR,transformer,attention}.py and main.py defaults
    (transformer_activation=prelu: one nn.PReLU per layer; the decoder's MultiheadAttention has only
    out_proj; ca_qpos_proj only in layer 0; the box MLP is also transformer.decoder.bbox_embed)."""
    from clock_deploy.models.backbone import ResNetBackbone

    def linear(name, out_dim, in_dim):
        return [(f"{name}.weight", (out_dim, in_dim)), (f"{name}.bias", (out_dim,))]

    def mlp(name, dims):
        return sum((linear(f"{name}.layers.{i}", b, a) for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))), [])

    def norm(name):
        return [(f"{name}.weight", (d,)), (f"{name}.bias", (d,))]

    params = [(f"backbone.0.body.{k}", tuple(v.shape))  # torchvision names, checked in test_models
              for k, v in ResNetBackbone(50, 64, [0, 1, 2, 3]).state_dict().items()]
    params += [("input_proj.weight", (d, 2048, 1, 1)), ("input_proj.bias", (d,)),
               ("refpoint_embed.weight", (queries, 4))] + linear("class_embed", classes, d)
    params += mlp("bbox_embed", [d, d, d, 4]) + mlp("transformer.decoder.bbox_embed", [d, d, d, 4])
    params += mlp("transformer.encoder.query_scale", [d, d, d])
    for i in range(layers):
        p = f"transformer.encoder.layers.{i}."
        params += [(p + "self_attn.in_proj_weight", (3 * d, d)), (p + "self_attn.in_proj_bias", (3 * d,))]
        params += linear(p + "self_attn.out_proj", d, d) + linear(p + "linear1", ffn, d)
        params += linear(p + "linear2", d, ffn) + norm(p + "norm1") + norm(p + "norm2")
        params += [(p + "activation.weight", (1,))]
    for i in range(layers):
        p = f"transformer.decoder.layers.{i}."
        projs = ["sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj",
                 "self_attn.out_proj", "ca_qcontent_proj", "ca_kcontent_proj", "ca_kpos_proj", "ca_v_proj",
                 "ca_qpos_sine_proj", "cross_attn.out_proj"] + (["ca_qpos_proj"] if i == 0 else [])
        params += sum((linear(p + name, d, d) for name in projs), [])
        params += linear(p + "linear1", ffn, d) + linear(p + "linear2", d, ffn)
        params += norm(p + "norm1") + norm(p + "norm2") + norm(p + "norm3") + [(p + "activation.weight", (1,))]
    params += norm("transformer.decoder.norm") + mlp("transformer.decoder.query_scale", [d, d, d])
    params += mlp("transformer.decoder.ref_point_head", [2 * d, d, d])
    params += mlp("transformer.decoder.ref_anchor_head", [d, d, 2])
    return params


def test_every_official_dab_r50_parameter_maps_with_its_shape():
    params = official_dab_r50_params()
    state = {name: torch.zeros(shape) for name, shape in params}
    assert len(state) == len(params)  # no name written twice
    overrides, converted = official_to_project(state, None)
    assert overrides == {"arch": "dab_detr", "num_classes": 91, "hidden_dim": 256, "num_queries": 300, "nheads": 8,
                         "enc_layers": 6, "dec_layers": 6, "ffn_dim": 2048,
                         "backbone": {"depth": 50, "width": 64, "return_levels": [3], "weights": None},
                         "dab": {"activation": "prelu", "pos_temperature": 20.0}}
    # the project has every tensor once: in_proj splits into 3, the duplicate box MLP merges
    in_proj = sum(name.endswith("in_proj_weight") or name.endswith("in_proj_bias") for name, _ in params)
    assert len(converted) == len(params) + 2 * in_proj - 6
