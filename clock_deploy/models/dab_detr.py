"""DAB-DETR (Liu et al. 2022): single-scale DETR whose queries are learned 4-D anchor boxes.

Each decoder layer derives the positional query from the current anchor (sine embedding ->
MLP), modulates the cross-attention positional part by the anchor width / height, and refines
the anchor (iterative box refinement). The encoder is a transformer encoder over the last
backbone level whose position embedding is rescaled from the content in every layer.

Numerically equal to IDEA-Research/DAB-DETR (and HF transformers' DabDetr) with the default
settings: PReLU FFNs, position temperature 20, the next anchor refined from the un-normed
decoder output (the LayerNorm only feeds the reported class and box).
"""
import torch
from torch import nn

from clock_deploy.models.backbone import build_backbone
from clock_deploy.models.contract import DetrOutput
from clock_deploy.models.position import PositionEmbeddingSine, gen_sineembed_for_position
from clock_deploy.models.transformer_utils import (FFN, MLP, EncoderLayer, attention,
                                                   group_attention_blocks, init_box_head, init_class_head,
                                                   inverse_sigmoid, self_attn_mask, split_stages, unflatten_dim)


# inverse_sigmoid clamp of DAB-DETR's util/misc.py (HF transformers uses 1e-5: equal unless a box
# coordinate is within 1e-3 of 0 or 1)
ANCHOR_EPS = 1e-3


class DABEncoder(nn.Module):
    """Encoder layers; before each one the position embedding is scaled element-wise by an MLP
    of the current content (DAB-DETR's TransformerEncoder.query_scale)."""

    def __init__(self, d_model, nheads, ffn_dim, dropout, num_layers, activation):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d_model, nheads, ffn_dim, dropout, activation)
                                    for _ in range(num_layers))
        self.query_scale = MLP(d_model, d_model, d_model, 2)

    def forward(self, src, pos):
        for layer in self.layers:
            src = layer(src, pos * self.query_scale(src))
        return src


def _concat_heads(a, b, nheads):
    """[B, L, D] x [B, L, D] -> [B, L, 2D] with a and b concatenated per head (conditional attention)."""
    return torch.cat([unflatten_dim(a, -1, (nheads, -1)), unflatten_dim(b, -1, (nheads, -1))], dim=-1).flatten(-2)


class DABDecoderLayer(nn.Module):
    """Conditional-DETR style layer: content and position are projected separately; in
    cross-attention the (modulated) sine embedding of the anchor is concatenated per head."""

    def __init__(self, d_model, nheads, ffn_dim, dropout, first_layer, activation):
        super().__init__()
        self.nheads, self.dropout_p = nheads, dropout
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.sa_out_proj = nn.Linear(d_model, d_model)
        self.norm1 = nn.LayerNorm(d_model)

        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        # only the first layer adds the positional query to the content query (DAB default)
        self.ca_qpos_proj = nn.Linear(d_model, d_model) if first_layer else None
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.ca_out_proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)

        self.ffn = FFN(d_model, ffn_dim, dropout, activation)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, tgt, memory, memory_pos, query_pos, query_sine, attn_mask=None):
        """tgt / query_pos / query_sine: [B, T, D]; memory / memory_pos: [B, S, D]."""
        drop = self.dropout_p if self.training else 0.0
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        sa = attention(q, k, self.sa_v_proj(tgt), self.nheads, attn_mask, drop, self.training)
        tgt = self.norm1(tgt + self.dropout1(self.sa_out_proj(sa)))

        q = self.ca_qcontent_proj(tgt)
        k = self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(memory_pos)
        if self.ca_qpos_proj is not None:
            q = q + self.ca_qpos_proj(query_pos)
            k = k + k_pos
        q = _concat_heads(q, self.ca_qpos_sine_proj(query_sine), self.nheads)
        k = _concat_heads(k, k_pos, self.nheads)
        ca = attention(q, k, self.ca_v_proj(memory), self.nheads, None, drop, self.training)
        tgt = self.norm2(tgt + self.dropout2(self.ca_out_proj(ca)))
        return self.norm3(tgt + self.ffn(tgt))


