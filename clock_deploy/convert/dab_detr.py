"""DAB-DETR checkpoints -> this project's DABDETR: HF transformers folders and official .pth files.

Both converters return (overrides for the config's `model` section, project state dict). Every
source key is renamed by one rule table; a key no rule knows, a project key left unfilled, a
shape that does not fit or a setting the project does not implement is a UserError naming it.
"""
import math
import re

import torch

from clock_deploy.convert.common import (args_dict, fit_problems, hf_resnet_backbone_rules, layer_count, rename,
                                         resnet_depth, resnet_stages, split_in_proj, torchvision_backbone_rules)
from clock_deploy.config import ModelConfig, from_dict
from clock_deploy.errors import UserError
from clock_deploy.models.build import build_model

ARCH = "dab_detr"


# ---------------------------------------------------------------- renaming

def _projections(prefix):
    """The decoder's separately projected query / key parts: HF names -> project names."""
    parts = {"query_content": "qcontent", "query_pos": "qpos", "key_content": "kcontent", "key_pos": "kpos",
             "value": "v", "query_pos_sine": "qpos_sine"}
    return [(rf"{prefix}\.self_attn\.self_attn_{hf}_proj\.(.*)", rf"decoder.layers.\1.sa_{own}_proj.\2")
            for hf, own in parts.items() if hf != "query_pos_sine"] + \
           [(rf"{prefix}\.cross_attn\.cross_attn_{hf}_proj\.(.*)", rf"decoder.layers.\1.ca_{own}_proj.\2")
            for hf, own in parts.items()]


_HF_RESNET = "model.backbone.conv_encoder.model."
HF_RULES = [
    # timm ResNet (the hub's checkpoints): torchvision names, under _backbone in transformers 5
    *torchvision_backbone_rules(_HF_RESNET + "_backbone."),
    *torchvision_backbone_rules(_HF_RESNET),
    *hf_resnet_backbone_rules(_HF_RESNET),  # transformers' own ResNet (use_timm_backbone=False)
    (r"model\.input_projection\.(.*)", r"input_proj.\1"),
    (r"model\.query_refpoint_embeddings\.(.*)", r"refpoint_embed.\1"),
    (r"model\.encoder\.query_scale\.(.*)", r"encoder.query_scale.\1"),
    (r"model\.encoder\.layers\.(\d+)\.self_attn\.(.*)", r"encoder.layers.\1.self_attn.\2"),
    (r"model\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.(.*)", r"encoder.layers.\1.norm1.\2"),
    (r"model\.encoder\.layers\.(\d+)\.final_layer_norm\.(.*)", r"encoder.layers.\1.norm2.\2"),
    (r"model\.encoder\.layers\.(\d+)\.fc(\d)\.(.*)", r"encoder.layers.\1.ffn.linear\2.\3"),
    (r"model\.encoder\.layers\.(\d+)\.activation_fn\.(.*)", r"encoder.layers.\1.ffn.activation.\2"),
    *_projections(r"model\.decoder\.layers\.(\d+)"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.self_attn\.output_proj\.(.*)", r"decoder.layers.\1.sa_out_proj.\2"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.self_attn_layer_norm\.(.*)", r"decoder.layers.\1.norm1.\2"),
    (r"model\.decoder\.layers\.(\d+)\.cross_attn\.cross_attn\.output_proj\.(.*)", r"decoder.layers.\1.ca_out_proj.\2"),
    (r"model\.decoder\.layers\.(\d+)\.cross_attn\.cross_attn_layer_norm\.(.*)", r"decoder.layers.\1.norm2.\2"),
    (r"model\.decoder\.layers\.(\d+)\.mlp\.fc(\d)\.(.*)", r"decoder.layers.\1.ffn.linear\2.\3"),
    (r"model\.decoder\.layers\.(\d+)\.mlp\.activation_fn\.(.*)", r"decoder.layers.\1.ffn.activation.\2"),
    (r"model\.decoder\.layers\.(\d+)\.mlp\.final_layer_norm\.(.*)", r"decoder.layers.\1.norm3.\2"),
    (r"model\.decoder\.layernorm\.(.*)", r"decoder.norm.\1"),
    (r"model\.decoder\.(query_scale|ref_point_head|ref_anchor_head|bbox_embed)\.(.*)", r"decoder.\1.\2"),
    (r"bbox_predictor\.(.*)", r"decoder.bbox_embed.\1"),  # tied to model.decoder.bbox_embed
    (r"class_embed\.(.*)", r"class_embed.\1"),
]

