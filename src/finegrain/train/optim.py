"""Optimizer parameter groups (no decay on norms / biases / 1-D params, an LR scale per parameter) and optimizers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from finegrain.registry import ParameterError, Registry

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")


def _no_decay_names(model: nn.Module) -> set[str]:
    """Names a module opts out of weight decay with, timm-style `no_weight_decay()` (pos_embed, cls_token, ...)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names.update(f"{prefix}.{n}" if prefix else n for n in fn())
    return names


def build_param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    lr_scale: Callable[[str], float] | None = None,
) -> list[dict]:
    """Trainable parameters of `model` grouped by (lr_scale(name), decays?).

    Params with ndim <= 1 (norm weights, biases, GeM's p), names ending in `.bias` and names a module lists in
    `no_weight_decay()` get weight_decay 0. Each group has `lr` = `initial_lr` = lr * scale, `lr_scale` and
    `param_names`; frozen params (requires_grad False) are left out.
    The decay rule is timm's `param_groups_weight_decay` (ndim <= 1, `.bias`, `no_weight_decay()`); the groups are
    ours because a `last:K` regime also scales each stage's learning rate (`lr_scale`), which timm's helpers express
    only as a geometric layer decay over its own group matcher (`param_groups_layer_decay`).
    """
    if lr <= 0 or weight_decay < 0:
        raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
    skip = _no_decay_names(model)
    groups: dict[tuple[float, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = 1.0 if lr_scale is None else float(lr_scale(name))
        if scale < 0:
            raise ValueError(f"lr_scale({name!r}) must be >= 0, got {scale}")
        decay = not (param.ndim <= 1 or name.endswith(".bias") or name in skip)
        group = groups.get((scale, decay))
        if group is None:
            group = groups[(scale, decay)] = {
                "params": [],
                "param_names": [],
                "lr": lr * scale,
                "initial_lr": lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if decay else 0.0,
            }
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


@OPTIMIZERS.register("sgd")
def _sgd(groups: list[dict], *, lr: float, momentum: float = 0.9, nesterov: bool = True) -> torch.optim.SGD:
    momentum = float(momentum)
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=bool(nesterov) and momentum > 0)


@OPTIMIZERS.register("adamw")
def _adamw(groups: list[dict], *, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    betas = (float(betas[0]), float(betas[1]))
    if not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be in [0, 1), got {betas}")
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def build_optimizer(name: str, groups: list[dict], *, lr: float, **options: Any) -> torch.optim.Optimizer:
    """Optimizer `name` (see OPTIMIZERS: `sgd` takes momentum, nesterov; `adamw` takes betas) over `groups`.

    Each optimizer gets only the options it takes, so one set of options (a config) serves them all; options set
    to None keep the optimizer's defaults, and an option no optimizer takes is an error. A group's own lr and
    weight_decay win over `lr`.
    """
    taken = set(OPTIMIZERS.params(name) or ())
    options = {k: v for k, v in options.items() if v is not None}
    known = {p for other in OPTIMIZERS for p in OPTIMIZERS.params(other) or ()} - {"groups", "lr"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ParameterError(f"no optimizer takes {', '.join(unknown)}; options: {', '.join(sorted(known))}")
    return OPTIMIZERS.create(name, groups, lr=lr, **{k: v for k, v in options.items() if k in taken})
