"""`--runtime auto|torch|onnx`: which engine runs a model, decided by a measured check, never assumed.

`torch`: the eager model at the Runtime's precision (bf16 autocast only where native, see settings.py). `onnx`: the
model converted in process to ONNX and run by ONNX Runtime in fp32, after a parity check against torch fp32 on a
seeded random batch. `auto`: the fastest of the engines whose accuracy holds, timed here on one small batch:
torch, ONNX Runtime fp32 when the model converts with parity, and an int8 graph beside the model when `finegrain
export --quantize int8` verified its top-1 agreement on real images. Without onnxruntime, `auto` is torch (a
note, not an error). The conversion and the choice are cached in `cache_dir` (beside the model) when it is
writable, keyed by the weights and by this machine, so the check runs once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from finegrain.errors import FinegrainError
from finegrain.runtime.forward import forward
from finegrain.runtime.onnx import EXPORTER, OPSET, OnnxEngine, export_onnx, onnx_module, onnxruntime_available
from finegrain.runtime.settings import Runtime

RUNTIMES = ("auto", "torch", "onnx")
PARITY_TOL = 1e-4  # max |onnx - torch fp32| on the random batch, relative to max(1, max |torch|)
INT8_MIN_AGREEMENT = 0.99  # an int8 graph takes part in `auto` only when its recorded top-1 agreement reaches this
INT8_MIN_IMAGES = 50
AUTO_MIN_IMAGES = 256  # fewer images than this and no cache folder: the conversion would not pay for itself


@dataclass
class Engine:
    """name: torch | onnx | onnx-int8; module: what `runtime.forward` runs; runtime: its settings; reason: why."""

    name: str
    module: torch.nn.Module
    runtime: Runtime
    reason: str
    key: str = ""  # the weights key of a converted model


def check_runtime(name: str) -> str:
    if name not in RUNTIMES:
        raise FinegrainError(f"runtime must be one of {', '.join(RUNTIMES)}; got {name!r}")
    return name


def weights_key(model: torch.nn.Module, input_size: int) -> str:
    """A fingerprint of the weights, the input size and the exporter: what a cached conversion depends on."""
    shape = f"{model}|{getattr(model, 'flip', None)}|{getattr(model, 'names', None)}"
    h = hashlib.sha1(f"{shape}|{input_size}|{OPSET}|{EXPORTER}|{torch.__version__}".encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def machine_key(runtime: Runtime) -> str:
    import onnxruntime

    parts = [torch.backends.cpu.get_cpu_capability(), os.environ.get("ATEN_CPU_CAPABILITY", ""), str(os.cpu_count())]
    parts += [runtime.resolved_precision, onnxruntime.__version__, torch.__version__]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def _unavailable(runtime: Runtime) -> str | None:
    if runtime.torch_device.type != "cpu":
        return f"the ONNX Runtime path runs on the CPU; {runtime.device} runs torch"
    if not onnxruntime_available():
        return "onnxruntime is not installed (pip install 'finegrain[export]'): torch runs the model"
    return None


def _random_images(input_size: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, input_size, input_size), generator=g, dtype=torch.uint8)


def _outputs(module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        if hasattr(module, "forward_all"):
            feats, logits = module.forward_all(x)
            return [logits.float(), feats.float()]
        out = module(x)
        return [v.float() for v in out.values()] if isinstance(out, dict) else [out.float()]


def parity(model: torch.nn.Module, onnx_like: torch.nn.Module, preprocess, *, sizes=(1, 5)) -> float:
    """max |onnx - torch fp32| over every output on seeded random batches of each size (the batch axis must be
    dynamic), relative to max(1, max |torch|). A graph that does not run -> FinegrainError."""
    worst = 0.0
    for n in sizes:
        x = preprocess.normalize(_random_images(preprocess.input_size, n))
        ref = _outputs(model.eval(), x)
        try:
            got = _outputs(onnx_like, x)
        except Exception as e:  # onnxruntime's own exceptions: a graph with a fixed batch, an unsupported op
            raise FinegrainError(f"the ONNX graph fails on a batch of {n}: {str(e).splitlines()[0][:200]}") from None
        worst = max(worst, *(float((a - b).abs().max()) / max(1.0, float(a.abs().max())) for a, b in zip(ref, got)))
    return worst


def _cache_paths(cache_dir: str | None, key: str) -> tuple[str | None, str | None]:
    if not cache_dir:
        return None, None
    return os.path.join(cache_dir, f"{key}.onnx"), os.path.join(cache_dir, f"{key}.json")


def _read_json(path: str | None) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, TypeError):
        return {}


def _write_cache(path: str | None, write) -> None:
    """Best effort: a model folder that is not writable keeps the conversion in memory only."""
    if path is None:
        return
    from finegrain.atomic import atomic_write

    try:
        atomic_write(path, write)
    except OSError:
        pass


def converted(model: torch.nn.Module, preprocess, *, cache_dir: str | None = None) -> tuple[OnnxEngine, float, str]:
    """(ONNX Runtime fp32 engine of `model`, its parity vs torch, weights key), from the cache when there."""
    key = weights_key(model, preprocess.input_size)
    onnx_path, json_path = _cache_paths(cache_dir, key)
    record = _read_json(json_path)
    if onnx_path and os.path.isfile(onnx_path) and "parity" in record:
        return OnnxEngine(onnx_path), float(record["parity"]), key
    data = export_onnx(model.eval(), input_size=preprocess.input_size).SerializeToString()
    engine = OnnxEngine(data)
    diff = parity(model, onnx_module(engine, model), preprocess)
    _write_cache(onnx_path, lambda f: f.write(data))
    _write_cache(json_path, lambda f: f.write(json.dumps({"parity": diff, "exporter": EXPORTER}).encode()))
    return engine, diff, key


def verified_int8(path: str | None, key: str) -> str | None:
    """The int8 graph at `path` when `finegrain export` verified it on these weights; None otherwise."""
    if not path or not os.path.isfile(path) or not onnxruntime_available():
        return None
    import onnx

    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    info = json.loads(meta.get("finegrain", "{}"))
    check = info.get("int8") or {}
    ok = info.get("weights_key") == key and check.get("top1_agreement", 0) >= INT8_MIN_AGREEMENT
    return path if ok and check.get("images", 0) >= INT8_MIN_IMAGES else None


def _seconds(engine: Engine, images: torch.Tensor, preprocess) -> float:
    t0 = time.perf_counter()
    forward(engine.module, images, preprocess, engine.runtime)
    return time.perf_counter() - t0


def race(engines: list[Engine], preprocess, *, batch: int = 8, reps: int = 3) -> list[float]:
    """Seconds a batch of `batch` images takes on each engine: best of `reps`, interleaved, after a warm-up."""
    images = _random_images(preprocess.input_size, batch)
    for e in engines:
        _seconds(e, images, preprocess)
    best = [float("inf")] * len(engines)
    for _ in range(reps):
        for i, e in enumerate(engines):
            best[i] = min(best[i], _seconds(e, images, preprocess))
    return best


def choose_engine(
    model: torch.nn.Module,
    requested: str,
    *,
    preprocess,
    runtime: Runtime,
    cache_dir: str | None = None,
    int8_path: str | None = None,
    n_images: int | None = None,
) -> Engine:
    """The engine that runs `model` (an ImageClassifier or a feature module) for `requested` (auto | torch | onnx).

    `onnx` that cannot be honoured (no onnxruntime, a GPU device, a model that does not convert with parity) is a
    FinegrainError; `auto` then falls back to torch and says why in the engine's reason."""
    check_runtime(requested)
    torch_engine = Engine("torch", runtime.prepare(model), runtime, f"torch ({runtime.resolved_precision})")
    if requested == "torch":
        return torch_engine
    problem = _unavailable(runtime)
    if problem is None and requested == "auto" and not cache_dir and n_images is not None:
        if n_images < AUTO_MIN_IMAGES:  # nowhere to keep the conversion for a later call
            problem = f"{n_images} images do not repay an ONNX conversion: torch runs them"
    if problem is None and requested == "auto":
        problem = _not_worth_converting(model, preprocess, runtime, n_images, cache_dir)
    if problem is None:
        try:
            t0 = time.perf_counter()
            onnx_engine = _onnx_engine(model, preprocess, runtime, cache_dir)
            convert_s = time.perf_counter() - t0
        except FinegrainError as e:
            problem = str(e)
    if problem is not None:
        if requested == "onnx":
            raise FinegrainError(f"--runtime onnx: {problem}")
        torch_engine.reason += f"; {problem}"
        return torch_engine
    if requested == "onnx":
        return onnx_engine
    return _auto(model, [torch_engine, onnx_engine], preprocess, runtime, cache_dir, int8_path, convert_s)


