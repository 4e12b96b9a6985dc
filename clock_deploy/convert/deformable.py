"""Deformable DETR checkpoints -> the project's DeformableDETR.

Sources: transformers `DeformableDetrForObjectDetection` (model.safetensors + config.json, as
the hub's SenseTime/deformable-detr* folders or `save_pretrained` write them) and the original
fundamentalvision/Deformable-DETR `.pth` files. Every function returns
(ModelConfig overrides, project state dict, notes for the import report).
"""
import torch

from clock_deploy.convert.common import (args_dict, drop_unused_stages, hf_resnet_backbone_rules, layer_count,
                                         n_points, neck_config, official_transformer_rules, rename, split_in_proj,
                                         torchvision_backbone_rules)
from clock_deploy.errors import UserError


HF_CONFIG_KEYS = ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
                  "encoder_ffn_dim", "decoder_ffn_dim", "encoder_n_points", "decoder_n_points", "num_queries",
                  "two_stage_num_proposals")


def head_rules(alias, dec_layers, box_refine, two_stage):
    """Class / box heads stored as class_embed.{i} (and again under `alias`, where the original
    ties them into the decoder). Head i < dec_layers belongs to decoder layer i (all share head 0
    without box refinement); head dec_layers, with two_stage, scores the encoder proposals."""
    def target(kind):
        def name(m):
            i, rest = int(m.group(1)), m.group(2)
            if two_stage and i == dec_layers:
                return f"proposals.{kind}.{rest}"
            return f"{kind}.{i if box_refine else 0}.{rest}"
        return name
    return [(rf"(?:{alias})?class_embed\.(\d+)\.(\w+)", target("class_embed")),
            (rf"(?:{alias})?bbox_embed\.(\d+)\.(layers\.\d\.\w+)", target("bbox_embed"))]


def untie_heads(state, dec_layers):
    """transformers (5.x) ties the per-layer heads of some box-refine variants to head 0 and saves
    only that one: give every decoder layer its copy. Returns the kinds of head copied."""
    tied = []
    for kind in ("class_embed", "bbox_embed"):
        first = {k[len(f"{kind}.0."):]: v for k, v in state.items() if k.startswith(f"{kind}.0.")}
        if any(f"{kind}.{i}.{rest}" not in state for i in range(1, dec_layers) for rest in first):
            if any(k.startswith(f"{kind}.{i}.") for k in state for i in range(1, dec_layers)):
                continue  # partly present: leave it to the strict check, which names what is missing
            for i in range(1, dec_layers):
                state.update({f"{kind}.{i}.{rest}": v.clone() for rest, v in first.items()})
            tied.append(kind)
    return tied


def proposal_embedding_to_project(state, hidden_dim):
    """The original embeds a two-stage proposal as (x, y, w, h) sines, the project as (y, x, w, h)
    (DAB-DETR / DINO order): swap the first two column blocks of pos_trans to compute the same."""
    if "pos_trans.weight" in state:
        w = state["pos_trans.weight"]
        block = hidden_dim // 2
        state["pos_trans.weight"] = torch.cat([w[:, block:2 * block], w[:, :block], w[:, 2 * block:]], dim=1)
    return state


def _finish(state, dropped, overrides, where):
    """Shared tail: drop unbuilt backbone stages, record what was left out and why."""
    state, unused = drop_unused_stages(state, overrides["backbone"]["return_levels"])
    notes = [f"dropped {n} {reason}" for reason, n in dropped.items()]
    if unused:
        notes.append(f"dropped {unused} weights of backbone stages after the last one the model uses")
    if "pos_trans.weight" in state:
        notes.append("pos_trans: input columns reordered from the original (x, y, w, h) to the project's "
                     "(y, x, w, h) proposal embedding (same outputs)")
    if overrides.get("two_stage"):
        overrides["proposal_rank"] = "first_class"
    return overrides, state, notes


