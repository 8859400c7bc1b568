"""ONNX Runtime as an inference path: the in-process conversion, one InferenceSession wrapper, and the stand-in
modules that let `runtime.forward` run an ONNX graph exactly where it runs a torch model.

The graph takes the normalized float32 images [B, 3, S, S] (NCHW, mean/std already applied: `Preprocess.normalize`)
with a dynamic batch axis, and returns named outputs: a classifier gives `logits` [B, C], `probabilities` [B, C]
(softmax) and `features` [B, D] (the vector the head sees); a feature model gives `features` (or one
`features_<pooling>` per pooling). The exporter is torch.onnx's dynamo exporter (measured on this project's CPU:
exact parity, as the TorchScript exporter, and a 1.3x faster graph under ONNX Runtime; see BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings

import numpy as np
import torch

from finegrain.errors import FinegrainError

OPSET = 18
EXPORTER = "torch.onnx dynamo"


def onnxruntime_available() -> bool:
    """Whether onnxruntime (and onnx) import here: the `export` extra is installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class GraphOutputs(torch.nn.Module):
    """A model as its ONNX graph sees it: normalized images [B, 3, S, S] -> a tuple of named outputs.

    A classifier (`forward_all`) -> (logits, probabilities, features); a feature module returning a dict of
    poolings -> one `features_<name>` each; any other module -> its output as `features`."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        self.classifier = hasattr(model, "forward_all")
        self.poolings = list(getattr(model, "names", [])) if not self.classifier else []

    @property
    def output_names(self) -> list[str]:
        if self.classifier:
            return ["logits", "probabilities", "features"]
        return [f"features_{p}" for p in self.poolings] if self.poolings else ["features"]

    def forward(self, x: torch.Tensor):
        if self.classifier:
            feats, logits = self.model.forward_all(x)
            return logits, logits.softmax(-1), feats
        out = self.model(x)
        return tuple(out[p] for p in self.poolings) if self.poolings else out


def export_onnx(model: torch.nn.Module, *, input_size: int, opset: int = OPSET):
    """The model as an onnx.ModelProto (dynamic batch, fixed input size); a model the exporter cannot express
    -> FinegrainError with the exporter's first line."""
    wrapper = GraphOutputs(model).eval()
    x = torch.randn(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                wrapper,
                (x,),
                dynamo=True,
                dynamic_shapes=({0: batch},),
                input_names=["input"],
                output_names=wrapper.output_names,
                opset_version=opset,
                external_data=False,
                optimize=True,
                verbose=False,
            )
        except Exception as e:  # the exporter raises many kinds; the user needs its first line only
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise FinegrainError(f"cannot export {type(model).__name__} to ONNX: {first}") from None
    return program.model_proto


class OnnxEngine:
    """One ONNX Runtime session on the CPU: intra-op threads = this process's cores, all graph optimizations.

    model: a path or serialized bytes. `run(x [B, 3, S, S] float32)` -> {output name: array}."""

    def __init__(self, model: str | bytes, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or cpu_cores()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # a corrupt or foreign file: one line
            where = model if isinstance(model, str) else "the ONNX graph"
            raise FinegrainError(f"ONNX Runtime cannot load {where}: {str(e).splitlines()[0][:300]}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, x: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        if isinstance(x, torch.Tensor):
            x = x.detach().float().contiguous().cpu().numpy()
        outs = self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        return dict(zip(self.output_names, outs))

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)


class OnnxClassifier(torch.nn.Module):
    """Stands in for an ImageClassifier in `runtime.forward`: `forward_all(x)` -> (features, logits) from ONNX."""

    def __init__(self, engine: OnnxEngine) -> None:
        super().__init__()
        self.engine = engine

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.engine.run(x)
        return torch.from_numpy(out["features"]), torch.from_numpy(out["logits"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[1]


class OnnxFeatures(torch.nn.Module):
    """Stands in for a feature module (`Embedder`): `forward(x)` -> {pooling: [B, D]} or [B, D], from ONNX."""

    def __init__(self, engine: OnnxEngine, poolings: list[str]) -> None:
        super().__init__()
        self.engine, self.poolings = engine, poolings

    def forward(self, x: torch.Tensor):
        out = self.engine.run(x)
        if self.poolings:
            return {p: torch.from_numpy(out[f"features_{p}"]) for p in self.poolings}
        return torch.from_numpy(out["features"])


def onnx_module(engine: OnnxEngine, like: torch.nn.Module) -> torch.nn.Module:
    """The stand-in for `like` (the torch module the graph was exported from)."""
    if hasattr(like, "forward_all"):
        return OnnxClassifier(engine)
    return OnnxFeatures(engine, list(getattr(like, "names", [])))
