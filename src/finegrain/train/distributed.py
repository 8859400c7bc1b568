"""DistContext lives in runtime/distributed.py (extraction and the streaming probe use it too); kept here for the
training modules and user code that import it from train."""

from finegrain.runtime.distributed import DistContext, torchrun_context

__all__ = ["DistContext", "torchrun_context"]
