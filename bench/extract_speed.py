"""Extraction throughput, side by side in one run (issue: representations, measurement 2).

  A. bare model: forward + GAP on already-decoded, already-normalized tensors (no I/O at all)
  B. finegrain extract: JPEG files on disk -> feature store (hashing, DataLoader decode workers, store writes)
  C. hand-written loop: PIL decode + timm eval transform in the main thread, then forward

Same model, precision, channels_last and batch size for all three; rounds are interleaved (A B C A B C ...) and
each method keeps its best round, so slow drift of the machine hits all of them alike.

    python bench/extract_speed.py --images 640 --rounds 3
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import torch

from bench.common import record, require_dataset
from finegrain.backbones import create_backbone
from finegrain.data import ImageSet, load_image, load_image_set
from finegrain.embed import extract_to_store
from finegrain.models.pooling import create_pooling
from finegrain.runtime import resolve_precision


def bare_forward(backbone, x_uint8: torch.Tensor, batch_size: int, precision: str) -> float:
    pool = create_pooling("gap")
    xs = [
        backbone.preprocess.normalize(x_uint8[i : i + batch_size]).contiguous(memory_format=torch.channels_last)
        for i in range(0, len(x_uint8), batch_size)
    ]
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for x in xs:
            pool(backbone.forward_features(x)).numpy()
    return len(x_uint8) / (time.perf_counter() - t0)


def hand_loop(backbone, paths: list[str], batch_size: int, precision: str) -> float:
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    tf = create_transform(**resolve_data_config({}, model=backbone.model))
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for i in range(0, len(paths), batch_size):
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[i : i + batch_size]])
            backbone.forward_features(x.contiguous(memory_format=torch.channels_last)).float().mean((2, 3)).numpy()
    return len(paths) / (time.perf_counter() - t0)


def finegrain_extract(backbone, image_set: ImageSet, batch_size: int, precision: str, workers: int | None) -> float:
    out = tempfile.mkdtemp(prefix="fg-bench-")
    try:
        r = extract_to_store(
            image_set,
            backbone,
            out,
            poolings=("gap",),
            batch_size=batch_size,
            precision=precision,
            num_workers=workers,
            progress=False,
        )
        return r.n_extracted / r.seconds
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=640)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()

    full = load_image_set(require_dataset("cub100"))
    samples = full.split("train")[: args.images]
    subset = ImageSet(full.root, full.classes, samples)
    paths = [s.path for s in samples]
    backbone = create_backbone("efficientnet_lite0").to(memory_format=torch.channels_last)
    precision = resolve_precision(args.precision, torch.device("cpu"))
    decoded = torch.stack([backbone.preprocess.pil_to_uint8(load_image(p)) for p in paths])
    bare_forward(backbone, decoded[: 2 * args.batch_size], args.batch_size, precision)  # warm-up

    best = {"bare": 0.0, "finegrain": 0.0, "hand": 0.0}
    rounds = []
    for r in range(args.rounds):
        row = {
            "bare": bare_forward(backbone, decoded, args.batch_size, precision),
            "finegrain": finegrain_extract(backbone, subset, args.batch_size, precision, args.workers),
            "hand": hand_loop(backbone, paths, args.batch_size, precision),
        }
        rounds.append(row)
        best = {k: max(best[k], v) for k, v in row.items()}
        print(f"round {r}: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in row.items()), flush=True)
    result = {
        "images": len(paths),
        "batch_size": args.batch_size,
        "precision": precision,
        "channels_last": True,
        "images_per_second": {k: round(v, 1) for k, v in best.items()},
        "ratio_finegrain_vs_bare": round(best["finegrain"] / best["bare"], 3),
        "ratio_finegrain_vs_hand": round(best["finegrain"] / best["hand"], 3),
        "ratio_hand_vs_bare": round(best["hand"] / best["bare"], 3),
        "rounds": rounds,
    }
    print({k: v for k, v in result.items() if k != "rounds"})
    record("representations.json", "extraction_throughput", result)


if __name__ == "__main__":
    main()
