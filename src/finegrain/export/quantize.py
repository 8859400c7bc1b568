"""int8: onnxruntime.quantization's static quantization, calibrated on training images, then checked like fp32.

QOperator format (QLinearConv / QLinearMatMul kernels), uint8 activations and per-channel int8 weights: on this
project's CPU (AVX-512 VNNI) it ran 1.7x the fp32 graph where the QDQ format barely beat fp32 (BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile

import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from finegrain.atomic import atomic_write
from finegrain.errors import FinegrainError
from finegrain.export.check import Check, measure, metadata, set_metadata
from finegrain.runtime.onnx import OnnxEngine


class Calibration(CalibrationDataReader):
    """Normalized images [N, 3, S, S] fed to the calibrator in batches."""

    def __init__(self, x: torch.Tensor, batch: int = 16) -> None:
        self._batches = iter([{"input": x[i : i + batch].numpy()} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._batches, None)


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime.quantization logs advice (and whole tensor protos) on the root logger: keep the CLI's one line."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(model, spec, fp32_path: str, out: str, *, calib_uint8, x, ref, source: str, fp32: Check, key: str):
    """Quantize the fp32 graph at `fp32_path` into `out`, calibrated on `calib_uint8` (uint8 training images);
    returns (out, Check on the normalized check images `x` against the torch fp32 logits `ref`)."""
    if len(calib_uint8) == 0:
        raise FinegrainError("no calibration image could be read: pass --calibration DATA")
    reader = Calibration(spec.preprocess.normalize(calib_uint8))
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out))) as tmp:
        raw = os.path.join(tmp, "int8.onnx")
        with contextlib.redirect_stdout(io.StringIO()), _quiet_root_logger():
            quantize_static(
                fp32_path,
                raw,
                reader,
                quant_format=QuantFormat.QOperator,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
            )
        proto = onnx.load(raw)
    check = measure(model, OnnxEngine(proto.SerializeToString()), x, source, ref)
    info = {"images": check.images, "top1_agreement": check.top1_agreement, "max_logit_diff": check.max_logit_diff}
    set_metadata(proto, metadata(spec, key, fp32, {"int8": {**info, "calibration_images": len(calib_uint8)}}))
    data = proto.SerializeToString()
    atomic_write(out, lambda f: f.write(data))
    return out, check
