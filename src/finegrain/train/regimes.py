"""Fine-tuning regimes: which parameters learn, and at what learning rate.

head     only the new classifier (and a learnable pooling) learns
last:K   the last K backbone stages, the post-stage layers and the head learn; the prefix is frozen
full     everything learns; the backbone at `backbone_lr_scale` x the head's rate, optionally with layer-wise decay
scratch  everything learns from a random MSRA initialisation, one learning rate
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from finegrain.errors import FinegrainError
from finegrain.train.model import ImageClassifier, stage_view

REGIME_KINDS = ("head", "last", "full", "scratch")


@dataclass(frozen=True)
class Regime:
    kind: str
    k: int = 0  # trained stages, for "last"

    @classmethod
    def parse(cls, text: str) -> Regime:
        kind, _, arg = text.partition(":")
        if kind not in REGIME_KINDS:
            raise FinegrainError(f"unknown regime {text!r}; valid: head, last:K (e.g. last:2), full, scratch")
        if kind == "last":
            if not arg.isdigit() or int(arg) < 1:
                raise FinegrainError(f"regime {text!r}: write last:K with K >= 1 stages, e.g. last:2")
            return cls("last", int(arg))
        if arg:
            raise FinegrainError(f"regime {kind} takes no argument (got {text!r})")
        return cls(kind)

    def __str__(self) -> str:
        return f"last:{self.k}" if self.kind == "last" else self.kind

    @property
    def pretrained(self) -> bool:
        return self.kind != "scratch"

    def frozen_stages(self, model: ImageClassifier) -> int | None:
        """How many stages form a frozen prefix (None: the whole backbone is frozen)."""
        if self.kind == "head":
            return None
        if self.kind == "last":
            n = len(stage_view(model.backbone.model).stages)
            if self.k > n:
                raise FinegrainError(f"regime last:{self.k}: this backbone has only {n} stages")
            return n - self.k
        return 0

    def apply(self, model: ImageClassifier) -> None:
        """Set requires_grad: frozen parameters never get gradients (and cost no optimizer state)."""
        for p in model.parameters():
            p.requires_grad = True
        if self.kind == "head":
            for p in model.backbone.parameters():
                p.requires_grad = False
        elif self.kind == "last":
            view = stage_view(model.backbone.model)
            frozen = view.stem + view.stages[: self.frozen_stages(model)]
            for m in frozen:
                for p in m.parameters():
                    p.requires_grad = False

    def lr_scale(self, model: ImageClassifier, *, backbone_lr_scale: float, layer_decay: float | None):
        """name -> learning-rate multiplier (head 1; backbone lower in `full`, decaying towards the input)."""
        if self.kind in ("head", "scratch"):
            return lambda name: 1.0
        if self.kind == "last":
            return lambda name: 1.0 if name.startswith(("head.", "pool.")) else backbone_lr_scale
        names = stage_view(model.backbone.model).stage_names if layer_decay else []
        n = len(names)

        def scale(name: str) -> float:
            if name.startswith(("head.", "pool.")):
                return 1.0
            if not layer_decay:
                return backbone_lr_scale
            inner = name.removeprefix("backbone.model.")
            depth = next((i for i, prefix in enumerate(names) if inner.startswith(prefix)), None)
            if depth is None:  # stem before the stages, post layers after them
                depth = -1 if not inner.startswith(("conv_head", "bn2", "norm_pre", "final_conv")) else n - 1
            return backbone_lr_scale * layer_decay ** (n - 1 - depth)

        return scale


def set_bn_eval(module: nn.Module, frozen_prefix_only: list[nn.Module] | None = None) -> None:
    """Put BatchNorm layers in eval mode: frozen statistics (tiny batches, or frozen stages)."""
    for m in frozen_prefix_only or [module]:
        for bn in m.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.eval()


# ---- regime=auto: how deep to train, from the data and the compute -------------------------------------------------
# Thresholds come from the measured table in BENCHMARKS.md ("which regime wins at which budget", cub100, about 26
# training images a class, efficientnet_lite0, 2-core CPU) and the transfer-learning literature (deeper fine-tuning
# pays off with more data per class: Yosinski et al., 2014; Kornblith et al., 2019).
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
    import statistics

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
