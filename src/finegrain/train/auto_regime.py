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
DEEPER_DATA = 50  # images a class from which two stages pay (cub100, 26 a class: last:1 >= last:2 at 10 and 30 min)
FULL_DATA = 100  # images a class from which the whole network is worth training (given the compute)
HEAD_PASSES = 1.0  # full training passes over the train set the budget allows: below, only the head (cached)
LAST2_PASSES = 5.0  # two stages need at least this many passes
FULL_PASSES = 20.0  # a full fine-tune needs about this many passes to converge (cub100: 11 passes, still behind)


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
    compute = "no time budget" if passes is None else (
        f"{budget_min:g} min at {images_per_second:.0f} images/s = {passes:.1f} full passes over {n_train} images"
    )  # fmt: skip
    enough = lambda need: passes is None or passes >= need  # noqa: E731
    if per_class < FEW_SHOT:
        regime, why = "head", "too few images to train any backbone layer without overfitting; only a new classifier"
    elif not enough(HEAD_PASSES):
        regime, why = "head", "too little time for backbone layers; the head trains on cached features"
    elif per_class >= FULL_DATA and enough(FULL_PASSES):
        regime, why = "full", "enough data and time to adapt every layer (the backbone at a lower rate)"
    elif per_class < DEEPER_DATA or not enough(LAST2_PASSES):
        regime, why = "last:1", "the last stage adapts; deeper stages would overfit this data or outrun the budget"
    else:
        why = f"the last two stages adapt; every layer needs {FULL_DATA}+ images a class and {FULL_PASSES:g}+ passes"
        regime = "last:2"
    return RegimeChoice(regime, f"{data}, {compute}: {why}", per_class, passes)


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
