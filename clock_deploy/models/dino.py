"""DINO (Zhang et al. 2023): Deformable-DETR with contrastive denoising, mixed query
selection and look-forward-twice box refinement.

Query layout in the decoder: [matching (num_queries) | denoising (training with targets) |
extra groups...]. The self-attention mask keeps the matching queries blind to everything
after them, denoising groups blind to each other, and every extra group on its own.
"""
import torch
from torch import nn

from clock_deploy.models.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from clock_deploy.models.contract import DenoisingOutput, DetrOutput
from clock_deploy.models.deformable_transformer import MultiScaleDetrBase, TwoStageProposals, unflatten_levels
from clock_deploy.models.position import gen_sineembed_for_position
from clock_deploy.models.transformer_utils import (MLP, group_attention_blocks, init_box_head, init_class_head,
                                                   inverse_sigmoid, self_attn_mask, split_stages)


def build_denoising_queries(targets, num_classes, label_enc, dn_cfg, num_matching, queries_per_gt=2):
    """Contrastive denoising queries (DINO CDN) from the ground truth of a batch.

    With M = the largest GT count in the batch, there are G = max(1, dn_cfg.num_queries // (q M))
    groups (q = queries_per_gt: DINO 2, RT-DETR 1, whose dn number counts GT copies, not queries)
    of 2M queries: slots [g*2M, g*2M + M) are positives (GT boxes jittered by less than
    half their size), [g*2M + M, (g+1)*2M) negatives (jittered by 1-2x that, to be rejected);
    slot j of each half is GT j of the image, slots j >= that image's GT count are padding.
    Labels are flipped to a random class with probability label_noise / 2.

    Returns (content [B, N, D], anchors [B, N, 4] unsigmoided, base mask over
    [matching | denoising] [B, Q+N, Q+N], meta dict) or None when the batch has no GT.
    """
    counts = [len(t["labels"]) for t in targets]
    max_gt = max(counts, default=0)
    if max_gt == 0 or dn_cfg.num_queries <= 0:
        return None
    device = label_enc.weight.device
    batch, num_groups = len(targets), max(1, dn_cfg.num_queries // (queries_per_gt * max_gt))
    labels = torch.zeros(batch, max_gt, dtype=torch.long, device=device)
    boxes = torch.zeros(batch, max_gt, 4, device=device)
    valid = torch.zeros(batch, max_gt, dtype=torch.bool, device=device)
    for b, t in enumerate(targets):
        labels[b, :counts[b]] = t["labels"]
        boxes[b, :counts[b]] = t["boxes"]
        valid[b, :counts[b]] = True
    repeats = 2 * num_groups
    labels, boxes, valid = labels.repeat(1, repeats), boxes.repeat(1, repeats, 1), valid.repeat(1, repeats)
    total = labels.shape[1]
    positive = (torch.arange(total, device=device) % (2 * max_gt)) < max_gt

    noisy_labels = labels.clone()
    flip = torch.rand(labels.shape, device=device) < dn_cfg.label_noise * 0.5
    noisy_labels[flip] = torch.randint(0, num_classes, (int(flip.sum()),), device=device)

    # corners move by up to half the box size (positives) or 1-2x that (negatives)
    half_size = boxes[..., 2:].repeat(1, 1, 2) / 2
    sign = torch.randint(0, 2, boxes.shape, device=device) * 2.0 - 1.0
    magnitude = torch.rand(boxes.shape, device=device) + (~positive).float()[None, :, None]
    corners = box_cxcywh_to_xyxy(boxes) + sign * magnitude * half_size * dn_cfg.box_noise
    noisy_boxes = box_xyxy_to_cxcywh(corners.clamp(0.0, 1.0))

    content = label_enc(noisy_labels) * valid[..., None]
    anchors = inverse_sigmoid(noisy_boxes) * valid[..., None]  # padding: anchor logit 0 = centred box

    size = num_matching + total
    mask = torch.zeros(batch, size, size, dtype=torch.bool, device=device)
    mask[:, :num_matching, num_matching:] = True            # matching queries never see denoising
    group_of = torch.arange(total, device=device) // (2 * max_gt)
    mask[:, num_matching:, num_matching:] = (group_of[:, None] != group_of[None, :])[None] | ~valid[:, None, :]
    meta = {"num_groups": num_groups, "max_gt": max_gt, "labels": labels, "boxes": boxes,
            "valid": valid, "positive": positive}
    return content, anchors, mask, meta


class DINO(MultiScaleDetrBase):
    arch = "dino"
    groups_without_matching = True  # forward(..., matching=False): see DABDETR
    position_embedding = {"temperature": 20, "centred": False}  # DINO's PositionEmbeddingSineHW at its config

    def __init__(self, cfg):
        super().__init__(cfg)
        self.dn_cfg = cfg.dn
        d = cfg.hidden_dim
        self.decoder_norm = nn.LayerNorm(d)
        self.ref_point_head = MLP(2 * d, d, d, 2)  # sine embedding of the reference box -> query_pos

        # heads shared by all decoder layers (DINO default); the proposals have their own
        self.class_embed = nn.Linear(d, cfg.num_classes)
        self.bbox_embed = MLP(d, d, 4, 3)
        init_class_head(self.class_embed)
        init_box_head(self.bbox_embed)
        self.proposals = TwoStageProposals(d, cfg.num_classes, cfg.num_queries)

        self.tgt_embed = nn.Embedding(cfg.num_queries, d)    # learned content of the matching queries
        self.label_enc = nn.Embedding(cfg.num_classes, d)    # content of the denoising queries

    def forward(self, images, targets=None, groups=None, matching=True):
        """images [B, 3, H, W]; targets (training only) add denoising queries -> DetrOutput.
        matching=False runs only the extra groups: no proposals, stages of 0 queries."""
        groups = groups or []
        maps, pos_maps, memory, spatial_shapes = self.encode(images)
        batch = memory.shape[0]

        if matching:  # mixed query selection: the top encoder proposals give the anchors, the content is learned
            encoder_out, anchors = self.proposals(memory, spatial_shapes)
            content = self.tgt_embed.weight[None].expand(batch, -1, -1)
        else:
            encoder_out, anchors = None, memory.new_zeros(batch, 0, 4)
            content = memory.new_zeros(batch, 0, self.hidden_dim)
        contents, anchor_blocks = [content], [anchors]
        dn, base_mask = None, None
        if self.training and targets is not None:
            dn = build_denoising_queries(targets, self.num_classes, self.label_enc, self.dn_cfg, self.num_queries)
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
        return DetrOutput(
            memory=unflatten_levels(memory, spatial_shapes),
            memory_pos=pos_maps,
            stages=blocks[0],
            groups=blocks[1:],
            features=maps,
            encoder=encoder_out,
            denoising=denoising,
            anchors=anchors.sigmoid(),
        )

    def _decode(self, tgt, anchors, memory, spatial_shapes, mask):
        """Decoder with look-forward-twice refinement, as DINO; returns per-layer logits and boxes.

        After layer i, the box head on the raw layer output refines the reference:
        ref_{i+1} = sigmoid(head(out_i) + logit(ref_i)); the next layer attends around it detached.
        The reported box of layer i applies the head to the LayerNormed output on top of ref_i *with*
        its gradient, so delta_{i-1} is also trained by layer i's loss (look forward twice).
        """
        ref_input = anchors.sigmoid()       # detached reference that the attention uses
        ref_prev = ref_input                # same values, carrying one step of gradient
        logits, boxes = [], []
        out = tgt
        for i, layer in enumerate(self.decoder):
            query_pos = self.ref_point_head(gen_sineembed_for_position(ref_input, self.hidden_dim // 2))
            out = layer(out, query_pos, ref_input, memory, spatial_shapes, mask)
            hidden = self.decoder_norm(out)
            logits.append(self.class_embed(hidden))
            boxes.append((self.bbox_embed(hidden) + inverse_sigmoid(ref_prev)).sigmoid())
            if i < len(self.decoder) - 1:
                ref_prev = (self.bbox_embed(out) + inverse_sigmoid(ref_input)).sigmoid()
                ref_input = ref_prev.detach()
        return logits, boxes
