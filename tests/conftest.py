"""Test session settings: the tiny models are dominated by per-op overhead, where extra threads only spin."""

import torch

torch.set_num_threads(1)
