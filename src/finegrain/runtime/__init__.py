"""How models run: device, precision and layout (settings), one dataset/collate over image files, one forward."""

from finegrain.runtime.data import Batch, ImageFiles, collate_images, image_loader
from finegrain.runtime.forward import Output, forward
from finegrain.runtime.settings import PRECISIONS, Runtime, default_num_workers, native_bf16, resolve_precision

__all__ = [
    "PRECISIONS",
    "Batch",
    "ImageFiles",
    "Output",
    "Runtime",
    "collate_images",
    "default_num_workers",
    "forward",
    "image_loader",
    "native_bf16",
    "resolve_precision",
]
