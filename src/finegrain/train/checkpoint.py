"""Checkpoints written atomically (temporary file, fsync, rename) and read back as weights only."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from finegrain.errors import FinegrainError


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a kill leaves the old file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
