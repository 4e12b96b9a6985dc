"""Multi-scale pieces shared by Deformable DETR and DINO: input projections, the deformable
encoder, the decoder layer, two-stage encoder proposals and the model base that wires them."""
import math

import torch
from torch import nn

from clock_deploy.errors import UserError
from clock_deploy.models.backbone import build_backbone
from clock_deploy.models.contract import StageOutput
from clock_deploy.models.deform_attn import MSDeformAttn
from clock_deploy.models.position import PositionEmbeddingSine
from clock_deploy.models.transformer_utils import (FFN, MLP, MultiHeadAttention, init_box_head, init_class_head,
                                                   unflatten_dim)


PROPOSAL_RANKS = ("max_class", "first_class")


def _group_norm(channels):
    return nn.GroupNorm(math.gcd(32, channels), channels)


class MultiScaleNeck(nn.Module):
    """Backbone maps -> `num_levels` maps of `hidden_dim` channels, with sine + level position.

    Backbone levels get a 1x1 conv + GroupNorm; extra (coarser) levels are stride-2 3x3 convs,
    the first on the last backbone map, the next ones on the previous extra level.
    """

    def __init__(self, backbone_channels, backbone_strides, hidden_dim, num_levels, position):
        super().__init__()
        projections = [nn.Sequential(nn.Conv2d(ch, hidden_dim, 1), _group_norm(hidden_dim))
                       for ch in backbone_channels]
        in_ch = backbone_channels[-1]
        for _ in range(num_levels - len(backbone_channels)):
            projections.append(nn.Sequential(nn.Conv2d(in_ch, hidden_dim, 3, stride=2, padding=1),
                                             _group_norm(hidden_dim)))
            in_ch = hidden_dim
        self.input_proj = nn.ModuleList(projections)
        self.position = position
        self.level_embed = nn.Parameter(torch.empty(num_levels, hidden_dim))
        self.strides = list(backbone_strides) + [backbone_strides[-1] * 2 ** (i + 1)
                                                  for i in range(num_levels - len(backbone_channels))]
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        nn.init.normal_(self.level_embed)

    def forward(self, backbone_maps):
        """-> (maps [B, D, H, W] per level, their position embeddings incl. level embedding)."""
        maps = [proj(x) for proj, x in zip(self.input_proj, backbone_maps)]
        for proj in self.input_proj[len(backbone_maps):]:
            source = backbone_maps[-1] if len(maps) == len(backbone_maps) else maps[-1]
            maps.append(proj(source))
        pos = [self.position(m) + self.level_embed[i][None, :, None, None] for i, m in enumerate(maps)]
        return maps, pos


def flatten_levels(maps):
    """[B, D, H, W] per level -> ([B, sum HW, D], [(H, W), ...])."""
    shapes = [tuple(m.shape[-2:]) for m in maps]
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1), shapes


def unflatten_levels(tokens, spatial_shapes):
    """[B, sum HW, D] -> [B, D, H, W] per level (inverse of flatten_levels)."""
    chunks = tokens.split([h * w for h, w in spatial_shapes], dim=1)
    return [unflatten_dim(c.transpose(1, 2), 2, (h, w)) for c, (h, w) in zip(chunks, spatial_shapes)]


def _grid_centres(height, width, device):
    """Normalized (x, y) centres of an H x W grid -> [H * W, 2]."""
    ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
    return torch.stack([xs[None, :].expand(height, width), ys[:, None].expand(height, width)], -1).flatten(0, 1)


def encoder_reference_points(spatial_shapes, batch_size, device):
    """Every encoder token's own centre, used on all levels -> [B, S, nL, 2]."""
    centres = torch.cat([_grid_centres(h, w, device) for h, w in spatial_shapes], dim=0)
    return centres[None, :, None, :].expand(batch_size, -1, len(spatial_shapes), -1)


def encoder_proposals(memory, spatial_shapes):
    """Two-stage anchors: one box per encoder token (its centre, size 0.05 * 2**level).

    Returns (memory with tokens of invalid proposals zeroed, proposals [1, S, 4] as logits).
    Proposals touching the image border (any coordinate outside (0.01, 0.99)) are invalid and
    get +inf, as in Deformable DETR / DINO.
    """
    boxes = []
    for level, (h, w) in enumerate(spatial_shapes):
        centres = _grid_centres(h, w, memory.device)
        size = torch.full_like(centres, 0.05 * 2.0 ** level)
        boxes.append(torch.cat([centres, size], dim=-1))
    proposals = torch.cat(boxes, dim=0)[None].to(memory.dtype)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals)).masked_fill(~valid, float("inf"))
    return memory.masked_fill(~valid, 0.0), proposals


