"""A deterministic crash point, so tests of "an interrupted run resumes" kill a run at a known step instead of
polling its files and racing it: FINEGRAIN_KILL_AT="<point>:<n>" makes the process SIGKILL itself the moment it
passes `point` for the n-th time, after that step's outputs are written. Points: `epoch` (training: after every
epoch-end callback, checkpoint and metrics.csv included) and `candidate` (fit: after a scored candidate is saved).
Unset, it costs one dictionary lookup."""

from __future__ import annotations

import os
import signal

ENV = "FINEGRAIN_KILL_AT"


def kill_point(point: str, count: int) -> None:
    """SIGKILL this process if FINEGRAIN_KILL_AT names this point and count."""
    if os.environ.get(ENV) == f"{point}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)
