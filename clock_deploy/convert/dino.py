"""IDEA-Research/DINO `.pth` checkpoints (4-scale, ResNet backbone) -> the project's DINO.

Supported: the released 4-scale R50 configuration (DINO_4scale.py): standard two-stage,
decoder heads shared by all layers, separate encoder-proposal heads, learned content queries
(embed_init_tgt), self-attention decoder, ReLU. Anything else shows up as an unknown key or a
shape the project model rejects. Returns (ModelConfig overrides, project state dict, notes).
"""
from clock_deploy.convert.common import (args_dict, drop_unused_stages, layer_count, n_points, neck_config,
                                         official_transformer_rules, rename, split_in_proj,
                                         torchvision_backbone_rules)
from clock_deploy.errors import UserError

# DINO_4scale.py values the project's DINO implements; a checkpoint trained otherwise is refused
REQUIRED_ARGS = {"two_stage_type": "standard", "dec_pred_class_embed_share": True, "dec_pred_bbox_embed_share": True,
                 "two_stage_class_embed_share": False, "two_stage_bbox_embed_share": False, "num_patterns": 0,
                 "decoder_sa_type": "sa", "transformer_activation": "relu", "position_embedding": "sine",
                 "pe_temperatureH": 20, "pe_temperatureW": 20, "dilation": False, "embed_init_tgt": True,
                 "two_stage_learn_wh": False, "two_stage_pat_embed": 0, "two_stage_add_query_num": 0,
                 "query_dim": 4, "use_deformable_box_attn": False}


def official_to_project(state, args=None, where="DINO checkpoint"):
    """DINO weights (the file's "model"); `args`: its training arguments when the file carries them."""
    a = args_dict(args)
    for key, want in REQUIRED_ARGS.items():
        if key in a and a[key] != want:
            raise UserError(f"{where}: trained with {key}={a[key]!r}; the project's DINO implements {key}={want!r}")
    rules = (torchvision_backbone_rules("backbone.0.body.") + official_transformer_rules() + [
        (r"transformer\.decoder\.norm\.(\w+)", r"decoder_norm.\1"),
        (r"transformer\.decoder\.ref_point_head\.(layers\.\d\.\w+)", r"ref_point_head.\1"),
        # heads shared by every decoder layer, stored once per layer and again under transformer.decoder
        (r"(?:transformer\.decoder\.)?class_embed\.\d+\.(\w+)", r"class_embed.\1"),
        (r"(?:transformer\.decoder\.)?bbox_embed\.\d+\.(layers\.\d\.\w+)", r"bbox_embed.\1"),
        (r"transformer\.enc_out_class_embed\.(\w+)", r"proposals.class_embed.\1"),
        (r"transformer\.enc_out_bbox_embed\.(layers\.\d\.\w+)", r"proposals.bbox_embed.\1"),
        (r"transformer\.tgt_embed\.weight", "tgt_embed.weight"),
        (r"label_enc\.weight", "label_enc.weight"),
    ])
    converted, dropped = rename(state, rules, where)
    converted = split_in_proj(converted)
    overrides = neck_config(converted, where)
    num_classes = converted["class_embed.weight"].shape[0]
    # DINO's label book has dn_labelbook_size + 1 rows; denoising only draws labels < num_classes
    label_rows = converted["label_enc.weight"].shape[0]
    if label_rows < num_classes:
        raise UserError(f"{where}: label_enc has {label_rows} rows for {num_classes} classes")
    converted["label_enc.weight"] = converted["label_enc.weight"][:num_classes].clone()
    nheads = int(a.get("nheads", 8))
    overrides.update(
        arch="dino", num_classes=num_classes, nheads=nheads,
        dec_layers=layer_count(converted, r"decoder\.(\d+)\."),
        n_points=n_points(converted, nheads, overrides["num_feature_levels"]),
        num_queries=converted["tgt_embed.weight"].shape[0], dropout=float(a.get("dropout", 0.0)),
        dn={"num_queries": int(a.get("dn_number", 100)), "label_noise": float(a.get("dn_label_noise_ratio", 0.5)),
            "box_noise": float(a.get("dn_box_noise_scale", 0.4))})
    converted, unused = drop_unused_stages(converted, overrides["backbone"]["return_levels"])
    notes = [f"dropped {n} {reason}" for reason, n in dropped.items()]
    if unused:
        notes.append(f"dropped {unused} weights of backbone stages after the last one the model uses")
    if label_rows > num_classes:
        notes.append(f"label_enc: kept the {num_classes} class rows of {label_rows} (the extra rows of DINO's "
                     "label book are never drawn for denoising)")
    if not a:
        notes.append("no training arguments in the file: assumed nheads=8 and DINO_4scale's denoising settings")
    return overrides, converted, notes