OFFICIAL_RULES = [
    *torchvision_backbone_rules("backbone.0.body."),
    (r"(input_proj|refpoint_embed|class_embed)\.(.*)", r"\1.\2"),
    (r"(?:transformer\.decoder\.)?bbox_embed\.(.*)", r"decoder.bbox_embed.\1"),  # one MLP, registered twice
    (r"transformer\.encoder\.query_scale\.(.*)", r"encoder.query_scale.\1"),
    # encoder self-attention after split_in_proj
    (r"transformer\.encoder\.layers\.(\d+)\.self_attn\.(.*)", r"encoder.layers.\1.self_attn.\2"),
    (r"transformer\.encoder\.layers\.(\d+)\.linear(\d)\.(.*)", r"encoder.layers.\1.ffn.linear\2.\3"),
    (r"transformer\.encoder\.layers\.(\d+)\.activation\.(.*)", r"encoder.layers.\1.ffn.activation.\2"),
    (r"transformer\.encoder\.layers\.(\d+)\.(norm\d)\.(.*)", r"encoder.layers.\1.\2.\3"),
    (r"transformer\.decoder\.layers\.(\d+)\.((?:sa|ca)_\w+_proj)\.(.*)", r"decoder.layers.\1.\2.\3"),
    (r"transformer\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.(.*)", r"decoder.layers.\1.sa_out_proj.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.cross_attn\.out_proj\.(.*)", r"decoder.layers.\1.ca_out_proj.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.linear(\d)\.(.*)", r"decoder.layers.\1.ffn.linear\2.\3"),
    (r"transformer\.decoder\.layers\.(\d+)\.activation\.(.*)", r"decoder.layers.\1.ffn.activation.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.(norm\d)\.(.*)", r"decoder.layers.\1.\2.\3"),
    (r"transformer\.decoder\.(norm|query_scale|ref_point_head|ref_anchor_head)\.(.*)", r"decoder.\1.\2"),
]


def _check_against_model(overrides, state, source):
    """Every project key filled with the right shape, nothing left over (model built on `meta`)."""
    cfg = from_dict(overrides, cls=ModelConfig, where=source)
    with torch.device("meta"):
        expected = build_model(cfg).state_dict()
    problems = fit_problems(expected, state)
    if problems:
        raise UserError(f"{source}: does not fit a DAB-DETR built from its config: {problems}")
    return {k: state[k].contiguous() for k in expected}


# ---------------------------------------------------------------- backbones

def _resnet_name_depth(name, source):
    m = re.fullmatch(r"(?:timm/)?resnet(18|34|50)(?:\.\w+)?", str(name))
    if not m:
        raise UserError(f"{source}: backbone '{name}' is not supported (ResNet-18/34/50 only)")
    return int(m[1])


def _hf_backbone(hf_config, source):
    """HF backbone settings -> the project's `model.backbone` section."""
    bb = hf_config.get("backbone_config") or {}
    if hf_config.get("dilation") or bb.get("output_stride") == 16:
        raise UserError(f"{source}: dilation (DC5) backbones are not supported")
    if bb.get("model_type") == "resnet":
        if bb.get("downsample_in_first_stage") or bb.get("downsample_in_bottleneck"):
            raise UserError(f"{source}: ResNet with downsample_in_first_stage / downsample_in_bottleneck "
                            f"is not the torchvision layout the project builds")
        if bb.get("layer_type") not in ("basic", "bottleneck"):
            raise UserError(f"{source}: ResNet layer_type={bb.get('layer_type')!r} is not supported "
                            "(basic or bottleneck blocks: ResNet-18/34/50)")
        bottleneck = bb["layer_type"] == "bottleneck"
        depth = resnet_depth(bottleneck, bb.get("depths", []), source)
        width = int(bb["embedding_size"])
        expansion = 4 if bottleneck else 1
        if list(bb.get("hidden_sizes", [])) != [width * expansion * 2 ** i for i in range(4)]:
            raise UserError(f"{source}: ResNet hidden_sizes {bb.get('hidden_sizes')} do not double from "
                            f"embedding_size {width} like a torchvision ResNet")
    else:  # timm backbone: named in backbone_config (transformers 5) or at the top level (4.x)
        name = bb.get("backbone") if bb.get("model_type") == "timm_backbone" else hf_config.get("backbone")
        depth, width = _resnet_name_depth(name, source), 64
    return {"depth": depth, "width": width, "return_levels": [3], "weights": None}


def _official_backbone(state, args, source):
    """Backbone settings of an official checkpoint: from its args, checked against its keys."""
    prefix = "backbone.0.body."
    if prefix + "conv1.weight" not in state:
        raise UserError(f"{source}: no '{prefix}conv1.weight': not a DAB-DETR ResNet checkpoint")
    depth = resnet_depth(*resnet_stages(state, prefix), source)
    if args and args.get("backbone") and _resnet_name_depth(args["backbone"], source) != depth:
        raise UserError(f"{source}: args say backbone={args['backbone']} but the weights are ResNet-{depth}")
    if args and args.get("dilation"):
        raise UserError(f"{source}: dilation (DC5) backbones are not supported")
    return {"depth": depth, "width": int(state[prefix + "conv1.weight"].shape[0]), "return_levels": [3],
            "weights": None}


# ---------------------------------------------------------------- converters

def _unsupported(settings, source):
    """settings: {name: (value, supported value)}; raise naming the first that differs."""
    for name, (value, want) in settings.items():
        if value != want:
            raise UserError(f"{source}: {name}={value!r} is not supported (the project implements {name}={want!r})")


