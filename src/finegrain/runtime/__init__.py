"""How models run: device, precision and layout (settings), one dataset/collate over image files, one forward;
the engine (torch or ONNX Runtime) chosen by a measured check."""

from finegrain.runtime.data import Batch, ImageFiles, collate_images, image_loader
from finegrain.runtime.engine import RUNTIMES, Engine, check_runtime, choose_engine, machine_cache_dir
from finegrain.runtime.forward import Output, forward
from finegrain.runtime.settings import (
    PRECISIONS,
    Runtime,
    default_num_workers,
    native_bf16,
    resolve_device,
    resolve_precision,
)

__all__ = [
    "PRECISIONS",
    "RUNTIMES",
    "Batch",
    "Engine",
    "ImageFiles",
    "Output",
    "Runtime",
    "check_runtime",
    "choose_engine",
    "machine_cache_dir",
    "collate_images",
    "default_num_workers",
    "forward",
    "image_loader",
    "native_bf16",
    "resolve_device",
    "resolve_precision",
]