def _onnx_engine(model, preprocess, runtime: Runtime, cache_dir: str | None) -> Engine:
    engine, diff, key = converted(model, preprocess, cache_dir=cache_dir)
    if not diff <= PARITY_TOL:
        raise FinegrainError(f"ONNX Runtime differs from torch by {diff:.1e} (over {PARITY_TOL:.0e})")
    rt = Runtime(runtime.device, "fp32", channels_last=False, workers=runtime.workers)
    return Engine("onnx", onnx_module(engine, model), rt, f"ONNX Runtime fp32 (max diff vs torch {diff:.1e})", key)


def machine_cache_dir() -> str:
    """Where this machine's engine races are recorded: $FINEGRAIN_CACHE/engines, else ~/.cache/finegrain/engines."""
    root = os.environ.get("FINEGRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "finegrain")
    return os.path.join(root, "engines")


def _race_path(model: torch.nn.Module, preprocess, runtime: Runtime) -> str:
    """The machine's record of the race for this architecture and view (not its weights: speed does not depend on
    their values), this machine's capabilities and precision."""
    shape = f"{model}|{getattr(model, 'flip', None)}|{getattr(model, 'names', None)}|{preprocess.input_size}"
    key = hashlib.sha1(f"{shape}|{OPSET}|{EXPORTER}".encode()).hexdigest()[:16]
    return os.path.join(machine_cache_dir(), f"race-{key}-{machine_key(runtime)}.json")


def recorded_conversion_seconds(model: torch.nn.Module, preprocess, runtime: Runtime) -> float:
    """Seconds this machine's last ONNX conversion of this architecture and view took (0.0 if it never converted
    one): what converting a new model of the same shape costs, even when a cached conversion made this one quick."""
    if not onnxruntime_available():
        return 0.0
    return float(_read_json(_race_path(model, preprocess, runtime)).get("convert_s", 0.0))


def _not_worth_converting(model, preprocess, runtime: Runtime, n_images: int | None, cache_dir) -> str | None:
    """Why `auto` should not convert (None: convert and race): this machine already raced this architecture and
    view, and torch won, or ONNX Runtime's measured saving on `n_images` images is under the measured cost of a
    conversion that is not cached yet."""
    record = _read_json(_race_path(model, preprocess, runtime))
    if not record:
        return None
    if record.get("choice") == "torch":
        return f"auto -> torch (this machine's race for this view: {record.get('timing')})"
    onnx_path, _ = _cache_paths(cache_dir, weights_key(model, preprocess.input_size)) if cache_dir else (None, None)
    if n_images is None or (onnx_path and os.path.isfile(onnx_path)):
        return None
    saving = n_images * max(record.get("torch_spi", 0.0) - record.get("onnx_spi", 0.0), 0.0)
    if saving < record.get("convert_s", 0.0):
        return (f"auto -> torch: ONNX Runtime would save ~{saving:.0f} s on {n_images} images, under the "
                f"~{record['convert_s']:.0f} s its conversion takes here")  # fmt: skip
    return None


def _auto(model, engines: list[Engine], preprocess, runtime: Runtime, cache_dir, int8_path, convert_s=0.0) -> Engine:
    """The fastest engine, timed once per machine (the choice is cached beside the conversion, and the race in the
    machine's cache for `_not_worth_converting`)."""
    key = engines[1].key
    int8 = verified_int8(int8_path, key)
    if int8:
        rt = engines[1].runtime
        engines.append(Engine("onnx-int8", onnx_module(OnnxEngine(int8), model), rt, "ONNX Runtime int8 (verified)"))
    _, json_path = _cache_paths(cache_dir, f"{key}-choice-{machine_key(runtime)}{'-int8' if int8 else ''}")
    record = _read_json(json_path)
    names = [e.name for e in engines]
    if record.get("choice") in names:
        chosen = engines[names.index(record["choice"])]
        chosen.reason = f"auto -> {chosen.name} (measured: {record['timing']}); {chosen.reason}"
        return chosen
    seconds = race(engines, preprocess)
    timing = ", ".join(f"{e.name} {8 / s:.0f} img/s" for e, s in zip(engines, seconds))
    chosen = engines[int(np.argmin(seconds))]
    _write_cache(json_path, lambda f: f.write(json.dumps({"choice": chosen.name, "timing": timing}).encode()))
    race_path = _race_path(model, preprocess, runtime)
    record = {"choice": chosen.name, "timing": timing, "torch_spi": seconds[0] / 8, "onnx_spi": seconds[1] / 8}
    record["convert_s"] = max(convert_s, _read_json(race_path).get("convert_s", 0.0))  # a cached conversion is quick
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(race_path), exist_ok=True)
    _write_cache(race_path, lambda f: f.write(json.dumps(record).encode()))
    chosen.reason = f"auto -> {chosen.name} (measured: {timing}); {chosen.reason}"
    return chosen
