"""RT-DETR(v2) checkpoints -> the project's RTDETR.

Sources: transformers `RTDetrV2ForObjectDetection` / `RTDetrForObjectDetection` folders
(model.safetensors + config.json, as the hub's PekingU/* folders or `save_pretrained` write them),
with transformers' RTDetrResNet (ResNet-vd) backbone, and the original lyuwenyu/RT-DETR RT-DETRv2
`.pth` files (tests/official_params_rt_detr.py lists their names). Returns (ModelConfig overrides, project
state dict, notes for the import report).
"""
import re

import torch

from clock_deploy.convert.common import layer_count, rename, split_in_proj
from clock_deploy.errors import UserError
from clock_deploy.models.resnet_vd import ARCHS as RESNETS

HF_CONFIG_KEYS = ("d_model", "encoder_hidden_dim", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                  "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "decoder_n_points",
                  "num_queries", "num_feature_levels", "backbone_config")

# settings the project's RTDETR builds one way only: config.json key -> the value it must have
FIXED = {"activation_function": "silu", "encoder_activation_function": "gelu", "decoder_activation_function": "relu",
         "normalize_before": False, "learn_initial_query": False, "with_box_refine": True}


def backbone_rules(prefix):
    """transformers RTDetrResNet names under `prefix` -> ResNetVd names."""
    p = re.escape(prefix)

    def block(m):
        stage, index, rest = int(m.group(1)), m.group(2), m.group(3)
        rest = re.sub(r"^layer\.(\d)\.", r"convs.\1.", rest)
        rest = rest.replace("convolution", "conv").replace("normalization", "norm")
        return f"backbone.layer{stage + 1}.{index}.{rest}"

    return [(p + r"embedder\.embedder\.(\d)\.convolution\.weight", r"backbone.stem.\1.conv.weight"),
            (p + r"embedder\.embedder\.(\d)\.normalization\.(\w+)", r"backbone.stem.\1.norm.\2"),
            (p + r"encoder\.stages\.(\d)\.layers\.(\d+)\.((?:shortcut|layer\.\d)\.(?:\d\.)?\w+\.\w+)", block)]


def transformer_rules():
    """Hybrid encoder, query selection and decoder: transformers names -> project names."""
    # saved files use the legacy names (encoder.encoder, out_proj, fc1), a 5.x model in memory the new ones
    aifi, dec = r"model\.encoder\.(?:aifi|encoder)\.0\.layers\.(\d+)\.", r"model\.decoder\.layers\.(\d+)\."
    return [
        (r"model\.encoder_input_proj\.(.*)", r"input_proj.\1"),
        (aifi + r"self_attn\.([qkv])_proj\.(\w+)", r"encoder.aifi.\1.self_attn.\2_proj.\3"),
        (aifi + r"self_attn\.(?:o_proj|out_proj)\.(\w+)", r"encoder.aifi.\1.self_attn.out_proj.\2"),
        (aifi + r"self_attn_layer_norm\.(\w+)", r"encoder.aifi.\1.norm1.\2"),
        (aifi + r"(?:mlp\.)?fc([12])\.(\w+)", r"encoder.aifi.\1.ffn.linear\2.\3"),
        (aifi + r"final_layer_norm\.(\w+)", r"encoder.aifi.\1.norm2.\2"),
        (r"model\.encoder\.((?:lateral_convs|fpn_blocks|downsample_convs|pan_blocks)\..*)", r"encoder.\1"),
        (r"model\.denoising_class_embed\.weight", "label_enc.weight"),
        (r"model\.enc_output\.(.*)", r"selection.enc_output.\1"),
        (r"model\.enc_score_head\.(\w+)", r"selection.enc_class_embed.\1"),
        (r"model\.enc_bbox_head\.(.*)", r"selection.enc_bbox_embed.\1"),
        (r"model\.decoder_input_proj\.(.*)", r"decoder_input_proj.\1"),
        (dec + r"self_attn\.([qkv])_proj\.(\w+)", r"decoder.\1.self_attn.\2_proj.\3"),
        (dec + r"self_attn\.(?:o_proj|out_proj)\.(\w+)", r"decoder.\1.self_attn.out_proj.\2"),
        (dec + r"self_attn_layer_norm\.(\w+)", r"decoder.\1.norm1.\2"),
        (dec + r"encoder_attn\.n_points_scale", (None, "per-point offset scales (derived from the point counts)")),
        (dec + r"encoder_attn\.(\w+\.\w+)", r"decoder.\1.cross_attn.\2"),
        (dec + r"encoder_attn_layer_norm\.(\w+)", r"decoder.\1.norm2.\2"),
        (dec + r"(?:mlp\.)?fc([12])\.(\w+)", r"decoder.\1.ffn.linear\2.\3"),
        (dec + r"final_layer_norm\.(\w+)", r"decoder.\1.norm3.\2"),
        (r"model\.decoder\.query_pos_head\.(.*)", r"query_pos_head.\1"),
        (r"(?:model\.decoder\.)?(class_embed|bbox_embed)\.(\d+\..*)", r"\1.\2"),
    ]