class DABDecoder(nn.Module):
    """Decoder with anchor-derived positional queries and iterative anchor refinement."""

    def __init__(self, d_model, nheads, ffn_dim, dropout, num_layers, activation):
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(DABDecoderLayer(d_model, nheads, ffn_dim, dropout, i == 0, activation)
                                    for i in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        # conditional scaling of the positional query from the content, from the second layer on
        self.query_scale = MLP(d_model, d_model, d_model, 2) if num_layers > 1 else None
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)  # shared by all layers (DAB default)

    def forward(self, tgt, anchors, memory, memory_pos, attn_mask=None):
        """tgt: [B, T, D] content; anchors: [B, T, 4] unsigmoided cxcywh.
        Returns lists over layers of normed outputs [B, T, D] and boxes [B, T, 4] (sigmoid)."""
        half = self.d_model // 2
        ref = anchors.sigmoid()
        prev = ref  # the anchor a layer's box is reported against; not detached (as the original)
        out = tgt
        hidden, boxes = [], []
        for i, layer in enumerate(self.layers):
            sine = gen_sineembed_for_position(ref, half)                    # [B, T, 2D]: y, x, w, h
            query_pos = self.ref_point_head(sine)
            scale = 1 if i == 0 else self.query_scale(out)                 # conditional spatial query
            sine = sine[..., :self.d_model] * scale
            # modulated attention: y / x parts scaled by predicted over anchor height / width
            ref_hw = self.ref_anchor_head(out).sigmoid()
            sine = torch.cat([sine[..., :half] * (ref_hw[..., 1] / ref[..., 3])[..., None],
                              sine[..., half:] * (ref_hw[..., 0] / ref[..., 2])[..., None]], dim=-1)
            out = layer(out, memory, memory_pos, query_pos, sine, attn_mask)
            normed = self.norm(out)
            hidden.append(normed)
            boxes.append((self.bbox_embed(normed) + inverse_sigmoid(prev, ANCHOR_EPS)).sigmoid())
            if i < len(self.layers) - 1:
                # the next anchor is refined from the un-normed output
                prev = (self.bbox_embed(out) + inverse_sigmoid(ref, ANCHOR_EPS)).sigmoid()
                ref = prev.detach()
        return hidden, boxes


class DABDETR(nn.Module):
    arch = "dab_detr"
    # forward(..., matching=False) answers only the extra groups: a teacher whose matching predictions no
    # loss reads skips them (measured on the demo teachers with CLoCK's group, 1 thread: 13-25% of its forward)
    groups_without_matching = True

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.hidden_dim, self.num_classes = cfg.hidden_dim, cfg.num_classes
        self.num_queries, self.dec_layers = cfg.num_queries, cfg.dec_layers
        d = cfg.hidden_dim
        self.backbone = build_backbone(cfg.backbone)
        self.strides = [self.backbone.strides[-1]]
        self.input_proj = nn.Conv2d(self.backbone.num_channels[-1], d, 1)
        self.position = PositionEmbeddingSine(d // 2, temperature=cfg.dab.pos_temperature)
        act = cfg.dab.activation
        self.encoder = DABEncoder(d, cfg.nheads, cfg.ffn_dim, cfg.dropout, cfg.enc_layers, act)
        self.decoder = DABDecoder(d, cfg.nheads, cfg.ffn_dim, cfg.dropout, cfg.dec_layers, act)
        self.refpoint_embed = nn.Embedding(cfg.num_queries, 4)
        self.class_embed = nn.Linear(d, cfg.num_classes)
        self._reset_parameters()

    def _reset_parameters(self):
        """DAB-DETR's init: Xavier for the transformer's matrices, zero attention biases (as
        nn.MultiheadAttention), zero last box layer, focal prior on the class bias."""
        for module in (self.encoder, self.decoder):
            for name, p in module.named_parameters():
                if p.dim() > 1 and not name.startswith("bbox_embed."):
                    nn.init.xavier_uniform_(p)
        for layer in self.encoder.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                         layer.self_attn.out_proj):
                nn.init.zeros_(proj.bias)
        for layer in self.decoder.layers:
            nn.init.zeros_(layer.sa_out_proj.bias)
            nn.init.zeros_(layer.ca_out_proj.bias)
        init_box_head(self.decoder.bbox_embed)
        init_class_head(self.class_embed)

    def forward(self, images, targets=None, groups=None, matching=True):
        """images [B, 3, H, W] -> DetrOutput (targets are unused: DAB-DETR has no denoising).
        matching=False runs only the extra groups (the stages then hold 0 queries)."""
        groups = groups or []
        src = self.input_proj(self.backbone(images)[-1])
        pos = self.position(src)
        batch = src.shape[0]
        memory = src.flatten(2).transpose(1, 2)
        memory_pos = pos.flatten(2).transpose(1, 2)
        memory = self.encoder(memory, memory_pos)

        # matching queries: zero content (DAB default) on learned anchors; groups follow them
        num_matching = self.num_queries if matching else 0
        anchors = [self.refpoint_embed.weight[None, :num_matching].expand(batch, -1, -1)]
        content = [anchors[0].new_zeros(batch, num_matching, self.hidden_dim)]
        for g in groups:
            anchors.append(inverse_sigmoid(g.boxes))
            content.append(g.content)
        sizes = [a.shape[1] for a in anchors]
        mask = self_attn_mask(batch, num_matching, None, *group_attention_blocks(groups), src.device)
        hidden, boxes = self.decoder(torch.cat(content, 1), torch.cat(anchors, 1), memory, memory_pos, mask)
        logits = [self.class_embed(h) for h in hidden]
        blocks = split_stages(logits, boxes, sizes)
        return DetrOutput(
            memory=[unflatten_dim(memory.transpose(1, 2), 2, src.shape[-2:])],
            memory_pos=[pos],
            stages=blocks[0],
            groups=blocks[1:],
            features=[src],
            anchors=anchors[0].detach().sigmoid(),
        )
