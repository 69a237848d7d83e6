"""Test-wide settings."""

import torch


# The tests run tiny models, for which one thread is fastest; more threads only contend with other processes.
torch.set_num_threads(1)
