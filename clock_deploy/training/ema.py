"""Exponential moving average of model weights (evaluated and exported instead of the raw weights)."""
import copy
import math

import torch


class ModelEMA:
    def __init__(self, model, decay=0.9997, warmup=2000):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.warmup = warmup  # ramp the decay up so early weights are not frozen in
        self.updates = 0

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        decay = self.decay * (1 - math.exp(-self.updates / self.warmup))
        model_state = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(decay).add_(model_state[name].detach(), alpha=1 - decay)
            else:
                value.copy_(model_state[name])

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state, updates):
        self.module.load_state_dict(state)
        self.updates = updates
