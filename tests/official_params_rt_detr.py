"""Parameter and buffer names and shapes of the original RT-DETRv2 models (lyuwenyu/RT-DETR,
rtdetrv2_pytorch), written from their model definitions (no torch, no download), and the generator
of the committed fixtures.

Read from src/nn/backbone/presnet.py (PResNet-vd: conv1.conv1_{1,2,3}, res_layers.{s}.blocks.{b}
with branch2a/b(/c) and `short` (AvgPool + ConvNormLayer as short.pool / short.conv on stride 2),
all four stages built; FrozenBatchNorm2d without num_batches_tracked when freeze_norm),
src/zoo/rtdetr/hybrid_encoder.py (input_proj.{i}.conv/norm, encoder.{i}.layers.{j} with
nn.MultiheadAttention, lateral_convs, fpn_blocks, downsample_convs, pan_blocks) and
src/zoo/rtdetr/rtdetrv2_decoder.py (input_proj, decoder.layers.{i} with self_attn, cross_attn
holding the num_points_scale buffer, norm1-3, linear1-2; denoising_class_embed, query_pos_head,
enc_output.proj/norm, enc_score_head, enc_bbox_head, dec_score_head, dec_bbox_head, and the
anchors / valid_mask buffers when eval_spatial_size is set), under RTDETR's backbone / encoder /
decoder. Configs: configs/rtdetrv2/rtdetrv2_r50vd_6x_coco.yml and rtdetrv2_r18vd_120e_coco.yml.

    python tests/official_params_rt_detr.py   # rewrites tests/fixtures/rt_detr_v2_*_official_params.json
"""
import json
import os

RTDETRV2_R50VD = {"depth": 50, "hidden_dim": 256, "ffn": 1024, "enc_layers": 1, "dec_layers": 6, "nheads": 8,
                  "levels": 3, "points": 4, "num_classes": 80, "expansion": 1.0, "csp_blocks": 3,
                  "num_denoising": 100, "eval_size": [640, 640], "freeze_norm": True}
RTDETRV2_R18VD = {**RTDETRV2_R50VD, "depth": 18, "dec_layers": 3, "expansion": 0.5, "freeze_norm": False}
BLOCKS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3))}


def _bn(name, ch, frozen=False):
    out = [(f"{name}.{p}", [ch]) for p in ("weight", "bias", "running_mean", "running_var")]
    return out if frozen else out + [(f"{name}.num_batches_tracked", [])]


def _conv_norm(name, out_ch, in_ch, k, frozen=False):
    return [(f"{name}.conv.weight", [out_ch, in_ch, k, k])] + _bn(f"{name}.norm", out_ch, frozen)


def _linear(name, out_dim, in_dim):
    return [(f"{name}.weight", [out_dim, in_dim]), (f"{name}.bias", [out_dim])]


def _norm(name, d):
    return [(f"{name}.weight", [d]), (f"{name}.bias", [d])]


def _mlp(name, d, out_dim, layers, in_dim=None):
    dims = [in_dim or d] + [d] * (layers - 1) + [out_dim]
    return sum((_linear(f"{name}.layers.{i}", dims[i + 1], dims[i]) for i in range(layers)), [])


def presnet(c):
    """PResNet-vd under backbone. -> [(name, shape)] and the output channels of stages 2..4."""
    kind, counts = BLOCKS[c["depth"]]
    frozen, expansion = c["freeze_norm"], 4 if kind == "bottleneck" else 1
    out = (_conv_norm("backbone.conv1.conv1_1", 32, 3, 3, frozen)
           + _conv_norm("backbone.conv1.conv1_2", 32, 32, 3, frozen)
           + _conv_norm("backbone.conv1.conv1_3", 64, 32, 3, frozen))
    in_ch, channels = 64, []
    for stage, count in enumerate(counts):
        planes = 64 * 2 ** stage
        for b in range(count):
            p = f"backbone.res_layers.{stage}.blocks.{b}."
            if kind == "bottleneck":
                convs = [("branch2a", planes, in_ch, 1), ("branch2b", planes, planes, 3),
                         ("branch2c", planes * 4, planes, 1)]
            else:
                convs = [("branch2a", planes, in_ch, 3), ("branch2b", planes, planes, 3)]
            for name, o, i, k in convs:
                out += _conv_norm(p + name, o, i, k, frozen)
            if b == 0:  # shortcut=False: a projection, pooled (short.pool + short.conv) when it downsamples
                short = p + ("short.conv" if stage > 0 else "short")
                out += _conv_norm(short, planes * expansion, in_ch, 1, frozen)
            in_ch = planes * expansion
        channels.append(in_ch)
    return out, channels[1:]


