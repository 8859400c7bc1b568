"""Ship a model: ONNX export with its classes and preprocessing, checked against PyTorch; int8 quantization."""

from finegrain.export.check import FORMAT, Check
from finegrain.export.onnx_export import ExportResult, export_model

__all__ = ["FORMAT", "Check", "ExportResult", "export_model"]
