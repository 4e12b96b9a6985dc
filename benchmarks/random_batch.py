"""A fixed training batch for the timing benchmarks (shared by bench_train.py and bench_distill_step.py)."""
import torch


def random_batch(cfg, generator):
    """A training batch of the configured size: noise images, 1-6 random GT boxes per image."""
    height, width = cfg.data.img_size
    images = torch.randn(cfg.train.batch_size, 3, height, width, generator=generator)
    targets = []
    for _ in range(cfg.train.batch_size):
        n = int(torch.randint(1, 7, (1,), generator=generator))
        centre = 0.2 + 0.6 * torch.rand(n, 2, generator=generator)
        size = 0.05 + 0.3 * torch.rand(n, 2, generator=generator)
        targets.append({"boxes": torch.cat([centre, size], 1),
                        "labels": torch.randint(0, cfg.model.num_classes, (n,), generator=generator)})
    return images, targets
