"""FGD's spatial and channel attention of a feature map: FGD's focal and attention terms and LCMD's optional
attention weighting (distill.mem.weighting=gt_attention) share this one rule."""


def attention_maps(features, temperature):
    """FGD spatial [B, H, W] and channel [B, C] attention of a feature map [B, C, H, W].

    A^S = H W softmax_hw(mean_c |F| / T), A^C = C softmax_c(mean_hw |F| / T): each averages 1 over its axis.
    """
    batch, channels, height, width = features.shape
    magnitude = features.abs()
    spatial = (magnitude.mean(1).reshape(batch, -1) / temperature).softmax(-1)
    channel = (magnitude.mean((2, 3)) / temperature).softmax(-1)
    return height * width * spatial.reshape(batch, height, width), channels * channel
