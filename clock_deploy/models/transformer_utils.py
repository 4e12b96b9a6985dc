"""Small transformer pieces shared by the detectors: MLP, attention, FFN, query masks.

Conventions: tensors are batch-first ([B, L, D]); attention masks are boolean with
True = "may not attend" (as in DETR / nn.MultiheadAttention).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from clock_deploy.models.contract import StageOutput


def unflatten_dim(x, dim, sizes):
    """x.unflatten(dim, sizes) written as a reshape.

    A traced `unflatten` records every other dimension (e.g. the batch) as a constant, which
    breaks dynamic-batch ONNX graphs; a reshape keeps them symbolic.
    """
    dim = dim % x.dim()
    return x.reshape(*x.shape[:dim], *sizes, *x.shape[dim + 1:])


def inverse_sigmoid(x, eps=1e-5):
    """logit(x) with clamping, so boxes at 0 or 1 stay finite."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """Linear layers with ReLU in between (DETR box head)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def init_class_head(linear, prior_prob=0.01):
    """Focal-loss prior: every class starts at probability `prior_prob` (RetinaNet)."""
    nn.init.constant_(linear.bias, -math.log((1 - prior_prob) / prior_prob))


def init_box_head(mlp):
    """Zero last layer: the first prediction of a refinement head is its reference box."""
    nn.init.constant_(mlp.layers[-1].weight, 0)
    nn.init.constant_(mlp.layers[-1].bias, 0)


class FFN(nn.Module):
    """Position-wise feed-forward block (without the residual / norm around it)."""

    def __init__(self, d_model, ffn_dim, dropout, activation="relu"):
        super().__init__()
        if activation not in ("relu", "prelu", "gelu"):
            raise ValueError(f"activation must be relu, prelu or gelu, got {activation}")
        self.linear1 = nn.Linear(d_model, ffn_dim)
        # PReLU (DAB-DETR's default) learns one slope per block; ReLU / GELU (RT-DETR's AIFI) hold no weights
        self.activation = {"prelu": nn.PReLU, "relu": nn.ReLU, "gelu": nn.GELU}[activation]()
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout2(self.linear2(self.dropout1(self.activation(self.linear1(x)))))


def attention(q, k, v, num_heads, attn_mask=None, dropout=0.0, training=False):
    """Scaled dot-product attention over already-projected q, k, v.

    q: [B, Lq, Dqk], k: [B, Lk, Dqk], v: [B, Lk, Dv] (Dqk may differ from Dv, e.g. DAB-DETR's
    concatenated content + position queries); attn_mask: [Lq, Lk] or [B, Lq, Lk], True = blocked.
    Returns [B, Lq, Dv]. Written out (no fused kernel) so the mask semantics and the ONNX graph are plain.
    """
    q = unflatten_dim(q, -1, (num_heads, -1)).transpose(1, 2)  # [B, nH, Lq, dh]
    k = unflatten_dim(k, -1, (num_heads, -1)).transpose(1, 2)
    v = unflatten_dim(v, -1, (num_heads, -1)).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5)
    if attn_mask is not None:
        mask = attn_mask[None, None] if attn_mask.dim() == 2 else attn_mask[:, None]
        scores = scores.masked_fill(mask, float("-inf"))
    weights = F.dropout(scores.softmax(-1), p=dropout, training=training)
    return (weights @ v).transpose(1, 2).flatten(-2)


class MultiHeadAttention(nn.Module):
    """Standard multi-head attention with input / output projections (batch-first)."""

    def __init__(self, d_model, num_heads, dropout=0.0):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, query, key, value, attn_mask=None):
        out = attention(self.q_proj(query), self.k_proj(key), self.v_proj(value), self.num_heads,
                        attn_mask, self.dropout, self.training)
        return self.out_proj(out)


def self_attn_mask(batch_size, num_base, base_mask=None, group_sizes=(), group_pad_masks=(), device=None):
    """Decoder self-attention mask for queries laid out as [base | group_1 | ... | group_n].

    The base block holds the matching queries (and DINO's denoising queries, whose own
    layout comes in `base_mask` [num_base, num_base] or [B, num_base, num_base]). Base queries
    never see a group; a group sees only itself; padded group slots (pad_mask True) are hidden
    as keys. The diagonal is always open, so no row is fully masked (no NaN from softmax).
    Returns [B, T, T] bool (True = blocked), or None when nothing needs masking.
    """
    if base_mask is None and not group_sizes:
        return None
    total = num_base + sum(group_sizes)
    mask = torch.ones(batch_size, total, total, dtype=torch.bool, device=device)
    mask[:, :num_base, :num_base] = False if base_mask is None else base_mask
    start = num_base
    for size, pad in zip(group_sizes, group_pad_masks):
        end = start + size
        mask[:, start:end, start:end] = False if pad is None else pad[:, None, :]
        start = end
    return mask & ~torch.eye(total, dtype=torch.bool, device=device)


def group_attention_blocks(groups):
    """The attention blocks of extra query groups: (sizes, pad_masks) for self_attn_mask, one block
    per segment of each group (`QueryGroup.segments`; the whole group when it has none)."""
    sizes, pads = [], []
    for g in groups:
        start = 0
        for size in g.segments or (g.content.shape[1],):
            pad = None if g.pad_mask is None else g.pad_mask[:, start:start + size]
            sizes.append(size)
            pads.append(pad)
            start += size
        if start != g.content.shape[1]:
            raise ValueError(f"query group segments {g.segments} do not add up to its {g.content.shape[1]} slots")
    return sizes, pads


def split_stages(logits, boxes, sizes):
    """Per-layer predictions of the concatenated query blocks -> per block, per layer StageOutput.

    logits / boxes: lists over decoder layers of [B, T, K] / [B, T, 4]; sizes: block lengths
    summing to T. Returns a list (one per block) of lists of StageOutput.
    """
    blocks = [[] for _ in sizes]
    for layer_logits, layer_boxes in zip(logits, boxes):
        for block, lg, bx in zip(blocks, layer_logits.split(sizes, dim=1), layer_boxes.split(sizes, dim=1)):
            block.append(StageOutput(logits=lg, boxes=bx))
    return blocks


class EncoderLayer(nn.Module):
    """Self-attention with position added to queries / keys, FFN; post-norm (DETR)."""

    def __init__(self, d_model, nheads, ffn_dim, dropout, activation):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, nheads, dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, ffn_dim, dropout, activation)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos):
        q = k = src + pos
        src = self.norm1(src + self.dropout(self.self_attn(q, k, src)))
        return self.norm2(src + self.ffn(src))
