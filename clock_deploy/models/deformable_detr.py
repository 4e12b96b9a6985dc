"""Deformable DETR (Zhu et al. 2021): multi-scale deformable encoder + decoder.

Options (ModelConfig): `box_refine` (iterative box refinement: one head per decoder layer,
each layer's box becomes the next layer's reference) and `two_stage` (queries initialised
from the top-scoring encoder proposals instead of learned embeddings).
"""
import torch
from torch import nn

from clock_deploy.models.contract import DetrOutput
from clock_deploy.models.deformable_transformer import MultiScaleDetrBase, TwoStageProposals, unflatten_levels
from clock_deploy.models.position import gen_sineembed_for_position
from clock_deploy.models.transformer_utils import (MLP, group_attention_blocks, init_box_head, init_class_head,
                                                   inverse_sigmoid, self_attn_mask, split_stages)


class DeformableDETR(MultiScaleDetrBase):
    arch = "deformable_detr"
    groups_without_matching = True  # forward(..., matching=False): see DABDETR
    position_embedding = {"temperature": 10000, "centred": True}  # (i + 0.5) / H, as Deformable DETR

    def __init__(self, cfg):
        super().__init__(cfg)
        self.box_refine, self.two_stage = cfg.box_refine, cfg.two_stage
        d = cfg.hidden_dim

        # prediction heads: one per decoder layer with box refinement, else one shared
        num_heads = cfg.dec_layers if cfg.box_refine else 1
        self.class_embed = nn.ModuleList(nn.Linear(d, cfg.num_classes) for _ in range(num_heads))
        self.bbox_embed = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(num_heads))
        for cls_head, box_head in zip(self.class_embed, self.bbox_embed):
            init_class_head(cls_head)
            init_box_head(box_head)

        if cfg.two_stage:
            self.proposals = TwoStageProposals(d, cfg.num_classes, cfg.num_queries, cfg.proposal_rank)
            # sine embedding of a proposal -> (query_pos, content)
            self.pos_trans = nn.Linear(2 * d, 2 * d)
            self.pos_trans_norm = nn.LayerNorm(2 * d)
        else:
            self.query_embed = nn.Embedding(cfg.num_queries, 2 * d)  # (query_pos, content)
            self.reference_points = nn.Linear(d, 2)
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
            # the first layer predicts the size directly (2-D reference): start from small boxes
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)

    def _head(self, layer):
        return min(layer, len(self.class_embed) - 1)

    def _proposal_queries(self, boxes):
        """Two-stage: sigmoid boxes [B, N, 4] -> (query_pos, content) through pos_trans."""
        embed = self.pos_trans_norm(self.pos_trans(gen_sineembed_for_position(boxes, self.hidden_dim // 2)))
        return embed.split(self.hidden_dim, dim=-1)

    def _group_queries(self, group):
        """A QueryGroup in this model's terms: (content, query_pos, reference).

        The reference has the format of the matching queries' first reference: the box centre in
        the one-stage model (2-D reference points), the full box with two_stage. If group.pos is
        None the positional query comes from the box: through pos_trans with two_stage, else the
        parameter-free sine embedding of the box (hidden_dim // 4 channels per coordinate).
        """
        pos = group.pos
        if pos is None:
            if self.two_stage:
                pos = self._proposal_queries(group.boxes)[0]
            else:
                pos = gen_sineembed_for_position(group.boxes, self.hidden_dim // 4)
        reference = group.boxes if self.two_stage else group.boxes[..., :2]
        return group.content, pos, reference

    def forward(self, images, targets=None, groups=None, matching=True):
        """images [B, 3, H, W] -> DetrOutput (targets unused: no denoising in Deformable DETR).
        matching=False runs only the extra groups: no proposals, stages of 0 queries."""
        groups = groups or []
        maps, pos_maps, memory, spatial_shapes = self.encode(images)
        batch = memory.shape[0]

        encoder_out = None
        if not matching:
            query_pos = content = memory.new_zeros(batch, 0, self.hidden_dim)
            reference = memory.new_zeros(batch, 0, 4 if self.two_stage else 2)
        elif self.two_stage:
            encoder_out, anchors = self.proposals(memory, spatial_shapes)
            reference = anchors.sigmoid()
            query_pos, content = self._proposal_queries(reference)
        else:
            query_pos, content = self.query_embed.weight[None].expand(batch, -1, -1).split(self.hidden_dim, -1)
            reference = self.reference_points(query_pos).sigmoid()

        contents, positions, references = [content], [query_pos], [reference]
        for g in groups:
            for blocks, value in zip((contents, positions, references), self._group_queries(g)):
                blocks.append(value)
        sizes = [c.shape[1] for c in contents]
        mask = self_attn_mask(batch, sizes[0], None, *group_attention_blocks(groups), memory.device)
        logits, boxes = self._decode(torch.cat(contents, 1), torch.cat(positions, 1), torch.cat(references, 1),
                                     memory, spatial_shapes, mask)
        blocks = split_stages(logits, boxes, sizes)
        # the 2-D reference point has no size: the first layer's is the one it starts from
        anchors = reference if self.two_stage else torch.cat([reference, blocks[0][0].boxes[..., 2:]], -1)
        return DetrOutput(
            memory=unflatten_levels(memory, spatial_shapes),
            memory_pos=pos_maps,
            stages=blocks[0],
            groups=blocks[1:],
            features=maps,
            encoder=encoder_out,
            anchors=anchors.detach(),
        )

    def _decode(self, tgt, query_pos, reference, memory, spatial_shapes, mask):
        """Run the decoder layers; returns per-layer logits and sigmoid cxcywh boxes."""
        logits, boxes = [], []
        out = tgt
        for i, layer in enumerate(self.decoder):
            out = layer(out, query_pos, reference, memory, spatial_shapes, mask)
            delta = self.bbox_embed[self._head(i)](out)
            if reference.shape[-1] == 4:
                box = (delta + inverse_sigmoid(reference)).sigmoid()
            else:  # 2-D reference: it offsets the centre, the size is predicted directly
                box = torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()
            logits.append(self.class_embed[self._head(i)](out))
            boxes.append(box)
            if self.box_refine:
                reference = box.detach()
        return logits, boxes
