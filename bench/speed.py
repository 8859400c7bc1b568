"""Inference speed of every path on this CPU, side by side in one run, each with its cub100 test top-1.

The model: a frozen probe (efficientnet_lite0 at 224 px, GeM, L2, logistic probe) fitted on cub100's train split
(`finegrain extract --precision fp32 --pooling gem` + `finegrain probe --norm l2`, cached in bench/cache). Test
images are decoded once to uint8 tensors; every path runs the same `runtime.forward` (normalization included) on
them. Batch 1: latency p50 / p95; batch 32: images/s; rounds interleave the paths so load drift hits all alike.

    python -m bench.speed                                    # -> bench/results/speed.json["cub100-lite0-224"]
    ATEN_CPU_CAPABILITY=avx2 python -m bench.speed --short --key cub100-lite0-224-avx2
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bench.common import ROOT, record, require_dataset

CACHE = os.path.join(ROOT, "bench", "cache", "speed-cub100-224")
MODEL = os.path.join(CACHE, "eval", "probe-l2-gem", "model")


def cpu_flags() -> list[str]:
    from finegrain.runtime.settings import _cpu_flags

    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")
    return [f for f in wanted if f in (_cpu_flags() or set())]


def build_model(data: str) -> str:
    """The frozen probe at 224 px (extracted in fp32 so no path is favoured by its features)."""
    from finegrain.cli.main import main

    if not os.path.isfile(os.path.join(MODEL, "model.json")):
        argv = ["extract", data, "--out", CACHE, "--precision", "fp32", "--pooling", "gem", "--runtime", "torch"]
        assert main([*argv, "--no-progress"]) == 0
        assert main(["probe", CACHE, "--norm", "l2"]) == 0
    return MODEL


def decode_test(data: str, preprocess, limit: int | None):
    """uint8 [N, 3, 224, 224] and labels of the test split (every image, or `limit` spread evenly)."""
    from finegrain.data import load_image, load_image_set

    samples = load_image_set(data).split("test")
    if limit:
        samples = samples[:: max(1, len(samples) // limit)][:limit]
    import torch

    x = torch.stack([preprocess.pil_to_uint8(load_image(s.path, min_side=preprocess.resize_size)) for s in samples])
    return x, np.asarray([s.label for s in samples])


class Compiled:
    """torch.compile of the classifier's inference call (forward_all), for `runtime.forward`."""

    def __init__(self, model) -> None:
        import torch

        self.model = model
        self.forward_all = torch.compile(model.forward_all)


def paths(model, preprocess, *, compile_: bool, int8: str | None) -> dict:
    """{name: Engine} of every path this machine supports, and {name: why not} for the others."""
    import torch

    from finegrain.runtime import Engine, Runtime, choose_engine, native_bf16
    from finegrain.runtime.onnx import OnnxEngine, onnx_module

    out, skipped = {}, {}
    fp32 = Runtime("cpu", "fp32", channels_last=True, workers=0)
    out["eager fp32"] = Engine("torch", fp32.prepare(model), fp32, "eager fp32, channels_last")
    if native_bf16(torch.device("cpu")):
        bf16 = Runtime("cpu", "bf16", channels_last=True, workers=0)
        out["eager bf16"] = Engine("torch", fp32.prepare(model), bf16, "bf16 autocast, channels_last")
    else:
        skipped["eager bf16"] = f"bf16 not native here (ATen {torch.backends.cpu.get_cpu_capability()})"
    if compile_:
        best = out.get("eager bf16", out["eager fp32"])
        out["torch.compile"] = Engine(
            "compiled", Compiled(fp32.prepare(model)), best.runtime, f"torch.compile, {best.reason}"
        )
    out["onnx fp32"] = choose_engine(model, "onnx", preprocess=preprocess, runtime=fp32)
    if int8:
        rt = out["onnx fp32"].runtime
        out["onnx int8"] = Engine(
            "onnx-int8", onnx_module(OnnxEngine(int8), model), rt, "ONNX Runtime int8 (QOperator)"
        )
    return out, skipped


def timed(engine, images, preprocess) -> float:
    from finegrain.runtime import forward

    t0 = time.perf_counter()
    forward(engine.module, images, preprocess, engine.runtime)
    return time.perf_counter() - t0


