"""CPU inference layout: convolutions in channels_last with their weights packed once for oneDNN.

Eager PyTorch hands oneDNN an NCHW weight on every call, and oneDNN reorders it into its blocked
format each time: for a small input that reorder costs about as much as the convolution. A packed
conv reorders its weight once per input shape (the torch backend runs one fixed size) and keeps the
activations channels_last, as TorchInductor's freezing pass does. Same outputs up to float rounding.

Inference only: the packed op has no autograd. Applied by the torch backend to a model it loaded
for inference, after models/fuse.py has folded the norms into the convs.
"""
import torch
from torch import nn


def packing_available():
    """Whether this torch build has oneDNN (mkldnn) and its packed convolution op."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))


class PackedConv2d(nn.Module):
    """An nn.Conv2d run by oneDNN with its weight reordered once per input shape."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv  # keeps the weights (and the state dict layout) of the conv it replaces
        self.packed = (None, None)  # (input shape, weight packed for it): one pair, so threads never mix them

    def forward(self, x):
        conv = self.conv
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled():
            return conv(x)  # oneDNN packing is CPU fp32 inference only
        x = x.contiguous(memory_format=torch.channels_last)
        args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        shape, weight = self.packed
        if shape != x.shape:  # one packed weight at a time: a fixed-size runtime packs once
            weight = torch._C._nn.mkldnn_reorder_conv2d_weight(conv.weight.to_mkldnn(), *args, list(x.shape))
            self.packed = (x.shape, weight)
        return torch.ops.mkldnn._convolution_pointwise(x, weight, conv.bias, *args, "none", [], "")


def packable(module):
    return (type(module) is nn.Conv2d and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
            and module.weight.dtype == torch.float32)


def _pack_tree(module):
    for name, child in module.named_children():
        if packable(child):
            setattr(module, name, PackedConv2d(child))
        else:
            _pack_tree(child)


def prepare_for_cpu(model):
    """`model` (eval mode, loaded for inference) in channels_last with packed convs, in place; returns it.
    Without oneDNN only the memory format changes."""
    if model.training:  # the top module's flag: models/fuse.py's new convs keep nn.Module's default
        raise ValueError("prepare_for_cpu needs an eval-mode model loaded for inference")
    model.to(memory_format=torch.channels_last)
    if packing_available():
        _pack_tree(model)
    return model
