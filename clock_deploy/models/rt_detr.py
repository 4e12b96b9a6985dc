"""RT-DETR(v2) (Zhao et al. 2024; Lv et al. 2024): ResNet-vd -> hybrid encoder -> IoU-aware query
selection -> deformable decoder with per-level sampling points, contrastive denoising in training.

Layer for layer as transformers' RTDetrV2ForObjectDetection in eval mode (tests/test_rt_detr.py).
Query layout in the decoder: [matching (num_queries) | denoising (training with targets) | extra
groups...], masked as in DINO: matching queries see only themselves, denoising groups only their own
group, every extra group only itself. The decoder's memory (DetrOutput.memory) is the hybrid
encoder's output levels after the decoder's input projections (plus extra stride-2 levels).
"""
import torch
from torch import nn

from clock_deploy.errors import UserError
from clock_deploy.models.contract import DenoisingOutput, DetrOutput, StageOutput
from clock_deploy.models.deform_attn import MSDeformAttn
from clock_deploy.models.deformable_transformer import DeformableDecoderLayer, encoder_proposals, flatten_levels
from clock_deploy.models.dino import build_denoising_queries
from clock_deploy.models.fuse import fold_sequential
from clock_deploy.models.hybrid_encoder import HybridEncoder
from clock_deploy.models.resnet_vd import build_resnet_vd
from clock_deploy.models.transformer_utils import (MLP, group_attention_blocks, init_box_head, init_class_head,
                                                   inverse_sigmoid, self_attn_mask, split_stages, unflatten_dim)


def _proj(in_ch, out_ch, kernel_size=1, stride=1):
    """Conv (no bias) + BatchNorm, as RT-DETR projects maps between its parts."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2, bias=False),
                         nn.BatchNorm2d(out_ch))


class RTDetrDecoderLayer(DeformableDecoderLayer):
    """The Deformable DETR decoder layer with RT-DETRv2's cross-attention (per-level points,
    offset scale, optional discrete sampling)."""

    def __init__(self, d_model, ffn_dim, dropout, n_levels, n_heads, n_points, sampling, offset_scale, discrete):
        super().__init__(d_model, ffn_dim, dropout, n_levels, n_heads, 1, sampling)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, sampling, offset_scale, discrete)


class QuerySelection(nn.Module):
    """IoU-aware query selection: score every memory token as a detection around its anchor box
    and keep the `num_queries` best; their features (detached) become the decoder's content."""

    def __init__(self, d_model, num_classes, num_queries):
        super().__init__()
        self.num_queries = num_queries
        self.enc_output = nn.Sequential(nn.Linear(d_model, d_model), nn.LayerNorm(d_model))
        self.enc_class_embed = nn.Linear(d_model, num_classes)
        self.enc_bbox_embed = MLP(d_model, d_model, 4, 3)
        init_class_head(self.enc_class_embed)
        init_box_head(self.enc_bbox_embed)

    def forward(self, memory, spatial_shapes):
        """memory [B, S, D] -> (StageOutput of the selection for the encoder loss, content [B, Q, D]
        detached, anchors [B, Q, 4] as detached logits)."""
        valid_memory, anchors = encoder_proposals(memory, spatial_shapes)
        features = self.enc_output(valid_memory)
        logits = self.enc_class_embed(features)
        coords = self.enc_bbox_embed(features) + anchors
        if self.num_queries > logits.shape[1]:
            raise UserError(f"model.num_queries ({self.num_queries}) exceeds the {logits.shape[1]} memory tokens "
                            "of this input size (data.img_size)")
        topk = torch.topk(logits.max(-1)[0], self.num_queries, dim=1)[1][..., None]
        coords = torch.gather(coords, 1, topk.expand(-1, -1, 4))
        logits = torch.gather(logits, 1, topk.expand(-1, -1, logits.shape[-1]))
        content = torch.gather(features, 1, topk.expand(-1, -1, features.shape[-1]))
        return StageOutput(logits=logits, boxes=coords.sigmoid()), content.detach(), coords.detach()


