"""What `finegrain train` accepts beyond the config's types: the names each choice takes (from the registries) and
the data it needs."""

from __future__ import annotations

from finegrain.errors import FinegrainError


def train_choices() -> dict[str, tuple[str, ...]]:
    """The names each TrainConfig choice accepts, from the registries (`name:K`: a name that takes an argument)."""
    from finegrain.losses import LOSSES
    from finegrain.models.pooling import POOLINGS
    from finegrain.train.augment import AUGMENTATIONS
    from finegrain.train.optim import OPTIMIZERS
    from finegrain.train.regimes import REGIME_KINDS
    from finegrain.train.samplers import SAMPLERS
    from finegrain.train.schedule import SCHEDULE_KINDS

    return {
        "regime": ("auto", *("last:K" if k == "last" else k for k in REGIME_KINDS)),
        "loss": tuple(LOSSES.names()),
        "sampler": tuple(SAMPLERS.names()),
        "pooling": (*(n for n in POOLINGS.names() if not getattr(POOLINGS.get(n), "frozen_only", False)), "gem:P"),
        "optimizer": tuple(OPTIMIZERS.names()),
        "augment": tuple(AUGMENTATIONS.names()),
        "schedule": tuple(SCHEDULE_KINDS),
        "precision": ("fp32", "bf16", "amp"),
        "head_init": ("msra", "probe"),
    }


def check_two_classes(data: str) -> None:
    from finegrain.data import load_image_set

    image_set = load_image_set(data)
    if len(image_set.classes) < 2:
        raise FinegrainError(
            f"{data} holds one class ({', '.join(image_set.classes) or 'none'}): training needs at least 2 classes, "
            "one folder per class"
        )