def _check_settings(c, where):
    missing = [k for k in HF_CONFIG_KEYS if k not in c]
    if missing:
        raise UserError(f"{where}: config.json lacks {', '.join(missing)}: not a transformers RT-DETR config")
    for key, want in FIXED.items():
        if c.get(key, want) != want:
            raise UserError(f"{where}: config.json {key}={c[key]!r} is not supported (the project uses {want!r})")
    for a, b in (("encoder_hidden_dim", "d_model"), ("encoder_ffn_dim", "decoder_ffn_dim"),
                 ("encoder_attention_heads", "decoder_attention_heads")):
        if c[a] != c[b]:
            raise UserError(f"{where}: config.json {a}={c[a]} differs from {b}={c[b]}; "
                            "the project uses one value for encoder and decoder")
    levels_in = len(c.get("encoder_in_channels", [0, 0, 0]))
    if list(c.get("encode_proj_layers", [levels_in - 1])) != [levels_in - 1]:
        raise UserError(f"{where}: config.json encode_proj_layers={c['encode_proj_layers']}: the project runs "
                        "AIFI on the last level only")
    if c["num_feature_levels"] > levels_in + 1:
        raise UserError(f"{where}: config.json num_feature_levels={c['num_feature_levels']}: transformers feeds "
                        "every extra level from the last encoder map, the original from the previous level; "
                        "only one extra level is imported (where they agree)")


def backbone_config(bc, where):
    """ResNetVd depth / width / levels / frozen BN of a transformers RTDetrResNetConfig dict."""
    bottleneck = bc.get("layer_type", "bottleneck") == "bottleneck"
    depths = tuple(bc.get("depths", (3, 4, 6, 3)))
    depth = next((d for d, (block, counts) in RESNETS.items()
                  if (block.expansion == 4) == bottleneck and counts == depths), None)
    width = bc.get("embedding_size", 64)
    sizes = list(bc.get("hidden_sizes", []))
    expansion = 4 if bottleneck else 1
    if depth is None or sizes != [width * expansion * 2 ** i for i in range(4)]:
        raise UserError(f"{where}: backbone_config is not a ResNet-vd 18/34/50 (blocks per stage {list(depths)}, "
                        f"{bc.get('layer_type')} blocks, stem {width}, stage widths {sizes})")
    if bc.get("downsample_in_first_stage") or bc.get("downsample_in_bottleneck"):
        raise UserError(f"{where}: backbone_config downsamples in the first stage or the bottleneck's 1x1 conv; "
                        "the project's ResNet-vd strides on the 3x3 conv from the second stage")
    levels = [i - 1 for i in bc.get("out_indices", [2, 3, 4])]  # stage 1 = layer1 = level 0
    return {"depth": depth, "width": width, "return_levels": levels}


def hf_to_project(hf_state, hf_config, where="transformers checkpoint"):
    """transformers RT-DETR / RT-DETRv2 state dict + config.json -> (overrides, state, notes)."""
    c = hf_config
    _check_settings(c, where)
    state, dropped = rename(hf_state, backbone_rules("model.backbone.model.") + transformer_rules(), where)
    backbone = backbone_config(c["backbone_config"], where)
    backbone["frozen_bn"] = bool(c.get("freeze_backbone_batch_norms", True))
    built = tuple(f"backbone.layer{i + 1}." for i in range(backbone["return_levels"][-1] + 1, 4))
    unused = [k for k in state if k.startswith(built)] if built else []
    for k in unused:
        del state[k]
    v2 = c.get("model_type") == "rt_detr_v2"
    overrides = {
        "arch": "rt_detr", "num_classes": state["class_embed.0.weight"].shape[0], "hidden_dim": c["d_model"],
        "nheads": c["decoder_attention_heads"], "enc_layers": layer_count(state, r"encoder\.aifi\.(\d+)\."),
        "dec_layers": c["decoder_layers"], "ffn_dim": c["decoder_ffn_dim"], "num_queries": c["num_queries"],
        "num_feature_levels": c["num_feature_levels"], "n_points": c["decoder_n_points"],
        "dropout": float(c.get("dropout", 0.0)), "backbone": backbone,
        "dn": {"num_queries": c.get("num_denoising", 100), "label_noise": float(c.get("label_noise_ratio", 0.5)),
               "box_noise": float(c.get("box_noise_scale", 1.0))},
        "rt_detr": {"expansion": float(c.get("hidden_expansion", 1.0)),
                    "method": c.get("decoder_method", "default") if v2 else "default",
                    "offset_scale": float(c.get("decoder_offset_scale", 0.5)) if v2 else 0.5},
    }
    if "label_enc.weight" not in state:  # num_denoising = 0: the model still holds the (unused) embedding
        state["label_enc.weight"] = torch.zeros(overrides["num_classes"] + 1, c["d_model"])
    notes = [f"dropped {n} {reason}" for reason, n in dropped.items()]
    if unused:
        notes.append(f"dropped {len(unused)} weights of backbone stages after the last one the model uses")
    if c.get("anchor_image_size"):
        notes.append(f"anchor_image_size {c['anchor_image_size']}: the project computes the anchors for the "
                     "actual input size (the same values at that size)")
    return overrides, state, notes


