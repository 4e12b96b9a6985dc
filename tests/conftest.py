import torch

# Test models are tiny and overhead-bound: one intra-op thread is as fast as two, and it does not
# collapse when another process (a DDP rank, a bench job) shares the two cores.
torch.set_num_threads(1)
