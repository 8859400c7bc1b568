"""The export's self-check and the metadata every exported graph carries (fp32 and int8 alike)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from finegrain.runtime.onnx import EXPORTER, OPSET, OnnxEngine

FORMAT = "finegrain-onnx/1"
INPUT = "float32 [N, 3, S, S] NCHW: RGB resized to resize_size (short side), center-cropped to S, (x/255 - mean)/std"


@dataclass
class Check:
    """The export's self-check on `images` real images (or random ones when none are known)."""

    images: int
    max_logit_diff: float
    top1_agreement: float
    source: str

    def line(self, name: str) -> str:
        agree = f"top-1 agreement {self.top1_agreement:.3f}" if self.images else "top-1 agreement not measured"
        return f"{name}: max |logit diff| vs PyTorch fp32 {self.max_logit_diff:.1e}, {agree} on {self.source}"


def torch_logits(model, x: torch.Tensor, batch: int = 32) -> np.ndarray:
    """The torch fp32 logits [N, C] of normalized images x."""
    with torch.no_grad():
        return np.concatenate([model.forward_all(x[i : i + batch])[1].float().numpy() for i in range(0, len(x), batch)])


def onnx_logits(engine: OnnxEngine, x: torch.Tensor, batch: int = 32) -> np.ndarray:
    return np.concatenate([engine.run(x[i : i + batch])["logits"] for i in range(0, len(x), batch)])


def measure(model, engine: OnnxEngine, x: torch.Tensor, source: str, ref: np.ndarray | None = None) -> Check:
    """Max |logit difference| and top-1 agreement of `engine` against the torch fp32 model on normalized `x`."""
    ref = torch_logits(model, x) if ref is None else ref
    got = onnx_logits(engine, x)
    agree = float((ref.argmax(1) == got.argmax(1)).mean()) if len(x) else float("nan")
    return Check(len(x), float(np.abs(ref - got).max()), agree, source)


def metadata(spec, key: str, check: Check, extra: dict | None = None) -> dict[str, str]:
    """metadata_props: `finegrain` (everything, JSON), `classes` and `preprocess` (JSON each)."""
    pre = spec.preprocess
    info = {
        "format": FORMAT,
        "classes": list(spec.classes),
        "preprocess": {**pre.to_dict(), "resize_size": pre.resize_size},
        "input": {"name": "input", "layout": INPUT},
        "outputs": ["logits", "probabilities", "features"],
        "opset": OPSET,
        "exporter": EXPORTER,
        "torch": torch.__version__,
        "model": {k: spec.to_dict().get(k) for k in ("backbone", "kind", "pooling", "normalizer", "head", "flip")},
        "weights_key": key,
        "fp32_check": check.__dict__,
        **(extra or {}),
    }
    return {
        "finegrain": json.dumps(info),
        "classes": json.dumps(info["classes"]),
        "preprocess": json.dumps(info["preprocess"]),  # input_size, crop_pct, mean, std, interpolation, resize_size
    }


def set_metadata(proto, props: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = "finegrain"