class TwoStageProposals(nn.Module):
    """Two-stage query selection: score every encoder token as a detection around its proposal
    box and keep the `num_queries` best as the decoder's initial boxes.

    `rank`: "max_class" ranks by the best class score (DINO); "first_class" by the score of
    class 0 (Deformable DETR, whose encoder head is trained class-agnostic on class 0).
    """

    def __init__(self, d_model, num_classes, num_queries, rank="max_class"):
        super().__init__()
        if rank not in PROPOSAL_RANKS:
            raise ValueError(f"unknown proposal rank '{rank}', expected one of {PROPOSAL_RANKS}")
        self.num_queries, self.rank = num_queries, rank
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.class_embed = nn.Linear(d_model, num_classes)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        init_class_head(self.class_embed)
        init_box_head(self.bbox_embed)

    def forward(self, memory, spatial_shapes):
        """memory [B, S, D] -> (StageOutput of the selected proposals for the encoder loss,
        their boxes as detached logits [B, num_queries, 4])."""
        output_memory, proposals = encoder_proposals(memory, spatial_shapes)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        logits = self.class_embed(output_memory)
        coords = self.bbox_embed(output_memory) + proposals
        if self.num_queries > logits.shape[1]:
            raise UserError(f"model.num_queries ({self.num_queries}) exceeds the {logits.shape[1]} encoder tokens "
                            "of this input size (data.img_size)")
        scores = logits[..., 0] if self.rank == "first_class" else logits.max(-1)[0]
        topk = torch.topk(scores, self.num_queries, dim=1)[1]
        coords = torch.gather(coords, 1, topk[..., None].expand(-1, -1, 4))
        logits = torch.gather(logits, 1, topk[..., None].expand(-1, -1, logits.shape[-1]))
        return StageOutput(logits=logits, boxes=coords.sigmoid()), coords.detach()


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels + FFN, post-norm."""

    def __init__(self, d_model, ffn_dim, dropout, n_levels, n_heads, n_points, sampling):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, sampling)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, ffn_dim, dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes):
        src = self.norm1(src + self.dropout(self.self_attn(src + pos, reference_points, src, spatial_shapes)))
        return self.norm2(src + self.ffn(src))


class DeformableEncoder(nn.Module):
    def __init__(self, num_layers, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    def forward(self, src, pos, spatial_shapes):
        """src, pos: [B, S, D] flattened levels -> memory [B, S, D]."""
        reference_points = encoder_reference_points(spatial_shapes, src.shape[0], src.device).to(src.dtype)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes)
        return src


class DeformableDecoderLayer(nn.Module):
    """Self-attention among queries (masked for groups / denoising), deformable cross-attention
    into the memory around each query's reference, FFN; post-norm."""

    def __init__(self, d_model, ffn_dim, dropout, n_levels, n_heads, n_points, sampling):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, sampling)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, ffn_dim, dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, attn_mask=None):
        """tgt, query_pos: [B, Q, D]; reference_points: [B, Q, 2 | 4]; memory: [B, S, D]."""
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, attn_mask)))
        levels = len(spatial_shapes)
        refs = reference_points[:, :, None].expand(-1, -1, levels, -1)
        cross = self.cross_attn(tgt + query_pos, refs, memory, spatial_shapes)
        tgt = self.norm2(tgt + self.dropout2(cross))
        return self.norm3(tgt + self.ffn(tgt))


class MultiScaleDetrBase(nn.Module):
    """Backbone -> multi-scale neck -> deformable encoder, and the decoder layers, as Deformable DETR
    and DINO both build them. Subclasses add their query scheme, heads and `forward`, and set the
    neck's sine position embedding as their original does (`position_embedding`: kwargs of
    PositionEmbeddingSine)."""
    position_embedding = {}

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.hidden_dim, self.num_classes = cfg.hidden_dim, cfg.num_classes
        self.num_queries, self.dec_layers = cfg.num_queries, cfg.dec_layers
        self.backbone = build_backbone(cfg.backbone)
        position = PositionEmbeddingSine(cfg.hidden_dim // 2, **self.position_embedding)
        self.neck = MultiScaleNeck(self.backbone.num_channels, self.backbone.strides, cfg.hidden_dim,
                                   cfg.num_feature_levels, position)
        self.strides = self.neck.strides
        layer_kwargs = dict(d_model=cfg.hidden_dim, ffn_dim=cfg.ffn_dim, dropout=cfg.dropout,
                            n_levels=cfg.num_feature_levels, n_heads=cfg.nheads, n_points=cfg.n_points,
                            sampling=cfg.sampling)
        self.encoder = DeformableEncoder(cfg.enc_layers, **layer_kwargs)
        self.decoder = nn.ModuleList(DeformableDecoderLayer(**layer_kwargs) for _ in range(cfg.dec_layers))

    def encode(self, images):
        """images [B, 3, H, W] -> (neck maps, their position maps, flat memory [B, S, D], spatial shapes)."""
        maps, pos_maps = self.neck(self.backbone(images))
        src, spatial_shapes = flatten_levels(maps)
        pos, _ = flatten_levels(pos_maps)
        return maps, pos_maps, self.encoder(src, pos, spatial_shapes), spatial_shapes
