"""Epoch samplers for long-tailed training, one strict registry: which image indices an epoch visits.

"instance" is the usual shuffle (the engine's default); "class-balanced", "sqrt" and "progressive" re-balance the
classes (Kang et al., ICLR 2020, "Decoupling representation and classifier"). Each epoch's draw comes from a
torch.Generator seeded from (seed, epoch) only, so a resumed run sees the same indices, and is sharded across
ranks: rank r takes every world_size-th index of the one epoch-wide draw. `ShardSampler` is the evaluation order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from finegrain.registry import Registry
from finegrain.train.seeding import epoch_seed


class LabelSampler(Sampler[int]):
    """Base: draws class c with probability `class_probabilities()[c]`, then an image of that class.

    Within an epoch the k-th draw of class c takes the (k mod n_c)-th image of a fresh shuffle of the class, so a
    class's images repeat only once all of them have been drawn (the "random cycle" of Kang et al.'s sampler).
    The epoch-wide draw holds num_samples indices rounded up to a multiple of world_size (every rank takes the
    same number of steps); `len(sampler)` is one rank's share.
    """

    stream = 5  # of `epoch_seed`: the re-balancing draws never repeat the loader's

    def __init__(
        self,
        labels: Sequence[int],
        *,
        seed: int = 0,
        num_samples: int | None = None,
        total_epochs: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        y = np.asarray(labels)
        if y.ndim != 1 or len(y) == 0 or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise ValueError("labels must be a non-empty sequence of class indices >= 0")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if total_epochs < 1:
            raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.labels = torch.as_tensor(y, dtype=torch.long)
        self.class_counts = torch.bincount(self.labels)  # [C], C = largest label + 1
        self.seed, self.total_epochs, self.rank, self.world_size = seed, total_epochs, rank, world_size
        self.num_samples = len(y) if num_samples is None else int(num_samples)
        self.per_rank = math.ceil(self.num_samples / world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def class_probabilities(self, epoch: int | None = None) -> np.ndarray:
        """Probability of drawing each class [C] at `epoch` (default: the current one)."""
        raise NotImplementedError

    def _draw(self, n: int, g: torch.Generator) -> torch.Tensor:
        """n image indices [n] for this epoch, all randomness from g."""
        p = torch.as_tensor(self.class_probabilities(), dtype=torch.float64)
        cls = torch.multinomial(p, n, replacement=True, generator=g)
        counts = self.class_counts
        shuffled = torch.randperm(len(self.labels), generator=g)
        grouped = shuffled[torch.argsort(self.labels[shuffled], stable=True)]  # by class, shuffled within a class
        class_start = torch.cumsum(counts, 0) - counts
        drawn = torch.bincount(cls, minlength=len(counts))
        order = torch.argsort(cls, stable=True)
        occurrence = torch.empty_like(cls)  # how many earlier draws picked the same class
        occurrence[order] = torch.arange(n) - (torch.cumsum(drawn, 0) - drawn)[cls[order]]
        return grouped[class_start[cls] + occurrence % counts[cls]]

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, self.stream))
        draw = self._draw(self.per_rank * self.world_size, g)
        return iter(draw[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.per_rank

    def _instance_p(self) -> np.ndarray:
        counts = self.class_counts.double().numpy()
        return counts / counts.sum()

    def _balanced_p(self) -> np.ndarray:
        present = (self.class_counts > 0).double().numpy()
        return present / present.sum()


class InstanceSampler(LabelSampler):
    """Uniform over images: one seeded permutation an epoch, repeated cyclically to the epoch's length, so each image
    is visited once per len(labels) indices (the padding that evens out the ranks' shares repeats its start)."""

    stream = 1  # the training order's stream, as it always was: seeded runs keep their order

    def class_probabilities(self, epoch: int | None = None) -> np.ndarray:
        return self._instance_p()

    def _draw(self, n: int, g: torch.Generator) -> torch.Tensor:
        size = len(self.labels)
        return torch.randperm(size, generator=g)[torch.arange(n) % size]


class ClassBalancedSampler(LabelSampler):
    """Each class (with at least one image) equally likely, then an image of it."""

    def class_probabilities(self, epoch: int | None = None) -> np.ndarray:
        return self._balanced_p()


class SqrtSampler(LabelSampler):
    """Class probability ∝ √n_c, then an image of it."""

    def class_probabilities(self, epoch: int | None = None) -> np.ndarray:
        root = np.sqrt(self.class_counts.double().numpy())
        return root / root.sum()


class ProgressiveSampler(LabelSampler):
    """p(t) = (1 - t/T) · p_instance + (t/T) · p_balanced, t the epoch (0-based, capped at T = total_epochs).

    Epoch 0 samples like "instance" (with replacement), and t/T grows linearly; as in Kang et al.'s formula the
    last epoch (t = T - 1) is (T - 1)/T of the way to class-balanced.
    """

    def class_probabilities(self, epoch: int | None = None) -> np.ndarray:
        t = min(max(self.epoch if epoch is None else epoch, 0), self.total_epochs) / self.total_epochs
        return (1.0 - t) * self._instance_p() + t * self._balanced_p()


class ShardSampler(Sampler[int]):
    """Evaluation order: rank r takes positions r, r + world_size, ... of range(n), in order and unpadded (no
    image is counted twice when the ranks' results are summed)."""

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1) -> None:
        self.indices = range(rank, n, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


SAMPLERS: Registry[type[LabelSampler]] = Registry("sampler")
SAMPLERS.register("instance")(InstanceSampler)
SAMPLERS.register("class-balanced")(ClassBalancedSampler)
SAMPLERS.register("sqrt")(SqrtSampler)
SAMPLERS.register("progressive")(ProgressiveSampler)


def create_sampler(name: str, labels: Sequence[int], **kwargs: Any) -> LabelSampler:
    """Sampler `name` (see SAMPLERS) over labels [N]; kwargs set to None keep the sampler's defaults."""
    return SAMPLERS.create(name, labels, **kwargs)


__all__ = [
    "SAMPLERS",
    "ClassBalancedSampler",
    "InstanceSampler",
    "LabelSampler",
    "ProgressiveSampler",
    "ShardSampler",
    "SqrtSampler",
    "create_sampler",
]
