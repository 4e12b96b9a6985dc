"""Inference-only folds (RT-DETR's `convert_to_deploy`): BatchNorm into the conv before it, and
RepVGG's 3x3 + 1x1 branches into one 3x3 conv. Same outputs up to float rounding, fewer ops.

Only for a model that is never trained afterwards: a fused model has no BatchNorm statistics left
to update, and its state dict no longer loads into an unfused model. Pass a copy, or a model loaded
for inference (the torch backend's checkpoint, the ONNX export's copy). Modules that can be folded
say how with a `fuse()` method; fuse_for_inference calls them, children first.
"""
import torch
from torch import nn


@torch.no_grad()
def fold_conv_norm(conv, norm):
    """conv followed by an eval-mode BatchNorm2d / FrozenBatchNorm2d -> one conv with bias.

    norm(conv(x)) = scale * (conv(x) - mean) + beta, scale = gamma / sqrt(var + eps): scale the conv's
    output channels and move the shift into its bias. Computed in float64 so the fold adds no error
    beyond the final rounding."""
    if norm.training or norm.running_mean is None:
        raise ValueError("only an eval-mode norm with running statistics folds into a conv")
    weight, channels = conv.weight, conv.out_channels
    gamma = norm.weight if norm.weight is not None else torch.ones(channels, device=weight.device)
    beta = norm.bias if norm.bias is not None else torch.zeros(channels, device=weight.device)
    scale = gamma.double() * (norm.running_var.double() + norm.eps).rsqrt()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    fused = nn.Conv2d(conv.in_channels, channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                      conv.groups, bias=True, padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype)
    fused.weight.copy_(weight.double() * scale[:, None, None, None])
    fused.bias.copy_((bias - norm.running_mean.double()) * scale + beta.double())
    return fused


def fold_pairs(module, *pairs):
    """Fold each (conv attribute, norm attribute) of `module`; the norm becomes an Identity, so the
    module's forward stays as written."""
    for conv_name, norm_name in pairs:
        norm = getattr(module, norm_name)
        if not isinstance(norm, nn.Identity):  # already folded
            setattr(module, conv_name, fold_conv_norm(getattr(module, conv_name), norm))
            setattr(module, norm_name, nn.Identity())


def fold_sequential(seq):
    """Fold an nn.Sequential(conv, norm, ...) in place (keeps its indices, so its layout stays readable)."""
    if not isinstance(seq[1], nn.Identity):
        seq[0], seq[1] = fold_conv_norm(seq[0], seq[1]), nn.Identity()


def _fuse_tree(module):
    for child in module.children():
        _fuse_tree(child)
    if callable(getattr(module, "fuse", None)):
        module.fuse()


def fuse_for_inference(model):
    """Apply every module's `fuse()` to an eval-mode `model`, in place, children before parents; returns it.

    Never on a model that trains afterwards (see the module docstring): callers pass a copy or a model
    loaded for inference only."""
    if any(m.training for m in model.modules()):
        raise ValueError("fuse_for_inference needs an eval-mode model (call .eval()); never fuse a training model")
    _fuse_tree(model)
    return model