def measure_speed(engines: dict, x, preprocess, *, rounds: int, singles: int, failed: dict) -> dict:
    """Interleaved rounds: each path runs `singles` batch-1 calls and two batch-32 calls a round."""
    lat = {k: [] for k in engines}
    thr = {k: [] for k in engines}
    warm = {}
    for k, e in list(engines.items()):  # warm-up (and torch.compile's compilation for both batch sizes)
        t0 = time.perf_counter()
        try:
            timed(e, x[:1], preprocess), timed(e, x[:32], preprocess)
        except Exception as err:  # torch.compile without a working toolchain: recorded, not fatal
            failed[k] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            del engines[k], lat[k], thr[k]
            continue
        warm[k] = time.perf_counter() - t0
    for r in range(rounds):
        for k, e in engines.items():
            for i in range(singles):
                j = (r * singles + i) % len(x)
                lat[k].append(timed(e, x[j : j + 1], preprocess) * 1000)
            for b in range(2):
                s = (r * 64 + b * 32) % max(1, len(x) - 32)
                thr[k].append(32 / timed(e, x[s : s + 32], preprocess))
    return {
        k: {
            "latency_ms_p50": float(np.percentile(lat[k], 50)),
            "latency_ms_p95": float(np.percentile(lat[k], 95)),
            "batch32_images_per_s": float(np.median(thr[k])),
            "warmup_s": round(warm[k], 2),
        }
        for k in engines
    }


def top1(engine, x, y, preprocess, batch: int = 64) -> float:
    from finegrain.runtime import forward

    pred = [forward(engine.module, x[i : i + batch], preprocess, engine.runtime).proba.argmax(1).numpy()
            for i in range(0, len(x), batch)]  # fmt: skip
    return float((np.concatenate(pred) == y).mean())


def auto_choice(model_dir: str, preprocess) -> tuple[str, str]:
    """(path name, reason) of what `--runtime auto` picks for predict / evaluate here, measured afresh."""
    from finegrain.evaluate.predictor import ONNX_CACHE, load
    from finegrain.runtime import Runtime

    cache = os.path.join(model_dir, ONNX_CACHE)
    for name in os.listdir(cache) if os.path.isdir(cache) else []:
        if "choice" in name:
            os.unlink(os.path.join(cache, name))
    predictor = load(model_dir, runtime="auto")
    engine = predictor.engine(preprocess, Runtime("cpu", "auto", channels_last=True, workers=0))
    if engine.name == "torch":
        return ("eager bf16" if engine.runtime.resolved_precision == "bf16" else "eager fp32"), engine.reason
    return {"onnx": "onnx fp32", "onnx-int8": "onnx int8"}[engine.name], engine.reason


def int8_graph(model_dir: str, data: str) -> tuple[str, dict]:
    """`finegrain export --quantize int8 --calibration DATA` (calibrated on 200 train images, checked on 200 test)."""
    from finegrain.export import export_model

    result = export_model(model_dir, quantize="int8", calibration=data, max_images=200)
    return result.int8_path, {"fp32": result.fp32.__dict__, "int8": result.int8.__dict__}


def headline(rows: dict, auto: str, supported: list[str]) -> dict:
    thr = {k: r["batch32_images_per_s"] for k, r in rows.items()}
    eager = [k for k in ("eager fp32", "eager bf16") if k in thr]
    best_eager = max(eager, key=thr.get)
    return {
        "default_path": auto,
        "best_ratio_vs_eager_fp32": round(thr[auto] / thr["eager fp32"], 2),
        "best_ratio_vs_best_eager": round(thr[auto] / thr[best_eager], 2),
        "best_eager_path": best_eager,
        "top1_delta_points": round(100 * (rows[auto]["top1"] - rows["eager fp32"]["top1"]), 2),
        "fastest_path": max(thr, key=thr.get),
        "supported_paths": supported,
        "cpu_flags": cpu_flags(),
    }


def run(args) -> dict:
    import torch

    from finegrain.models import load_model

    data = require_dataset("cub100")
    model_dir = build_model(data)
    model, spec = load_model(model_dir)
    pre = spec.preprocess
    int8, export_check = os.path.join(model_dir, "model.int8.onnx"), {}
    if not args.short:
        int8, export_check = int8_graph(model_dir, data)
    x, y = decode_test(data, pre, args.limit or (500 if args.short else None))
    compile_ = not (args.short or args.no_compile)
    engines, skipped = paths(model, pre, compile_=compile_, int8=int8 if os.path.isfile(int8) else None)
    rows = measure_speed(engines, x, pre, rounds=args.rounds or (3 if args.short else 6), singles=10, failed=skipped)
    for k, e in engines.items():
        rows[k]["top1"] = top1(e, x, y, pre)
        rows[k]["how"] = e.reason
    auto, reason = auto_choice(model_dir, pre)
    return {
        "model": "efficientnet_lite0 224 px, GeM, L2, logistic probe (frozen), cub100 train -> test",
        "test_images": len(y),
        "paths": rows,
        "not_supported": skipped,
        "auto": {"path": auto, "reason": reason},
        "export_check": export_check,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "note": "ATEN_CPU_CAPABILITY limits PyTorch's kernels only; ONNX Runtime picks its own (its paths are "
        "the same in an avx2 run)",
        "headline": headline(rows, auto, list(rows)),
    }


