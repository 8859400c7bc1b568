"""Fine-tuning regimes: which parameters learn, and at what learning rate.

head     only the new classifier (and a learnable pooling) learns
last:K   the last K backbone stages, the post-stage layers and the head learn; the prefix is frozen
full     everything learns; the backbone at `backbone_lr_scale` x the head's rate, optionally with layer-wise decay
scratch  everything learns from a random MSRA initialisation, one learning rate
"""

from __future__ import annotations

from dataclasses import dataclass

from finegrain.errors import FinegrainError
from finegrain.models.classifier import ImageClassifier, stage_view

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
