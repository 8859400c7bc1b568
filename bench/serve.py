"""`finegrain serve` under load: 16 concurrent clients post real cub100 test photos for 60 s while a 17th client
mixes in bad uploads (text, truncated JPEG, empty file, decompression bombs, a 20,000 x 1 strip, a 21 MB upload);
the same load on the same model served three ways in one run: --max-batch auto (measured at start), a fixed
--max-batch 16, and one image at a time (--max-batch 1).

python -m bench.serve [--model DIR] [--seconds 60] [--rounds 3] [--clients 16]
-> bench/results/serve.json (headline: errors_on_good_images, bad_uploads_not_4xx, batching_gain_ratio)

The servers are real `finegrain serve` subprocesses (uvicorn, the model's torch threads), started together and
loaded in turn, round after round (the machine is shared: a neighbour's burst then falls on every mode alike);
the clients are one asyncio loop of httpx in this process, light enough to leave the CPU to the server. Each
request's latency is measured from send to the last byte of the answer; requests/s counts the good images answered
200 in the measured windows."""

from __future__ import annotations

import argparse
import asyncio
import glob
import io
import itertools
import os
import socket
import subprocess
import sys
import time
from collections import Counter

import numpy as np

from bench.common import RESULTS, ROOT, command_line, machine, require_dataset

