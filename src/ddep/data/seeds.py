"""Per-sample seeds: the data order and each sample's augmentation are functions of (seed, epoch,
index), so that a resumed run sees the batches an uninterrupted one would, whatever process or
data-loader worker reads them."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

MIX = 0x9E3779B97F4A7C15


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed for (seed, epoch, index); negative indices name per-epoch draws (orders, not samples)."""
    return ((seed * MIX + epoch) * MIX + index) % (2**63 - 1)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global CPU random state set to ``seed`` inside, restored after (transforms draw from
    it). Only the CPU generator: ``torch.manual_seed`` would also reseed the GPUs' (dropout's) and,
    before CUDA starts, record a stack trace per call (a quarter of a small image's loading time)."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield
