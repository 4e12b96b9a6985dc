"""Key mapping shared by the converters: rename rules, ResNet backbones, fused attention
projections, tied heads, and the model config read off the converted weights' shapes."""
import re

import torch

from clock_deploy.errors import UserError
from clock_deploy.models.backbone import ARCHS as RESNETS


def rename(state, rules, where):
    """Source state dict -> project names by the first rule whose pattern fully matches each key.

    `rules`: (pattern, target) pairs; target is a `re` template, a function of the match, or a
    (None, reason) tuple to drop the key on purpose. Several source keys may land on one
    project key only when their values are equal (tied heads stored under every alias).
    A key no rule matches is a UserError: nothing is dropped silently.
    Returns (project state dict, {reason: count of dropped keys}).
    """
    out, origin, dropped, unknown = {}, {}, {}, []
    for key, value in state.items():
        for pattern, target in rules:
            match = re.fullmatch(pattern, key)
            if match is None:
                continue
            if isinstance(target, tuple):
                dropped[target[1]] = dropped.get(target[1], 0) + 1
                break
            new = target(match) if callable(target) else match.expand(target)
            if new in out and not (out[new].shape == value.shape and torch.equal(out[new], value)):
                raise UserError(f"{where}: '{origin[new]}' and '{key}' both map to '{new}' but hold different "
                                "weights (expected copies of one shared head)")
            out[new], origin[new] = value, key
            break
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"{where}: {len(unknown)} unknown keys for this architecture "
                        f"(e.g. {', '.join(unknown[:3])}): is it the checkpoint you meant?")
    return out, dropped


def some(keys, n=4):
    """'a, b, c, d, ... (N more)': the first `n` of `keys`, sorted."""
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def fit_problems(expected, state, skip_shapes=()):
    """What keeps `state` from loading strictly into a model whose state dict is `expected`, as
    '2 missing weights: a, b; 1 wrong shapes: c (4, 8) instead of (4, 16)', or '' when it fits.
    skip_shapes: keys whose shapes the caller checks itself (a class head being remapped)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} instead of {tuple(expected[k].shape)}" for k in expected
             if k in state and k not in skip_shapes and state[k].shape != expected[k].shape]
    return "; ".join(f"{len(keys)} {what}: {some(keys)}" for what, keys in
                     (("missing weights", missing), ("unexpected weights", unexpected), ("wrong shapes", wrong))
                     if keys)


def layer_count(state, pattern):
    """1 + the largest index captured by `pattern` (group 1) among the keys; 0 when none match."""
    indices = [int(m.group(1)) for m in (re.match(pattern, k) for k in state) if m]
    return max(indices) + 1 if indices else 0


def torchvision_backbone_rules(prefix):
    """ResNet with torchvision / timm names under `prefix` -> backbone.* (BN step counters dropped)."""
    p = re.escape(prefix)
    return [(p + r".*num_batches_tracked", (None, "BatchNorm step counters (not weights)")),
            (p + r"((?:conv1|bn1|layer[1-4])\..*)", r"backbone.\1")]


def hf_resnet_backbone_rules(prefix):
    """transformers ResNetBackbone names under `prefix` -> torchvision names."""
    p = re.escape(prefix)

    def block(m):
        stage, index, rest = int(m.group(1)), m.group(2), m.group(3)
        rest = re.sub(r"^shortcut\.convolution", "downsample.0", rest)
        rest = re.sub(r"^shortcut\.normalization", "downsample.1", rest)
        rest = re.sub(r"^layer\.(\d)\.convolution", lambda c: f"conv{int(c.group(1)) + 1}", rest)
        rest = re.sub(r"^layer\.(\d)\.normalization", lambda c: f"bn{int(c.group(1)) + 1}", rest)
        return f"backbone.layer{stage + 1}.{index}.{rest}"

    return [(p + r".*num_batches_tracked", (None, "BatchNorm step counters (not weights)")),
            (p + r"embedder\.embedder\.convolution\.weight", "backbone.conv1.weight"),
            (p + r"embedder\.embedder\.normalization\.(\w+)", r"backbone.bn1.\1"),
            (p + r"encoder\.stages\.(\d)\.layers\.(\d+)\.((?:shortcut|layer\.\d)\.\w+\.\w+)", block)]


def split_in_proj(state):
    """nn.MultiheadAttention's fused `in_proj_weight/bias` -> separate q/k/v projections."""
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"(.*)\.in_proj_(weight|bias)", key)
        if match is None:
            out[key] = value
            continue
        for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
            out[f"{match.group(1)}.{name}.{match.group(2)}"] = part.clone()
    return out