def _table(r: dict) -> list[str]:
    base = r["paths"]["eager fp32"]["batch32_images_per_s"]
    out = [
        "| path | batch 1 p50 (ms) | batch 1 p95 (ms) | batch 32 (images/s) | vs eager fp32 | test top-1 "
        "| first call (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in r["paths"].items():
        mark = " **(auto)**" if name == r["auto"]["path"] else ""
        out.append(
            f"| {name}{mark} | {p['latency_ms_p50']:.1f} | {p['latency_ms_p95']:.1f} | "
            f"{p['batch32_images_per_s']:.0f} | {p['batch32_images_per_s'] / base:.2f}x | {p['top1']:.4f} | "
            f"{p['warmup_s']:.1f} |"
        )
    skipped = "; ".join(f"{k}: {v}" for k, v in r.get("not_supported", {}).items())
    return out + (["", f"Not run here: {skipped}."] if skipped else [])


def speed_section(results: dict) -> list[str]:
    """BENCHMARKS.md's section (called by bench/report.py)."""
    r = results.get("cub100-lite0-224")
    if not r:
        return []
    h = results.get("headline", r["headline"])
    out = [
        "## Inference speed: every path on this CPU (efficientnet_lite0 at 224 px, cub100 frozen probe)",
        "",
        f"{r['model']}; {r['test_images']} test images decoded once, every path runs the same `runtime.forward` "
        f"(normalization included) on them, interleaved in one run. CPU flags: {', '.join(h['cpu_flags'])}; "
        f"PyTorch kernels: {r['aten_cpu_capability']}; {r['machine']['threads']} threads. First call: warm-up "
        "(torch.compile compiles there, for batch 1 and 32). Other jobs shared the two cores during these runs: "
        "the ratios within one run compare paths under the same load, the absolute speeds are low and noisy.",
        "",
        *_table(r),
        "",
        f"`--runtime auto` picks **{r['auto']['path']}** here: {r['auto']['reason']}. Headline (auto vs eager): "
        f"{h['best_ratio_vs_eager_fp32']}x eager fp32, {h['best_ratio_vs_best_eager']}x the best eager path "
        f"({h['best_eager_path']}), top-1 {h['top1_delta_points']:+.2f} points vs eager fp32; the fastest path "
        f"measured is {h['fastest_path']}.",
    ]
    chk = r.get("export_check") or {}
    if chk.get("int8"):
        out += [
            "",
            f"`finegrain export --quantize int8` (static, QOperator, calibrated on 200 train "
            f"images): top-1 agreement with PyTorch fp32 {chk['int8']['top1_agreement']:.3f} "
            f"on {chk['int8']['images']} test images (fp32 graph: {chk['fp32']['top1_agreement']:.3f}, max logit "
            f"diff {chk['fp32']['max_logit_diff']:.1e}); auto races int8 only when that agreement is at least 0.99.",
        ]
    avx2 = results.get("cub100-lite0-224-avx2")
    if avx2:
        out += [
            "",
            f"The same, short (500 test images, no torch.compile), with `ATEN_CPU_CAPABILITY=avx2` (PyTorch kernels: "
            f"{avx2['aten_cpu_capability']}; ONNX Runtime ignores the variable): auto picks "
            f"**{avx2['auto']['path']}** ({avx2['auto']['reason']}).",
            "",
            *_table(avx2),
        ]
    commands = sorted(
        {v["command"] for k, v in results.items() if isinstance(v, dict) and "command" in v and k != "headline"}
    )
    return out + ["", "Commands: " + ", ".join(f"`{c}`" for c in commands), ""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", action="store_true", help="500 test images, 3 rounds, no torch.compile, no re-export")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--key", default="cub100-lite0-224")
    ap.add_argument("--limit", type=int, default=None, help="test images (default: all; --short: 500)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--no-record", action="store_true", help="print only (a smoke run)")
    args = ap.parse_args()
    result = run(args)
    if not args.no_record:
        record("speed.json", args.key, result)
    if args.key == "cub100-lite0-224" and not args.no_record:
        record("speed.json", "headline", result["headline"])
    for k, r in result["paths"].items():
        print(f"{k:14s} p50 {r['latency_ms_p50']:6.1f} ms  p95 {r['latency_ms_p95']:6.1f} ms  "
              f"b32 {r['batch32_images_per_s']:6.1f} img/s  top-1 {r['top1']:.4f}")  # fmt: skip
    print("auto:", result["auto"], "\nheadline:", result["headline"])


if __name__ == "__main__":
    main()
