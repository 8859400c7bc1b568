"""`finegrain export MODEL --format onnx`: one ONNX graph of a finegrain model, with its classes and preprocessing,
checked against PyTorch before anything is written.

The graph (runtime/onnx.py): input `input`, float32 [N, 3, S, S] NCHW, the image resized, center-cropped and
normalized with the recorded mean/std (`Preprocess.normalize`), N dynamic; outputs `logits` [N, C],
`probabilities` [N, C] (softmax) and `features` [N, D]. `metadata_props` hold `finegrain` (JSON: format, classes,
preprocess, input, outputs, opset, exporter, versions, the weights key, the parity measured) and, for readers that
want one thing, `classes` and `preprocess` (JSON each).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from finegrain.atomic import atomic_write
from finegrain.errors import FinegrainError
from finegrain.export.check import Check, measure, metadata, set_metadata, torch_logits
from finegrain.export.images import CheckImages, check_images, decode
from finegrain.models import find_model_folder, load_model
from finegrain.runtime.engine import weights_key
from finegrain.runtime.onnx import OnnxEngine, export_onnx, onnxruntime_available

FP32_MAX_LOGIT_DIFF = 1e-4


@dataclass
class ExportResult:
    path: str
    fp32: Check
    int8_path: str | None = None
    int8: Check | None = None
    notes: list[str] = field(default_factory=list)


def _refuse_ensemble(path: str) -> None:
    meta = os.path.join(path, "model.json")
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            d = json.load(f)
        if d.get("kind") == "ensemble":
            members = ", ".join(os.path.join(path, m) for m in d.get("members", []))
            raise FinegrainError(f"{path} is an ensemble: it has no single graph; export each member ({members})")


def export_model(
    path: str,
    *,
    out: str | None = None,
    quantize: str | None = None,
    calibration: str | None = None,
    max_images: int = 200,
) -> ExportResult:
    """Export a finegrain model folder to ONNX (and int8 when `quantize="int8"`), checked on up to `max_images`
    real images; nothing is written unless the fp32 graph matches PyTorch within FP32_MAX_LOGIT_DIFF."""
    if not onnxruntime_available():
        raise FinegrainError("export needs onnx and onnxruntime: pip install 'finegrain[export]'")
    if quantize not in (None, "int8"):
        raise FinegrainError(f"--quantize must be int8; got {quantize!r}")
    _refuse_ensemble(path)
    model, spec = load_model(path)
    folder, _ = find_model_folder(path)
    out = out or os.path.join(folder, "model.onnx")
    images = check_images(folder, calibration, limit=max_images)
    if quantize and images is None:
        raise FinegrainError("--quantize int8 needs calibration images: pass --calibration DATA (its train split)")
    proto, engine = _convert(model, spec)
    x, source = _check_inputs(images, spec.preprocess)
    ref = torch_logits(model, x)
    fp32 = measure(model, engine, x, source, ref)
    if not fp32.max_logit_diff <= FP32_MAX_LOGIT_DIFF:
        raise FinegrainError(f"{fp32.line('fp32')}: over the {FP32_MAX_LOGIT_DIFF:.0e} limit, nothing written")
    key = weights_key(model, spec.preprocess.input_size)
    set_metadata(proto, metadata(spec, key, fp32))
    data = proto.SerializeToString()
    atomic_write(out, lambda f: f.write(data))
    result = ExportResult(out, fp32)
    if quantize:
        from finegrain.export.quantize import quantize_int8

        int8_out = os.path.splitext(out)[0] + ".int8.onnx"
        calib = decode(images.calibrate, spec.preprocess)
        result.int8_path, result.int8 = quantize_int8(
            model, spec, out, int8_out, calib_uint8=calib, x=x, ref=ref, source=source, fp32=fp32, key=key
        )
    return result


def _convert(model, spec):
    """(onnx proto, ONNX Runtime engine on it); a model that does not export or has no dynamic batch -> one line."""
    from finegrain.runtime.engine import parity
    from finegrain.runtime.onnx import onnx_module

    what = "a k-NN model (gallery vote: top-k + scatter)" if spec.head == "knn" else "this model"
    try:
        proto = export_onnx(model, input_size=spec.preprocess.input_size)
        engine = OnnxEngine(proto.SerializeToString())
        parity(model, onnx_module(engine, model), spec.preprocess, sizes=(1, 5))
    except FinegrainError as e:
        raise FinegrainError(f"cannot export {what} to ONNX with a dynamic batch axis: {e}") from None
    return proto, engine


def _check_inputs(images: CheckImages | None, preprocess) -> tuple[torch.Tensor, str]:
    """Normalized real images to check on, or 8 seeded random ones (said in the source) when none are known."""
    if images is not None:
        x = decode(images.check, preprocess)
        if len(x):
            return preprocess.normalize(x), f"{len(x)} images of {images.source}"
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, preprocess.input_size, preprocess.input_size), generator=g, dtype=torch.uint8)
    return preprocess.normalize(x), "8 random images (no data known: pass --calibration DATA)"