def resnet_depth(bottleneck, counts, where):
    """18, 34 or 50: the ResNet with these blocks per stage (the stages a checkpoint keeps may stop
    early: the project does not build stages after the last level it uses)."""
    built = tuple(c for c in counts if c)
    depth = next((d for d, (block, c) in RESNETS.items()
                  if (block.expansion == 4) == bottleneck and built and c[:len(built)] == built), None)
    if depth is None:
        raise UserError(f"{where}: backbone is not a ResNet-18/34/50 (blocks per stage {list(counts)}, "
                        f"{'bottleneck' if bottleneck else 'basic'} blocks)")
    return depth


def resnet_stages(state, prefix):
    """(bottleneck, blocks per stage) of the torchvision-named ResNet under `prefix` in `state`."""
    p = re.escape(prefix)
    counts = [layer_count(state, rf"{p}layer{i}\.(\d+)\.") for i in range(1, 5)]
    return prefix + "layer1.0.conv3.weight" in state, counts


def backbone_config(state, num_input_proj_1x1, where):
    """Depth, width and returned levels of the ResNet in a converted state dict.

    The returned levels are the last `num_input_proj_1x1` stages whose output channels feed the
    1x1 input projections (the neck's backbone levels), so nothing is guessed from file names.
    """
    width = state["backbone.conv1.weight"].shape[0]
    bottleneck, counts = resnet_stages(state, "backbone.")
    depth = resnet_depth(bottleneck, counts, where)
    expansion = 4 if bottleneck else 1
    in_channels = [state[f"neck.input_proj.{i}.0.weight"].shape[1] for i in range(num_input_proj_1x1)]
    levels = []
    for ch in in_channels:
        level = next((lv for lv in range(4) if width * 2 ** lv * expansion == ch), None)
        if level is None:
            raise UserError(f"{where}: input projection with {ch} input channels matches no stage of the "
                            f"ResNet-{depth}")
        levels.append(level)
    return {"depth": depth, "width": width, "return_levels": levels}


def drop_unused_stages(state, return_levels):
    """Remove backbone stages deeper than the last returned level (the project does not build them)."""
    unused = tuple(f"backbone.layer{i + 1}." for i in range(return_levels[-1] + 1, 4))
    kept = {k: v for k, v in state.items() if not k.startswith(unused)} if unused else state
    return kept, len(state) - len(kept)


def neck_config(state, where):
    """Model-config values every multi-scale model's converted state dict shows in its shapes."""
    levels, hidden = state["neck.level_embed"].shape
    num_1x1 = sum(1 for i in range(levels) if state[f"neck.input_proj.{i}.0.weight"].shape[-1] == 1)
    return {
        "hidden_dim": hidden,
        "num_feature_levels": levels,
        "enc_layers": layer_count(state, r"encoder\.layers\.(\d+)\."),
        "ffn_dim": state["encoder.layers.0.ffn.linear1.weight"].shape[0],
        "backbone": backbone_config(state, num_1x1, where),
    }


def n_points(state, nheads, levels):
    """Sampling points per head and level, from the deformable attention's offset projection."""
    rows = state["encoder.layers.0.self_attn.sampling_offsets.weight"].shape[0]
    points, rest = divmod(rows, nheads * levels * 2)
    if rest or points < 1:
        raise UserError(f"sampling offsets with {rows} outputs do not fit {nheads} heads x {levels} levels")
    return points


def official_transformer_rules():
    """Encoder / decoder layers, neck and two-stage projections as the original Deformable-DETR and
    DINO repositories name them. Their decoder layer calls the norm after self-attention `norm2`
    and the one after cross-attention `norm1`; the project names them in order."""
    enc = r"transformer\.encoder\.layers\.(\d+)\."
    dec = r"transformer\.decoder\.layers\.(\d+)\."
    return [
        (r"transformer\.level_embed", "neck.level_embed"),
        (r"input_proj\.(.*)", r"neck.input_proj.\1"),
        (enc + r"self_attn\.(.*)", r"encoder.layers.\1.self_attn.\2"),
        (enc + r"(norm[12])\.(\w+)", r"encoder.layers.\1.\2.\3"),
        (enc + r"(linear[12])\.(\w+)", r"encoder.layers.\1.ffn.\2.\3"),
        (dec + r"self_attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
         r"decoder.\1.self_attn.\2"),
        (dec + r"norm2\.(\w+)", r"decoder.\1.norm1.\2"),
        (dec + r"cross_attn\.(.*)", r"decoder.\1.cross_attn.\2"),
        (dec + r"norm1\.(\w+)", r"decoder.\1.norm2.\2"),
        (dec + r"norm3\.(\w+)", r"decoder.\1.norm3.\2"),
        (dec + r"(linear[12])\.(\w+)", r"decoder.\1.ffn.\2.\3"),
        (r"transformer\.enc_output(_norm)?\.(\w+)", r"proposals.enc_output\1.\2"),
    ]


def args_dict(args):
    """The training arguments stored next to an official checkpoint (argparse.Namespace or dict) -> dict."""
    if args is None:
        return {}
    return dict(args) if isinstance(args, dict) else dict(vars(args))