def hf_to_project(hf_state, hf_config, where="transformers checkpoint"):
    """transformers Deformable DETR (legacy key names as saved, or the 5.x in-memory names)."""
    missing = [k for k in HF_CONFIG_KEYS if k not in hf_config]
    if missing:
        raise UserError(f"{where}: config.json lacks {', '.join(missing)}: not a transformers Deformable DETR config")
    c = hf_config
    for key, want in (("activation_function", "relu"), ("position_embedding_type", "sine"), ("dilation", False)):
        if c.get(key, want) != want:
            raise UserError(f"{where}: config.json {key}={c[key]!r} is not supported (the project uses {want!r})")
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim"),
                 ("encoder_n_points", "decoder_n_points")):
        if c.get(a) != c.get(b):
            raise UserError(f"{where}: config.json {a}={c.get(a)} differs from {b}={c.get(b)}; "
                            "the project uses one value for encoder and decoder")
    box_refine, two_stage = bool(c.get("with_box_refine")), bool(c.get("two_stage"))
    dec_layers = c["decoder_layers"]
    backbone_prefixes = ("model.backbone.conv_encoder.model.", "model.backbone.conv_encoder.model._backbone.",
                         "model.backbone.model.")
    rules = []
    for prefix in backbone_prefixes:
        rules += (torchvision_backbone_rules(prefix) if c.get("use_timm_backbone", True)
                  else hf_resnet_backbone_rules(prefix))
    enc, dec = r"model\.encoder\.layers\.(\d+)\.", r"model\.decoder\.layers\.(\d+)\."
    rules += [
        (r"model\.level_embed", "neck.level_embed"),
        (r"model\.input_proj\.(.*)", r"neck.input_proj.\1"),
        (enc + r"self_attn\.(.*)", r"encoder.layers.\1.self_attn.\2"),
        (enc + r"self_attn_layer_norm\.(\w+)", r"encoder.layers.\1.norm1.\2"),
        (enc + r"(?:mlp\.)?fc([12])\.(\w+)", r"encoder.layers.\1.ffn.linear\2.\3"),
        (enc + r"final_layer_norm\.(\w+)", r"encoder.layers.\1.norm2.\2"),
        (dec + r"self_attn\.([qkv])_proj\.(\w+)", r"decoder.\1.self_attn.\2_proj.\3"),
        (dec + r"self_attn\.(?:out_proj|o_proj)\.(\w+)", r"decoder.\1.self_attn.out_proj.\2"),
        (dec + r"self_attn_layer_norm\.(\w+)", r"decoder.\1.norm1.\2"),
        (dec + r"encoder_attn\.(.*)", r"decoder.\1.cross_attn.\2"),
        (dec + r"encoder_attn_layer_norm\.(\w+)", r"decoder.\1.norm2.\2"),
        (dec + r"(?:mlp\.)?fc([12])\.(\w+)", r"decoder.\1.ffn.linear\2.\3"),
        (dec + r"final_layer_norm\.(\w+)", r"decoder.\1.norm3.\2"),
        (r"model\.query_position_embeddings\.weight", "query_embed.weight"),
        (r"model\.reference_points\.(\w+)", r"reference_points.\1"),
        (r"model\.enc_output(_norm)?\.(\w+)", r"proposals.enc_output\1.\2"),
        (r"model\.pos_trans(_norm)?\.(\w+)", r"pos_trans\1.\2"),
    ] + head_rules(r"model\.decoder\.", dec_layers, box_refine, two_stage)
    state, dropped = rename(hf_state, rules, where)
    tied = untie_heads(state, dec_layers) if box_refine else []
    overrides = neck_config(state, where)
    if c.get("backbone_config") and "out_indices" in c["backbone_config"]:
        levels = [i - 1 for i in c["backbone_config"]["out_indices"]]  # stage 1 = layer1 = level 0
        if levels != overrides["backbone"]["return_levels"]:
            raise UserError(f"{where}: backbone out_indices {c['backbone_config']['out_indices']} do not match "
                            "the input projections' channels")
    overrides.update(
        arch="deformable_detr", num_classes=state["class_embed.0.weight"].shape[0], nheads=c["encoder_attention_heads"],
        dec_layers=dec_layers, n_points=c["encoder_n_points"], box_refine=box_refine, two_stage=two_stage,
        num_queries=c["two_stage_num_proposals"] if two_stage else c["num_queries"],
        dropout=float(c.get("dropout", 0.0)))
    state = proposal_embedding_to_project(state, overrides["hidden_dim"])
    overrides, state, notes = _finish(state, dropped, overrides, where)
    if tied:
        notes.append(f"{' and '.join(tied)}: one head stored for all {dec_layers} decoder layers (transformers "
                     "ties them), copied to each layer's head")
    return overrides, state, notes


def official_to_project(state, args=None, where="Deformable-DETR checkpoint"):
    """fundamentalvision/Deformable-DETR `.pth` weights (the file's "model"); `args` its training arguments."""
    a = args_dict(args)
    two_stage = "transformer.enc_output.weight" in state
    box_refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in state)
    dec_layers = layer_count(state, r"transformer\.decoder\.layers\.(\d+)\.")
    rules = (torchvision_backbone_rules("backbone.0.body.") + official_transformer_rules() + [
        (r"query_embed\.weight", "query_embed.weight"),
        (r"transformer\.reference_points\.(\w+)", r"reference_points.\1"),
        (r"transformer\.pos_trans(_norm)?\.(\w+)", r"pos_trans\1.\2"),
    ] + head_rules(r"transformer\.decoder\.", dec_layers, box_refine, two_stage))
    converted, dropped = rename(state, rules, where)
    converted = split_in_proj(converted)
    overrides = neck_config(converted, where)
    nheads = int(a.get("nheads", 8))
    if a.get("position_embedding", "sine") != "sine" or a.get("dilation"):
        raise UserError(f"{where}: trained with position_embedding={a.get('position_embedding')!r}, "
                        f"dilation={a.get('dilation')}; the project supports sine and no dilation")
    num_queries = (a.get("num_queries", 300) if two_stage else converted["query_embed.weight"].shape[0])
    overrides.update(
        arch="deformable_detr", num_classes=converted["class_embed.0.weight"].shape[0], nheads=nheads,
        dec_layers=dec_layers, n_points=n_points(converted, nheads, overrides["num_feature_levels"]),
        box_refine=box_refine, two_stage=two_stage, num_queries=int(num_queries),
        dropout=float(a.get("dropout", 0.1)))
    converted = proposal_embedding_to_project(converted, overrides["hidden_dim"])
    overrides, converted, notes = _finish(converted, dropped, overrides, where)
    if not a:
        notes.append("no training arguments in the file: assumed nheads=8, dropout=0.1"
                     + (", num_queries=300 (two-stage)" if two_stage else ""))
    return overrides, converted, notes
