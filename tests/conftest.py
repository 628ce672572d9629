"""Tests run tiny models: one intra-op thread is faster for them than two, and immune to a busy machine
(two OpenMP threads spinning against another process can be ten times slower)."""
import torch

torch.set_num_threads(1)
