"""Seeds from (seed, epoch, stream): each epoch's randomness is fixed by the run's seed alone, so a run resumed at
any epoch draws exactly what an uninterrupted one would.

Streams in use: 0 global RNGs at the start of an epoch (augmentation, dropout), 1 the training order (instance
sampler, cached-trunk batches), 2 the DataLoader's own seed, 3 mixup / CutMix (manifold mixup on the cached path),
5 the re-balancing samplers and the trunk cache's train views, 6 its val view.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 7919 + stream * 104_729) % (2**31 - 1)


def seed_all(s: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(s)
    np.random.seed(s % (2**32 - 1))
    torch.manual_seed(s)