def official_rules():
    """lyuwenyu/RT-DETR (rtdetrv2_pytorch) names -> project names (nn.MultiheadAttention's fused
    in_proj is split afterwards)."""
    stage = r"backbone\.res_layers\.(\d)\.blocks\.(\d+)\."
    aifi, dec = r"encoder\.encoder\.0\.layers\.(\d+)\.", r"decoder\.decoder\.layers\.(\d+)\."

    def branch(m):
        index = "abc".index(m.group(3))
        return f"backbone.layer{int(m.group(1)) + 1}.{m.group(2)}.convs.{index}.{m.group(4)}"

    def short(m):
        pooled = ".1" if m.group(3) else ""
        return f"backbone.layer{int(m.group(1)) + 1}.{m.group(2)}.shortcut{pooled}.{m.group(4)}"

    return [
        (r"backbone\.conv1\.conv1_(\d)\.(conv|norm)\.(\w+)",
         lambda m: f"backbone.stem.{int(m.group(1)) - 1}.{m.group(2)}.{m.group(3)}"),
        (stage + r"branch2([abc])\.((?:conv|norm)\.\w+)", branch),
        (stage + r"short\.(conv\.)?((?:conv|norm)\.\w+)", short),
        (r"encoder\.input_proj\.(\d+)\.(?:conv|0)\.weight", r"input_proj.\1.0.weight"),
        (r"encoder\.input_proj\.(\d+)\.(?:norm|1)\.(\w+)", r"input_proj.\1.1.\2"),
        (aifi + r"self_attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
         r"encoder.aifi.\1.self_attn.\2"),
        (aifi + r"linear([12])\.(\w+)", r"encoder.aifi.\1.ffn.linear\2.\3"),
        (aifi + r"(norm[12])\.(\w+)", r"encoder.aifi.\1.\2.\3"),
        (r"encoder\.((?:lateral_convs|fpn_blocks|downsample_convs|pan_blocks)\..*)", r"encoder.\1"),
        (r"decoder\.input_proj\.(\d+)\.(?:conv|0)\.weight", r"decoder_input_proj.\1.0.weight"),
        (r"decoder\.input_proj\.(\d+)\.(?:norm|1)\.(\w+)", r"decoder_input_proj.\1.1.\2"),
        (dec + r"self_attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
         r"decoder.\1.self_attn.\2"),
        (dec + r"cross_attn\.num_points_scale", (None, "per-point offset scales (derived from the point counts)")),
        (dec + r"cross_attn\.(\w+\.\w+)", r"decoder.\1.cross_attn.\2"),
        (dec + r"(norm[123])\.(\w+)", r"decoder.\1.\2.\3"),
        (dec + r"linear([12])\.(\w+)", r"decoder.\1.ffn.linear\2.\3"),
        (r"decoder\.denoising_class_embed\.weight", "label_enc.weight"),
        (r"decoder\.query_pos_head\.(.*)", r"query_pos_head.\1"),
        (r"decoder\.enc_output\.(?:proj|0)\.(\w+)", r"selection.enc_output.0.\1"),
        (r"decoder\.enc_output\.(?:norm|1)\.(\w+)", r"selection.enc_output.1.\1"),
        (r"decoder\.enc_score_head\.(\w+)", r"selection.enc_class_embed.\1"),
        (r"decoder\.enc_bbox_head\.(.*)", r"selection.enc_bbox_embed.\1"),
        (r"decoder\.dec_score_head\.(\d+)\.(\w+)", r"class_embed.\1.\2"),
        (r"decoder\.dec_bbox_head\.(\d+)\.(.*)", r"bbox_embed.\1.\2"),
        (r"decoder\.(anchors|valid_mask)", (None, "anchors for a fixed eval size (recomputed for the input size)")),
    ]


def _points_per_level(scale, levels, where):
    """[n per level] from the num_points_scale buffer (1 / n, n times, level by level)."""
    counts, i = [], 0
    values = scale.tolist()
    while i < len(values):
        n = round(1.0 / values[i])
        counts.append(n)
        i += n
    if len(counts) != levels or sum(counts) != len(values):
        raise UserError(f"{where}: cross_attn.num_points_scale {values} does not fit {levels} levels")
    return counts


def official_backbone(state, where):
    """ResNet-vd depth / width / levels / frozen BN from the converted backbone weights."""
    width = state["backbone.stem.2.conv.weight"].shape[0]
    counts = tuple(layer_count(state, rf"backbone\.layer{i}\.(\d+)\.") for i in range(1, 5))
    bottleneck = "backbone.layer1.0.convs.2.conv.weight" in state
    depth = next((d for d, (block, c) in RESNETS.items() if (block.expansion == 4) == bottleneck and c == counts),
                 None)
    if depth is None:
        raise UserError(f"{where}: backbone is not a ResNet-vd 18/34/50 (blocks per stage {list(counts)})")
    expansion = 4 if bottleneck else 1
    levels = []
    for i in range(layer_count(state, r"input_proj\.(\d+)\.")):
        ch = state[f"input_proj.{i}.0.weight"].shape[1]
        level = next((lv for lv in range(4) if width * 2 ** lv * expansion == ch), None)
        if level is None:
            raise UserError(f"{where}: encoder input projection with {ch} input channels matches no ResNet stage")
        levels.append(level)
    frozen = not any(k.startswith("backbone.") and k.endswith("num_batches_tracked") for k in state)
    return {"depth": depth, "width": width, "return_levels": levels, "frozen_bn": frozen}


def official_to_project(state, args=None, where="RT-DETRv2 checkpoint"):
    """lyuwenyu/RT-DETR RT-DETRv2 `.pth` weights (the file's EMA module or "model") -> (overrides, state, notes).

    The weights do not hold num_queries, the denoising settings or the sampling method: RT-DETRv2's
    defaults are taken (300 queries, 100 denoising GT copies, label noise 0.5, box noise 1.0,
    method "default"); the import report says so.
    """
    scale_key = "decoder.decoder.layers.0.cross_attn.num_points_scale"
    points_scale = state.get(scale_key)
    converted, dropped = rename(state, official_rules(), where)
    converted = split_in_proj(converted)
    d = converted["query_pos_head.layers.1.weight"].shape[0]
    levels = layer_count(converted, r"decoder_input_proj\.(\d+)\.")
    rows = converted["decoder.0.cross_attn.sampling_offsets.weight"].shape[0]
    points = _points_per_level(points_scale, levels, where) if points_scale is not None else None
    if points is None:
        raise UserError(f"{where}: no {scale_key}: not an RT-DETRv2 decoder (RT-DETR v1 .pth is not supported)")
    nheads = rows // (2 * sum(points))
    ffn = converted["decoder.0.ffn.linear1.weight"].shape[0]
    aifi_ffn = converted.get("encoder.aifi.0.ffn.linear1.weight")
    if aifi_ffn is not None and aifi_ffn.shape[0] != ffn:
        raise UserError(f"{where}: encoder and decoder feed-forward widths differ; the project uses one model.ffn_dim")
    backbone = official_backbone(converted, where)
    overrides = {
        "arch": "rt_detr", "num_classes": converted["class_embed.0.weight"].shape[0], "hidden_dim": d,
        "nheads": nheads, "enc_layers": layer_count(converted, r"encoder\.aifi\.(\d+)\."),
        "dec_layers": layer_count(converted, r"decoder\.(\d+)\."), "ffn_dim": ffn, "num_queries": 300,
        "num_feature_levels": levels, "n_points": points[0], "dropout": 0.0, "backbone": backbone,
        "dn": {"num_queries": 100, "label_noise": 0.5, "box_noise": 1.0},
        "rt_detr": {"expansion": converted["encoder.fpn_blocks.0.conv1.conv.weight"].shape[0] / d,
                    "csp_blocks": layer_count(converted, r"encoder\.fpn_blocks\.0\.bottlenecks\.(\d+)\."),
                    "points_per_level": points if len(set(points)) > 1 else []},
    }
    if "label_enc.weight" not in converted:
        converted["label_enc.weight"] = torch.zeros(overrides["num_classes"] + 1, d)
    notes = [f"dropped {n} {reason}" for reason, n in dropped.items()]
    notes.append("not stored in the weights, RT-DETRv2 defaults assumed: num_queries=300, dn 100 / 0.5 / 1.0, "
                 "rt_detr.method=default (set model.rt_detr.method=discrete for the *_dsp checkpoints)")
    return overrides, converted, notes
