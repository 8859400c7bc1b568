"""Checkpoints written atomically (temporary file, fsync, rename) and read back as weights only."""

from __future__ import annotations

import os
from typing import Any

import torch

from finegrain.atomic import atomic_write
from finegrain.errors import FinegrainError


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """torch.save, atomically: a kill at any moment leaves the previous checkpoint intact."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a checkpoint without executing code; a missing or damaged file is a clear error, never a restart."""
    if not os.path.isfile(path):
        raise FinegrainError(f"no checkpoint at {path}: nothing to resume (run without --resume to start)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types; all mean the same to the user
        raise FinegrainError(
            f"checkpoint {path} is damaged ({type(e).__name__}); delete it to restart from the previous one, "
            "or start a new run"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise FinegrainError(f"checkpoint {path} is not a finegrain training checkpoint")
    return state