DEFAULT_MODEL = os.path.join(ROOT, "bench", "cache", "fit-cub100-10", "model", "member-0")
BAD_KINDS = ("text", "truncated", "empty", "bomb", "large", "strip", "oversized")


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bad_uploads(a_jpeg: bytes) -> dict[str, tuple[str, bytes, str]]:
    """Each kind of bad upload: (file name, bytes, declared type)."""
    from PIL import Image

    return {
        "text": ("notes.txt", b"a shopping list, not a photo\n" * 20, "text/plain"),
        "truncated": ("half.jpg", a_jpeg[: len(a_jpeg) // 2], "image/jpeg"),
        "empty": ("empty.jpg", b"", "image/jpeg"),
        "bomb": ("bomb.png", _png(Image.new("1", (10_000, 10_000))), "image/png"),  # 100 Mpx in 12 kB
        "large": ("large.png", _png(Image.new("1", (8_000, 8_000))), "image/png"),  # 64 Mpx: over the service limit
        "strip": ("strip.png", _png(Image.new("RGB", (20_000, 1))), "image/png"),  # 256 x 5,120,000 once resized
        "oversized": ("big.jpg", a_jpeg + bytes(21 * 1024 * 1024), "image/jpeg"),  # 21 MB
    }


def cub_photos(data: str, n: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """n random cub100 test photos in memory: (JPEG bytes, class folder name)."""
    paths = sorted(glob.glob(os.path.join(data, "test", "*", "*.jpg")))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(paths), size=min(n, len(paths)), replace=False)
    out = []
    for i in chosen:
        with open(paths[i], "rb") as f:
            out.append((f.read(), os.path.basename(os.path.dirname(paths[i]))))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, *, max_batch: int | str, max_wait_ms: float) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "finegrain", "serve", model, "--port", str(port), "--device", "cpu"]
    cmd += ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--log-level", "warning"]
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with code {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    sys.exit("the server did not answer /health within 120 s")


async def _good_client(client, photos, stop_at: float, out: list, rng) -> None:
    """Post random photos back to back until stop_at; out gets (latency s, answered 200, top-1 is the label)."""
    while time.monotonic() < stop_at:
        data, label = photos[int(rng.integers(len(photos)))]
        start = time.perf_counter()
        try:
            r = await client.post("/predict", files={"image": ("photo.jpg", data, "image/jpeg")}, data={"k": "5"})
            ok = r.status_code == 200
            right = ok and r.json()["top"][0]["class"] == label
        except Exception:  # noqa: BLE001 - a failed request is an error on a good image, counted
            ok = right = False
        out.append((time.perf_counter() - start, ok, right))


async def _bad_client(client, bad: dict, stop_at: float, out: list, pause_s: float, kinds) -> None:
    """Post the bad kinds in turn (`kinds`: a cycle over them), one every pause_s; out gets (kind, status or the
    exception's name)."""
    while time.monotonic() < stop_at:
        kind = next(kinds)
        try:
            r = await client.post("/predict", files={"image": bad[kind]})
            out.append((kind, r.status_code))
        except Exception as e:  # noqa: BLE001 - a dropped connection is not a 4xx: counted as such
            out.append((kind, type(e).__name__))
        await asyncio.sleep(pause_s)


async def _round(url: str, photos, bad, *, clients: int, seconds: float, warmup_s: float, pause_s: float, rng, kinds):
    """One measured round against one server: (good, refused, wall seconds, /health before, /health after)."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        stop = time.monotonic() + warmup_s  # the server's batch sizes under this load get allocated once
        await asyncio.gather(*(_good_client(client, photos, stop, [], rng) for _ in range(clients)))
        before = (await client.get("/health")).json()
        good: list = []
        refused: list = []
        start = time.monotonic()
        stop = start + seconds
        tasks = [_good_client(client, photos, stop, good, rng) for _ in range(clients)]
        await asyncio.gather(*tasks, _bad_client(client, bad, stop, refused, pause_s, kinds))
        wall = time.monotonic() - start  # the last requests finish after stop
        after = (await client.get("/health")).json()
    return good, refused, wall, before, after


def _summary(good: list, refused: list, wall: float, rounds: list[tuple[dict, dict]]) -> dict:
    lat = np.array([g[0] for g in good if g[1]]) * 1000
    ok = sum(g[1] for g in good)
    batches = sum(b["batching"]["batches"] - a["batching"]["batches"] for a, b in rounds)
    images = sum(b["batching"]["images"] - a["batching"]["images"] for a, b in rounds)
    after = rounds[-1][1]
    not_4xx = [(k, s) for k, s in refused if not (isinstance(s, int) and 400 <= s < 500)]
    return {
        "seconds": round(wall, 1),
        "max_wait_ms": after["batching"]["max_wait_ms"],
        "good_requests": len(good),
        "requests_per_s": round(ok / wall, 2),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "latency_ms_p95": round(float(np.percentile(lat, 95)), 1) if len(lat) else None,
        "latency_ms_max": round(float(lat.max()), 1) if len(lat) else None,
        "errors_on_good_images": len(good) - ok,
        "served_top1": round(sum(g[2] for g in good) / max(ok, 1), 4),
        "bad_uploads": len(refused),
        "bad_uploads_by_kind": {k: dict(Counter(str(x) for kind, x in refused if kind == k)) for k in BAD_KINDS},
        "bad_uploads_not_4xx": len(not_4xx),
        "bad_not_4xx_examples": not_4xx[:5],
        "server_batches": batches,
        "server_mean_batch": round(images / batches, 2) if batches else None,
        "server_counts": after["counts"],
    }


def run_modes(model: str, photos, bad, modes: list, args) -> list[dict]:
    """Start one server per --max-batch mode, then load them in turn, round after round: a neighbour's burst of CPU
    on this shared machine then falls on every mode alike instead of on one of them."""
    import httpx

    servers = [start_server(model, max_batch=m, max_wait_ms=args.max_wait_ms) for m in modes]
    runs = [{"good": [], "refused": [], "wall": 0.0, "health": [], "kinds": itertools.cycle(BAD_KINDS)} for _ in modes]
    rng = np.random.default_rng(1)
    kw = {"clients": args.clients, "seconds": args.seconds / args.rounds, "warmup_s": args.warmup}
    try:
        for _ in range(args.rounds):
            for (_, url), run in zip(servers, runs):
                good, refused, wall, before, after = asyncio.run(
                    _round(url, photos, bad, pause_s=args.bad_every, rng=rng, kinds=run["kinds"], **kw)
                )
                run["good"] += good
                run["refused"] += refused
                run["wall"] += wall
                run["health"].append((before, after))
        infos = [httpx.get(url + "/model", timeout=30).json() for _, url in servers]
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=60)
    out = []
    for mode, run, info in zip(modes, runs, infos):
        result = _summary(run["good"], run["refused"], run["wall"], run["health"])
        result.update(server_batching=info["batching"], engines=info.get("engines"), max_batch=mode)
        print(f"--max-batch {mode}: {result}", flush=True)
        out.append(result)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a finegrain model folder (default: fit's frozen probe)")
    ap.add_argument("--seconds", type=float, default=60.0, help="measured seconds per mode, over all rounds")
    ap.add_argument("--rounds", type=int, default=3, help="the modes take turns this many times")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of load before each measured round")
    ap.add_argument("--bad-every", type=float, default=0.5, help="seconds between two bad uploads")
    ap.add_argument("--max-batch", type=int, default=16, help="the fixed batch size measured beside auto and 1")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--photos", type=int, default=512, help="distinct test photos the clients draw from")
    args = ap.parse_args()
    data = require_dataset("cub100")
    if not os.path.isdir(args.model):
        sys.exit(f"no model at {args.model}: run `python -m bench.fit` first, or give --model")
    photos = cub_photos(data, args.photos)
    bad = bad_uploads(photos[0][0])
    auto, fixed, single = run_modes(args.model, photos, bad, ["auto", args.max_batch, 1], args)
    _record(args, auto, fixed, single)


def _record(args, batched: dict, fixed: dict, single: dict) -> None:
    import json

    from finegrain.atomic import atomic_write_json

    with open(os.path.join(args.model, "model.json")) as f:
        meta = json.load(f)
    result = {
        "headline": {
            "errors_on_good_images": sum(r["errors_on_good_images"] for r in (batched, fixed, single)),
            "bad_uploads_not_4xx": sum(r["bad_uploads_not_4xx"] for r in (batched, fixed, single)),
            "batching_gain_ratio": round(batched["requests_per_s"] / single["requests_per_s"], 2),
            "fixed_batch_gain_ratio": round(fixed["requests_per_s"] / single["requests_per_s"], 2),
        },
        "model": {
            "path": os.path.relpath(args.model, ROOT),
            "backbone": meta.get("backbone"),
            "kind": meta.get("kind"),
            "classifier": meta.get("classifier"),
            "preprocess": meta.get("preprocess"),
            "flip": meta.get("flip"),
        },
        "load": {
            "clients": args.clients,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "bad_upload_every_s": args.bad_every,
            "bad_kinds": list(BAD_KINDS),
            "photos": args.photos,
        },  # fmt: skip
        "batched_auto": batched,
        "batched_fixed": fixed,
        "one_at_a_time": single,
        "command": command_line(),
        "machine": machine(),
    }
    os.makedirs(RESULTS, exist_ok=True)
    atomic_write_json(os.path.join(RESULTS, "serve.json"), result)
    print(json.dumps(result["headline"]))


if __name__ == "__main__":
    main()