def hybrid_encoder(c, channels):
    d, f = c["hidden_dim"], c["ffn"]
    hidden = int(d * c["expansion"])
    out = []
    for i, ch in enumerate(channels):
        out += [(f"encoder.input_proj.{i}.conv.weight", [d, ch, 1, 1])] + _bn(f"encoder.input_proj.{i}.norm", d)
    for j in range(c["enc_layers"]):
        p = f"encoder.encoder.0.layers.{j}."
        out += ([(p + "self_attn.in_proj_weight", [3 * d, d]), (p + "self_attn.in_proj_bias", [3 * d])]
                + _linear(p + "self_attn.out_proj", d, d) + _linear(p + "linear1", f, d) + _linear(p + "linear2", d, f)
                + _norm(p + "norm1", d) + _norm(p + "norm2", d))

    def csp(name):
        body = _conv_norm(f"{name}.conv1", hidden, 2 * d, 1) + _conv_norm(f"{name}.conv2", hidden, 2 * d, 1)
        for b in range(c["csp_blocks"]):
            body += (_conv_norm(f"{name}.bottlenecks.{b}.conv1", hidden, hidden, 3)
                     + _conv_norm(f"{name}.bottlenecks.{b}.conv2", hidden, hidden, 1))
        return body + (_conv_norm(f"{name}.conv3", d, hidden, 1) if hidden != d else [])

    for i in range(len(channels) - 1):
        out += _conv_norm(f"encoder.lateral_convs.{i}", d, d, 1) + csp(f"encoder.fpn_blocks.{i}")
    for i in range(len(channels) - 1):
        out += _conv_norm(f"encoder.downsample_convs.{i}", d, d, 3) + csp(f"encoder.pan_blocks.{i}")
    return out


def decoder(c, num_inputs):
    d, f, k = c["hidden_dim"], c["ffn"], c["num_classes"]
    points = c["nheads"] * c["levels"] * c["points"]
    out = []
    for i in range(num_inputs):
        out += [(f"decoder.input_proj.{i}.conv.weight", [d, d, 1, 1])] + _bn(f"decoder.input_proj.{i}.norm", d)
    for i in range(num_inputs, c["levels"]):
        out += [(f"decoder.input_proj.{i}.conv.weight", [d, d, 3, 3])] + _bn(f"decoder.input_proj.{i}.norm", d)
    for i in range(c["dec_layers"]):
        p = f"decoder.decoder.layers.{i}."
        out += ([(p + "self_attn.in_proj_weight", [3 * d, d]), (p + "self_attn.in_proj_bias", [3 * d])]
                + _linear(p + "self_attn.out_proj", d, d) + _norm(p + "norm1", d)
                + [(p + "cross_attn.num_points_scale", [c["levels"] * c["points"]])]
                + _linear(p + "cross_attn.sampling_offsets", 2 * points, d)
                + _linear(p + "cross_attn.attention_weights", points, d)
                + _linear(p + "cross_attn.value_proj", d, d) + _linear(p + "cross_attn.output_proj", d, d)
                + _norm(p + "norm2", d) + _linear(p + "linear1", f, d) + _linear(p + "linear2", d, f)
                + _norm(p + "norm3", d))
    if c["num_denoising"] > 0:
        out += [("decoder.denoising_class_embed.weight", [k + 1, d])]
    out += _mlp("decoder.query_pos_head", 2 * d, d, 2, in_dim=4)  # MLP(4, 2 * hidden_dim, hidden_dim, 2)
    out += _linear("decoder.enc_output.proj", d, d) + _norm("decoder.enc_output.norm", d)
    out += _linear("decoder.enc_score_head", k, d) + _mlp("decoder.enc_bbox_head", d, 4, 3)
    for i in range(c["dec_layers"]):
        out += _linear(f"decoder.dec_score_head.{i}", k, d)
    for i in range(c["dec_layers"]):
        out += _mlp(f"decoder.dec_bbox_head.{i}", d, 4, 3)
    if c.get("eval_size"):
        h, w = c["eval_size"]
        tokens = sum((h // s) * (w // s) for s in (8, 16, 32, 64)[:c["levels"]])
        out += [("decoder.anchors", [1, tokens, 4]), ("decoder.valid_mask", [1, tokens, 1])]
    return out


def rt_detr_v2_params(c):
    backbone, channels = presnet(c)
    return backbone + hybrid_encoder(c, channels) + decoder(c, len(channels))


def fixture(config):
    return {"generated_by": "tests/official_params_rt_detr.py", "config": config,
            "params": [[name, shape] for name, shape in rt_detr_v2_params(config)]}


FIXTURES = {"rt_detr_v2_r50vd_official_params.json": RTDETRV2_R50VD,
            "rt_detr_v2_r18vd_official_params.json": RTDETRV2_R18VD}

if __name__ == "__main__":
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
    for filename, config in FIXTURES.items():
        with open(os.path.join(here, filename), "w") as f:
            json.dump(fixture(config), f, indent=None, separators=(",", ":"))
            f.write("\n")