class RTDETR(nn.Module):
    arch = "rt_detr"
    groups_without_matching = True  # forward(..., matching=False): see DABDETR

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        rt = cfg.rt_detr
        d = cfg.hidden_dim
        self.hidden_dim, self.num_classes = d, cfg.num_classes
        self.num_queries, self.dec_layers, self.dn_cfg = cfg.num_queries, cfg.dec_layers, cfg.dn
        self.backbone = build_resnet_vd(cfg.backbone)
        levels = cfg.num_feature_levels
        self.input_proj = nn.ModuleList(_proj(ch, d) for ch in self.backbone.num_channels)
        self.encoder = HybridEncoder(len(self.backbone.num_channels), d, cfg.nheads, cfg.ffn_dim, cfg.enc_layers,
                                     cfg.dropout, rt.expansion, rt.csp_blocks)
        extra = levels - len(self.backbone.num_channels)
        self.decoder_input_proj = nn.ModuleList([_proj(d, d) for _ in self.backbone.num_channels] +
                                                [_proj(d, d, 3, 2) for _ in range(extra)])
        self.strides = list(self.backbone.strides) + [self.backbone.strides[-1] * 2 ** (i + 1) for i in range(extra)]
        points = list(rt.points_per_level) or cfg.n_points
        if isinstance(points, list) and (len(points) != levels or min(points) < 1):
            raise UserError(f"model.rt_detr.points_per_level must hold one count >= 1 per level "
                            f"(model.num_feature_levels={levels}), got {points}")
        self.selection = QuerySelection(d, cfg.num_classes, cfg.num_queries)
        self.label_enc = nn.Embedding(cfg.num_classes + 1, d, padding_idx=cfg.num_classes)  # denoising content
        self.query_pos_head = MLP(4, 2 * d, d, 2)
        self.decoder = nn.ModuleList(
            RTDetrDecoderLayer(d, cfg.ffn_dim, cfg.dropout, levels, cfg.nheads, points, cfg.sampling,
                               rt.offset_scale, rt.method == "discrete") for _ in range(cfg.dec_layers))
        self.class_embed = nn.ModuleList(nn.Linear(d, cfg.num_classes) for _ in range(cfg.dec_layers))
        self.bbox_embed = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(cfg.dec_layers))
        for class_head, box_head in zip(self.class_embed, self.bbox_embed):
            init_class_head(class_head)
            init_box_head(box_head)

    def fuse(self):
        """Inference only (models/fuse.py): the projections' BatchNorm folded into their convs (the backbone
        and encoder fuse their own layers)."""
        for proj in [*self.input_proj, *self.decoder_input_proj]:
            fold_sequential(proj)

    def encode(self, images):
        """images -> (projected backbone maps, decoder memory maps per level)."""
        features = [proj(x) for proj, x in zip(self.input_proj, self.backbone(images))]
        fused = self.encoder(features)
        maps = [proj(x) for proj, x in zip(self.decoder_input_proj, fused)]
        for proj in self.decoder_input_proj[len(fused):]:  # extra levels: each from the previous one
            maps.append(proj(fused[-1] if len(maps) == len(fused) else maps[-1]))
        return features, maps

    def memory_position(self, maps):
        """The hybrid encoder's sine embedding at each memory level's size, [B, D, H, W] per level."""
        pos = []
        for m in maps:
            height, width = m.shape[-2:]
            grid = self.encoder.position(height, width, m.device).to(m.dtype).t()
            pos.append(unflatten_dim(grid, 1, (height, width))[None].expand(m.shape[0], -1, -1, -1))
        return pos

    def forward(self, images, targets=None, groups=None, matching=True):
        """images [B, 3, H, W]; targets (training only) add denoising queries -> DetrOutput.
        matching=False runs only the extra groups: no query selection, stages of 0 queries."""
        groups = groups or []
        features, maps = self.encode(images)
        memory, spatial_shapes = flatten_levels(maps)
        batch = memory.shape[0]
        if matching:  # IoU-aware query selection: the top encoder tokens give content and anchors
            encoder_out, content, anchors = self.selection(memory, spatial_shapes)
        else:
            encoder_out, anchors = None, memory.new_zeros(batch, 0, 4)
            content = memory.new_zeros(batch, 0, self.hidden_dim)
        contents, anchor_blocks = [content], [anchors]
        dn, base_mask = None, None
        if self.training and targets is not None:
            dn = build_denoising_queries(targets, self.num_classes, self.label_enc, self.dn_cfg, self.num_queries,
                                         queries_per_gt=1)
        if dn is not None:
            dn_content, dn_anchors, base_mask, meta = dn
            contents.append(dn_content)
            anchor_blocks.append(dn_anchors)
        num_base = sum(c.shape[1] for c in contents)
        for g in groups:
            contents.append(g.content)
            anchor_blocks.append(inverse_sigmoid(g.boxes))
        mask = self_attn_mask(batch, num_base, base_mask, *group_attention_blocks(groups), memory.device)
        logits, boxes = self._decode(torch.cat(contents, 1), torch.cat(anchor_blocks, 1), memory, spatial_shapes, mask)
        blocks = split_stages(logits, boxes, [c.shape[1] for c in contents])
        denoising = DenoisingOutput(stages=blocks.pop(1), meta=meta) if dn is not None else None
        return DetrOutput(memory=maps, memory_pos=self.memory_position(maps), stages=blocks[0], groups=blocks[1:],
                          features=features, encoder=encoder_out, denoising=denoising, anchors=anchors.sigmoid())

    def _decode(self, tgt, anchors, memory, spatial_shapes, mask):
        """Decoder with iterative refinement; returns per-layer logits and boxes.

        Layer i attends around the detached reference ref_i and predicts
        box_i = sigmoid(head_i(out_i) + logit(ref_i)), which is ref_{i+1}. As the original, the box
        reported for the loss of layer i > 0 is taken on ref_i *with* its gradient (look forward twice);
        the values are the same.
        """
        ref = anchors.sigmoid()
        ref_grad = ref
        logits, boxes = [], []
        out = tgt
        for i, layer in enumerate(self.decoder):
            out = layer(out, self.query_pos_head(ref), ref, memory, spatial_shapes, mask)
            delta = self.bbox_embed[i](out)
            logits.append(self.class_embed[i](out))
            boxes.append((delta + inverse_sigmoid(ref_grad)).sigmoid())
            ref_grad = (delta + inverse_sigmoid(ref)).sigmoid()
            ref = ref_grad.detach()
        return logits, boxes