def hf_to_project(hf_state: dict, hf_config: dict) -> tuple[dict, dict]:
    """transformers DabDetrForObjectDetection (model.safetensors + config.json contents) ->
    (model-config overrides, project state dict)."""
    source = "DAB-DETR (transformers) checkpoint"
    if hf_config.get("model_type") != "dab-detr":
        raise UserError(f"{source}: config.json has model_type={hf_config.get('model_type')!r}, "
                        f"expected 'dab-detr'")
    get = hf_config.get
    _unsupported({
        "query_dim": (get("query_dim", 4), 4), "keep_query_pos": (get("keep_query_pos", False), False),
        "num_patterns": (get("num_patterns", 0), 0), "normalize_before": (get("normalize_before", False), False),
        "decoder_ffn_dim": (get("decoder_ffn_dim", 2048), get("encoder_ffn_dim", 2048)),
        "decoder_attention_heads": (get("decoder_attention_heads", 8), get("encoder_attention_heads", 8)),
        "temperature_width": (get("temperature_width", 20), get("temperature_height", 20)),
    }, source)
    scale = get("sine_position_embedding_scale")
    if scale is not None and not math.isclose(scale, 2 * math.pi):
        raise UserError(f"{source}: sine_position_embedding_scale={scale} is not supported (2*pi)")
    activation = get("activation_function", "prelu")
    if activation not in ("relu", "prelu"):
        raise UserError(f"{source}: activation_function={activation!r} is not supported (relu, prelu)")
    if "class_embed.weight" not in hf_state:
        raise UserError(f"{source}: no 'class_embed.weight' (a DabDetrModel without the detection head?)")
    overrides = {
        "arch": ARCH,
        "num_classes": int(hf_state["class_embed.weight"].shape[0]),
        "hidden_dim": int(get("hidden_size", 256)),
        "num_queries": int(get("num_queries", 300)),
        "nheads": int(get("encoder_attention_heads", 8)),
        "enc_layers": int(get("encoder_layers", 6)),
        "dec_layers": int(get("decoder_layers", 6)),
        "ffn_dim": int(get("encoder_ffn_dim", 2048)),
        "backbone": _hf_backbone(hf_config, source),
        "dab": {"activation": activation, "pos_temperature": float(get("temperature_height", 20))},
    }
    state, _ = rename(hf_state, HF_RULES, source)  # drops only BatchNorm step counters
    if overrides["dec_layers"] == 1:  # a single layer never rescales its positional query
        state = {k: v for k, v in state.items() if not k.startswith("decoder.query_scale.")}
    return overrides, _check_against_model(overrides, state, source)


def official_to_project(state: dict, args: dict | None) -> tuple[dict, dict]:
    """IDEA-Research/DAB-DETR checkpoint (its ['model'] state dict and ['args'], dict / Namespace / None)
    -> (model-config overrides, project state dict). Without args the settings come from the
    weights' shapes, and nheads (not visible in shapes) from the DAB-DETR default 8."""
    source = "DAB-DETR (official) checkpoint"
    args = args_dict(args)  # the .pth stores an argparse.Namespace
    if args.get("modelname", ARCH) != ARCH:
        raise UserError(f"{source}: modelname={args['modelname']!r}; only dab_detr (single scale) converts here")
    _unsupported({"num_patterns": (args.get("num_patterns", 0), 0), "pre_norm": (args.get("pre_norm", False), False),
                  "pe_temperatureW": (args.get("pe_temperatureW", 20), args.get("pe_temperatureH", 20)),
                  "position_embedding": (args.get("position_embedding", "sine"), "sine")}, source)
    for key in ("input_proj.weight", "refpoint_embed.weight", "class_embed.weight",
                "transformer.encoder.layers.0.linear1.weight"):
        if key not in state:
            raise UserError(f"{source}: no '{key}': not a DAB-DETR checkpoint")
    has_prelu = any(k.endswith(".activation.weight") for k in state)
    activation = args.get("transformer_activation", "prelu" if has_prelu else "relu")
    if activation not in ("relu", "prelu"):
        raise UserError(f"{source}: transformer_activation={activation!r} is not supported (relu, prelu)")
    overrides = {
        "arch": ARCH,
        "num_classes": int(state["class_embed.weight"].shape[0]),
        "hidden_dim": int(state["input_proj.weight"].shape[0]),
        "num_queries": int(state["refpoint_embed.weight"].shape[0]),
        "nheads": int(args.get("nheads", 8)),
        "enc_layers": layer_count(state, r"transformer\.encoder\.layers\.(\d+)\."),
        "dec_layers": layer_count(state, r"transformer\.decoder\.layers\.(\d+)\."),
        "ffn_dim": int(state["transformer.encoder.layers.0.linear1.weight"].shape[0]),
        "backbone": _official_backbone(state, args, source),
        "dab": {"activation": activation, "pos_temperature": float(args.get("pe_temperatureH", 20))},
    }
    renamed, _ = rename(split_in_proj(state), OFFICIAL_RULES, source)  # drops only BatchNorm step counters
    if overrides["dec_layers"] == 1:
        renamed = {k: v for k, v in renamed.items() if not k.startswith("decoder.query_scale.")}
    return overrides, _check_against_model(overrides, renamed, source)
