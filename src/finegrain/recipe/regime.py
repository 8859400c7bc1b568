"""The recipe's first choice: how deep to fine-tune (`regime=auto`), from the data and the compute at hand.

Thresholds come from the measured table in BENCHMARKS.md ("which regime wins at which budget", cub100, about 26
training images a class, efficientnet_lite0, 2-core CPU) and the transfer-learning literature (deeper fine-tuning
pays off with more data per class: Yosinski et al., 2014; Kornblith et al., 2019).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch

FEW_SHOT = 5  # images a class below which only a new classifier is trained
FULL_DATA = 100  # images a class from which the whole network is worth training (given the compute)
HEAD_PASSES = 1.0  # full training passes over the train set the budget allows: below, only the head (cached)
LAST1_PASSES = 5.0  # below: last:1; from here last:2 (both on a cached trunk on a CPU)
FULL_PASSES = 20.0  # a full fine-tune needs about this many passes to converge


@dataclass(frozen=True)
class RegimeChoice:
    regime: str
    reason: str
    images_per_class: float
    passes: float | None  # full training passes over train the budget allows (None: no budget)


def choose_regime(
    class_counts: list[int], *, images_per_second: float | None = None, budget_min: float | None = None
) -> RegimeChoice:
    """`auto`: the regime a practitioner would pick from the images a class (median) and the compute.

    images_per_second: measured full-network training speed here; with budget_min it gives how many full passes
    over the training set the budget allows. Without a budget, only the data decides."""
    n_train = sum(class_counts)
    per_class = float(statistics.median(class_counts)) if class_counts else 0.0
    passes = None
    if budget_min is not None and images_per_second:
        passes = 60 * budget_min * images_per_second / max(n_train, 1)
    data = f"{per_class:g} training images a class (median)"
    if per_class < FEW_SHOT:
        return RegimeChoice(
            "head", f"{data}: too few to train any backbone layer without overfitting; only a new classifier learns",
            per_class, passes,
        )  # fmt: skip
    if passes is None:
        if per_class >= FULL_DATA:
            return RegimeChoice(
                "full", f"{data}, no time budget: enough data to adapt every layer (backbone at a lower rate)",
                per_class, passes,
            )  # fmt: skip
        return RegimeChoice(
            "last:2", f"{data}, no time budget: the last two stages adapt, the generic early layers stay frozen",
            per_class, passes,
        )  # fmt: skip
    compute = f"{budget_min:g} min at {images_per_second:.0f} images/s = {passes:.1f} full passes over {n_train} images"
    if passes < HEAD_PASSES:
        return RegimeChoice(
            "head", f"{compute}: too little time for backbone layers; the head trains on cached features", per_class,
            passes,
        )  # fmt: skip
    if per_class >= FULL_DATA and passes >= FULL_PASSES:
        return RegimeChoice(
            "full", f"{data} and {compute}: enough of both to adapt every layer", per_class, passes
        )  # fmt: skip
    if passes < LAST1_PASSES:
        return RegimeChoice(
            "last:1", f"{compute}: time for the last stage to adapt", per_class, passes
        )  # fmt: skip
    return RegimeChoice(
        "last:2",
        f"{data} and {compute}: the last two stages adapt; a full fine-tune needs about {FULL_PASSES:g} passes and "
        f"{FULL_DATA} images a class to pay off",
        per_class, passes,
    )  # fmt: skip


def auto_cache_views(passes: float | None) -> int:
    """Augmented views to cache the frozen trunk over on a CPU: about two per full pass the budget allows (a cached
    view costs a forward pass of the trunk in bf16, far less than a training step), between 1 and 16."""
    if passes is None:
        return 8
    return int(min(16, max(1, 2 * passes)))


def measure_training_speed(model: torch.nn.Module, *, batch_size: int = 16, steps: int = 2) -> float:
    """Images/s of full-network training steps (forward + backward) on this device, timed on a copy of the model
    (its BatchNorm statistics and the global RNG stay untouched). A few seconds on a CPU."""
    with torch.no_grad():
        probe = copy.deepcopy(model).train()
    for p in probe.parameters():
        p.requires_grad_(True)
    param = next(probe.parameters())
    size = probe.preprocess.input_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, size, size, generator=g).to(param.device)
    if param.is_contiguous(memory_format=torch.channels_last) and param.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.random.fork_rng(devices=[]):
        best = float("inf")
        for i in range(steps + 1):  # the first step warms up
            t0 = time.perf_counter()
            probe(x).float().logsumexp(-1).mean().backward()
            if param.device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                best = min(best, time.perf_counter() - t0)
    return batch_size / best
