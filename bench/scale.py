"""Scale-out benchmark (issue 15): a 1M x 1280 synthetic store, the streaming probe, IVF-PQ, the measured auto
backend, sharded extraction 1 vs 2 processes, and a projection for iNat 2021.

python -m bench.scale [--parts data,probe,ivfpq,auto,extract] [--n 1000000]   (each part merges into scale.json;
probe_subset reruns only the probe's 100k streaming vs L-BFGS comparison)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

from bench.common import RESULTS, ROOT

CACHE = os.path.join(ROOT, "bench", "cache", "scale")
OUT = os.path.join(RESULTS, "scale.json")
D, CLASSES, LATENT, N_TEST = 1280, 1000, 64, 20_000
NOISE = 2.0  # within-class spread in the latent space: the classes overlap, as real species do


def _paths(n: int) -> dict[str, str]:
    return {k: os.path.join(CACHE, f"synthetic-{n}-{k}") for k in ("X.f32", "y.npy", "Xtest.f32", "ytest.npy")}


def make_store(n: int, seed: int = 0) -> dict[str, str]:
    """[n, 1280] float32 memmap in 1,000 classes of low intrinsic dimension (64), as CNN embeddings are;
    generated in blocks (bounded memory), plus a 20,000-row test set from the same distribution."""
    paths = _paths(n)
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(CACHE, exist_ok=True)
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(LATENT, D)).astype(np.float32) / np.sqrt(LATENT)
    centers = rng.normal(size=(CLASSES, LATENT)).astype(np.float32)
    for name, rows in (("X.f32", n), ("Xtest.f32", N_TEST)):
        y = rng.integers(0, CLASSES, rows)
        out = np.memmap(paths[name] + ".tmp", dtype=np.float32, mode="w+", shape=(rows, D))
        for s in range(0, rows, 50_000):
            yb = y[s : s + 50_000]
            z = centers[yb] + NOISE * rng.normal(size=(len(yb), LATENT)).astype(np.float32)
            out[s : s + len(yb)] = np.maximum(z @ basis + 0.05 * rng.normal(size=(len(yb), D)), 0)  # ReLU-like
        out.flush()
        del out
        os.replace(paths[name] + ".tmp", paths[name])
        np.save(paths[name.replace("X", "y").replace(".f32", ".npy")], y)
    return paths


def _open(paths: dict[str, str], n: int):
    X = np.memmap(paths["X.f32"], dtype=np.float32, mode="r", shape=(n, D))
    Xt = np.memmap(paths["Xtest.f32"], dtype=np.float32, mode="r", shape=(N_TEST, D))
    return X, np.load(paths["y.npy"]), Xt, np.load(paths["ytest.npy"])


def probe_child(n: int, rows: int, solver: str) -> dict:
    """Run in a fresh process: one probe fit on the first `rows` rows; its own peak RSS and time."""
    from finegrain.heads.probe import LogisticProbe
    from finegrain.heads.stream_probe import StreamingProbe

    X, y, Xt, yt = _open(_paths(n), n)
    t0 = time.perf_counter()
    if solver == "stream":  # the recipe for 1M rows: 3 Cs chosen on 100k, 2 passes of batch 1,024
        clf = StreamingProbe(Cs=(0.1, 1.0, 10.0), batch_size=1024, epochs=2, select_rows=100_000, normalize="l2")
        clf.fit(X[:rows] if rows < n else X, y[:rows])
    elif solver == "stream-default":  # the estimator's defaults (about 3,000 steps of 256) at the L-BFGS run's C
        clf = StreamingProbe(Cs=(1.0,), normalize="l2").fit(X[:rows], y[:rows])
    else:
        Xm = np.array(X[:rows])
        Xm /= np.linalg.norm(Xm, axis=1, keepdims=True)
        clf = LogisticProbe(Cs=(1.0,), max_iter=100).fit(Xm, y[:rows])
    seconds = time.perf_counter() - t0
    Xtn = np.asarray(Xt) / np.linalg.norm(Xt, axis=1, keepdims=True)
    top1 = float((clf.predict(Xtn) == yt).mean())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    held = getattr(clf, "max_rows_held_", None)
    return {"rows": rows, "solver": solver, "seconds": round(seconds, 1), "peak_rss_gb": round(rss, 2),
            "top1": round(top1, 4), "C": getattr(clf, "C_", None), "max_rows_held": held}  # fmt: skip


def _child(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src") + os.pathsep + ROOT}
    out = subprocess.run([sys.executable, "-m", "bench.scale", *args], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def part_cub100(_n: int) -> dict:
    """The streaming probe against the L-BFGS probe on the real cub100 store (GeM, L2), the README's figure."""
    from finegrain.embed import FeatureStore, create_normalizer
    from finegrain.heads.probe import LogisticProbe
    from finegrain.heads.stream_probe import StreamingProbe

    store = FeatureStore.open(os.path.join(ROOT, "bench", "cache", "cub100-lite0-finegrain"))
    (Xtr, ytr, _), (Xte, yte, _) = store.split("train", "gem"), store.split("test", "gem")
    norm = create_normalizer("l2").fit(Xtr)
    Xtr, Xte = norm.transform(Xtr), norm.transform(Xte)
    out = {}
    for name, clf in (("lbfgs", LogisticProbe()), ("stream", StreamingProbe())):
        t0 = time.perf_counter()
        clf.fit(Xtr, ytr)
        out[name] = {"top1": round(float((clf.predict(Xte) == yte).mean()), 4), "C": clf.C_,
                     "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    out["delta_points"] = round(100 * (out["stream"]["top1"] - out["lbfgs"]["top1"]), 2)
    return out


PROBE_SUBSET_ROWS = 100_000  # full-batch L-BFGS against streaming on these first rows (issue 15: "a 100k subset")


def part_probe(n: int) -> dict:
    stream = _child(["--child-probe", str(n), str(n), "stream"])
    return {"stream_full_store": stream, **part_probe_subset(n)}


def part_probe_subset(n: int) -> dict:
    """The streaming probe (its defaults) against full-batch L-BFGS on the same first 100,000 rows, C = 1."""
    sub = min(n, PROBE_SUBSET_ROWS)
    sub_stream = _child(["--child-probe", str(n), str(sub), "stream-default"])
    sub_full = _child(["--child-probe", str(n), str(sub), "lbfgs"])
    return {"subset_stream": sub_stream, "subset_lbfgs": sub_full,
            "top1_delta_points": round(100 * (sub_stream["top1"] - sub_full["top1"]), 2)}  # fmt: skip


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / len(e) for f, e in zip(found, exact)]))


def _exact_topk(X: np.ndarray, Q: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact cosine top-k of Q over the memmap X, streamed in 50,000-row blocks."""
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    best_s, best_i = np.full((len(Q), k), -np.inf, np.float32), np.zeros((len(Q), k), np.int64)
    for s in range(0, len(X), 50_000):
        B = np.asarray(X[s : s + 50_000])
        sims = Qn @ (B / np.linalg.norm(B, axis=1, keepdims=True)).T
        alls, alli = np.hstack([best_s, sims]), np.hstack([best_i, np.arange(s, s + len(B))[None].repeat(len(Q), 0)])
        top = np.argsort(-alls, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(alls, top, 1), np.take_along_axis(alli, top, 1)
    return best_i


IVFPQ_PROBE_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 3, 1 / 2)  # nprobe swept as a share of nlist
IVFPQ_RERANKS = (5, 10)  # candidates re-ranked exactly from the memory map, x k


def part_ivfpq(n: int) -> dict:
    """IVF-PQ with the parameters FaissIndex chooses for this gallery (PCA, 4-bit fast-scan PQ, re-rank from the
    memory map) on the whole store: exact search timed in the same run, one build, then recall@10 against exact by
    nprobe and re-rank depth, for 1,000 held-out queries."""
    from finegrain.heads.index import FaissIndex

    X, _, Xt, _ = _open(_paths(n), n)
    Q = np.asarray(Xt[:1000])
    t0 = time.perf_counter()
    exact = _exact_topk(X, Q)
    exact_s = time.perf_counter() - t0
    np.save(os.path.join(CACHE, f"exact-top10-{n}.npy"), exact)
    t0 = time.perf_counter()
    index = FaissIndex("cosine", kind="ivfpq").add(X)
    build = time.perf_counter() - t0
    default = (index._nprobe(index.nlist_), index.rerank)
    sweep = {(max(1, round(index.nlist_ * f)), r) for f in IVFPQ_PROBE_FRACTIONS for r in IVFPQ_RERANKS}
    index.search(Q[:20], 10)  # warm-up: first-call costs are not the index's speed
    runs = []
    for nprobe, rerank in sorted(sweep | {default}):
        index.nprobe, index.rerank = nprobe, rerank
        t0 = time.perf_counter()
        _, found = index.search(Q, 10)
        seconds = round(time.perf_counter() - t0, 2)
        recall = round(_recall(found, exact), 4)
        runs.append({"nprobe": nprobe, "rerank": rerank, "query_seconds_1000": seconds, "recall_at_10": recall,
                     "default": (nprobe, rerank) == default})  # fmt: skip
    built = {"pca": index.pca_, "nlist": index.nlist_, "m": index.m_, "code_bytes": index.code_bytes,
             "ram_bytes_per_vector": round(index.bytes_per_vector, 2), "build_seconds": round(build, 1)}  # fmt: skip
    return {"exact_numpy_streamed_seconds": round(exact_s, 1), "index": built, "runs": runs}


def part_hnsw(n: int) -> dict:
    """HNSW against exact numpy and IVF-PQ on a 100,000-vector gallery (RAM: full vectors + graph links)."""
    from finegrain.heads.index import FaissIndex, NumpyIndex

    X, _, Xt, _ = _open(_paths(n), n)
    G, Q = np.asarray(X[: min(n, 100_000)]), np.asarray(Xt[:1000])
    out = {"n": len(G)}
    exact = None
    for name, make in (("numpy exact", lambda: NumpyIndex("cosine")), ("hnsw", lambda: FaissIndex(kind="hnsw"))):
        t0 = time.perf_counter()
        index = make().add(G)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, found = index.search(Q, 10)
        exact = found if exact is None else exact
        out[name] = {"build_seconds": round(build, 1), "query_seconds_1000": round(time.perf_counter() - t0, 2),
                     "recall_at_10": round(_recall(found, exact), 4),
                     "bytes_per_vector": getattr(index, "bytes_per_vector", 4 * D)}  # fmt: skip
        del index
    return out


def part_auto(n: int) -> dict:
    """At 10k, 100k and n rows: the auto pick (fresh measurement) and both exact backends timed on 200 queries."""
    from finegrain.heads.index import FaissIndex, NumpyIndex, choose_exact_backend

    X, _, Xt, _ = _open(_paths(n), n)
    Q = np.asarray(Xt[:200])
    rows = []
    for size in sorted({s for s in (10_000, 100_000, n) if s <= n}):
        G = np.asarray(X[:size])
        t0 = time.perf_counter()
        pick = choose_exact_backend(G, cache=os.path.join(CACHE, f"auto-{time.time_ns()}.json"))
        measure = time.perf_counter() - t0
        times = {}
        for name, cls in (("numpy", NumpyIndex), ("faiss", FaissIndex)):
            index = cls("cosine").add(G)
            index.search(Q[:2], 10)
            t0 = time.perf_counter()
            index.search(Q, 10)
            times[name] = round(time.perf_counter() - t0, 3)
            del index
        rows.append({"n": size, "auto_pick": pick, "measure_seconds": round(measure, 2), "seconds_200_queries": times,
                     "fastest": min(times, key=times.get)})  # fmt: skip
        del G
    return {"rows": rows, "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE")}


def part_extract(n_images: int = 300) -> dict:
    """`finegrain extract` on 300 cub100 images: one process vs torchrun with 2 (gloo), features compared."""
    from finegrain.data import load_image_set
    from finegrain.embed import FeatureStore

    data = load_image_set(os.path.join(os.path.dirname(ROOT), "shared", "data", "cub100"))
    step = max(1, len(data.samples) // n_images)
    manifest = os.path.join(CACHE, "cub100-300.csv")
    os.makedirs(CACHE, exist_ok=True)
    with open(manifest, "w") as f:
        f.write("path,label,split\n" + "".join(f"{s.path},{data.classes[s.label]},{s.split}\n"
                                                for s in data.samples[::step][:n_images]))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    base = ["-m", "finegrain", "extract", manifest, "--no-progress", "--runtime", "torch", "--workers", "0"]
    runs = {}
    for procs in (1, 2):
        out = os.path.join(CACHE, f"extract-{procs}")
        shutil.rmtree(out, ignore_errors=True)
        launch = [] if procs == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *launch, *base, "--out", out], env=env, check=True, capture_output=True)
        runs[procs] = time.perf_counter() - t0
    a, b = FeatureStore.open(os.path.join(CACHE, "extract-1")), FeatureStore.open(os.path.join(CACHE, "extract-2"))
    same_rows = [(e.path, e.row) for e in a.index()] == [(e.path, e.row) for e in b.index()]
    fa, fb = np.asarray(a.features("gap")), np.asarray(b.features("gap"))
    return {"images": n_images, "seconds_1_process": round(runs[1], 1), "seconds_2_processes": round(runs[2], 1),
            "speedup": round(runs[1] / runs[2], 2), "same_rows": same_rows,
            "bitwise_equal": bool(same_rows and np.array_equal(fa, fb)),
            "max_abs_diff": float(np.abs(fa - fb).max()) if same_rows else None}  # fmt: skip


# iNat 2021 projection. Assumption (not measured here; no GPU was lent to this session): EfficientNet-B0 inference,
# mixed precision, batch 256, on one A100 80GB: 10,239 images/s (NVIDIA DeepLearningExamples,
# PyTorch/Classification/ConvNets/efficientnet/README.md, "Inference performance: NVIDIA A100", PyTorch 21.03 NGC).
# efficientnet_lite0 has B0's FLOPs (0.39 G) without squeeze-excitation. JPEG decoding is the other bound: assumed
# 150 images/s a CPU core (PIL decode + resize of a ~500 px photo) and 96 cores a node.
INAT = {
    "images": 2_686_843,
    "classes": 10_000,
    "gpu_images_per_s": 10_239,
    "decode_per_core": 150,
    "cores_per_node": 96,
}


def projection(results: dict) -> list[str]:
    """Hours to extract iNat 2021 on 1 and 4 nodes of 8 GPUs, disk for the store, streaming-probe time."""
    n, rows = INAT["images"], []
    for nodes in (1, 4):
        gpu = nodes * 8 * INAT["gpu_images_per_s"]
        decode = nodes * INAT["cores_per_node"] * INAT["decode_per_core"]
        rate = min(gpu, decode)
        rows.append(f"| {nodes} x 8 GPUs | {gpu:,} | {decode:,} | {rate:,} | {n / rate / 60:.1f} min |")
    gpu_rate = f"{INAT['gpu_images_per_s']:,}"
    rows += ["", f"Assumed, not measured (no GPU was lent to this session): {gpu_rate} images/s a GPU, "
             "NVIDIA's published EfficientNet-B0 mixed-precision inference on one A100 80GB at batch 256 "
             "(DeepLearningExamples, PyTorch/Classification/ConvNets/efficientnet/README.md; efficientnet_lite0 has "
             f"B0's 0.39 GFLOPs); JPEG decoding at {INAT['decode_per_core']} images/s a core on "
             f"{INAT['cores_per_node']} cores a node, which is the bound: the GPUs would idle without DALI/nvJPEG "
             "decoding. Sharding costs one barrier and a merge that copies the rows once (13.8 GB)."]  # fmt: skip
    store_gb = n * D * 4 / 1e9
    probe = results.get("probe", {}).get("stream_full_store", {})
    per_row_class = probe.get("seconds", 0) / (results.get("n", 1) * CLASSES) if probe else 0
    lines = ["| machine | GPU bound (img/s) | decode bound (img/s) | projected (img/s) | extraction |",
             "|---|---:|---:|---:|---:|", *rows, ""]  # fmt: skip
    lines.append(f"Store: {n:,} x {D} float32 = {store_gb:.1f} GB a pooling ({2 * store_gb:.1f} GB for gap + gem).")
    if per_row_class:
        cpu_h = per_row_class * n * INAT["classes"] / 3600
        tflop = 2 * n * D * INAT["classes"] * 3 / 1e12
        lines.append(f"Streaming probe, the recipe measured here (3 Cs chosen on 100k rows, 2 passes): {cpu_h:.1f} h "
                     "on this 2-core CPU, scaled from the 1M x 1,000-class run by rows x classes; on GPUs "
                     f"(`device='cuda'`, DDP under torchrun) the {tflop:,.0f} TFLOP of two passes take minutes, so "
                     "reading the store from disk bounds it.")  # fmt: skip
    return lines


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _probe_table(p: dict) -> list[str]:
    lines = [_row("probe", "rows", "C", "seconds", "peak RSS (GB)", "rows held at once", "test top-1")]
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    names = {"stream_full_store": "streaming, whole store (3 Cs on 100k rows, 2 passes of 1,024)",
             "subset_stream_1m_recipe": "streaming, subset, the 1M recipe", "subset_stream": "streaming, subset, "
             "defaults (C of the L-BFGS run)", "subset_lbfgs": "L-BFGS (full batch), subset, C = 1"}  # fmt: skip
    for key, name in names.items():
        if key not in p:
            continue
        r = p[key]
        held = f"{r['max_rows_held']:,}" if r["max_rows_held"] else "all"
        lines.append(_row(name, f"{r['rows']:,}", r["C"], r["seconds"], r["peak_rss_gb"], held, f"{r['top1']:.4f}"))
    which = "defaults" if "subset_stream" in p else "the 1M recipe"
    rows, delta = p["subset_lbfgs"]["rows"], p["top1_delta_points"]
    return lines + ["", f"Streaming ({which}) minus full batch on the same {rows:,} rows: {delta:+.2f} points.", ""]


def _ivfpq_table(s: dict) -> list[str]:
    if "index" not in s:  # a scale.json written before the PCA + fast-scan index
        return []
    ix, exact = s["index"], s["exact_numpy_streamed_seconds"]
    head = ("IVF-PQ, 1,000 queries, top-10", "nprobe", "re-rank", "query (s)", "x faster than exact", "recall@10")
    lines = [_row(*head), "|---|---:|---:|---:|---:|---:|"]
    for r in s["runs"]:
        name = "default (chosen from N)" if r["default"] else ""
        speed = f"{exact / r['query_seconds_1000']:.0f}"
        lines.append(_row(name, r["nprobe"], f"x{r['rerank']}", r["query_seconds_1000"], speed, r["recall_at_10"]))
    return lines + ["", f"Index (FaissIndex's choice for N and D): PCA to {ix['pca']} dimensions, {ix['nlist']} "
                    f"cells, {ix['m']} 4-bit fast-scan sub-quantizers = {ix['code_bytes']} code bytes a vector; "
                    "all it holds in RAM (codes padded to fast-scan blocks, 8-byte ids, centroids, PQ tables, the "
                    f"PCA) is {ix['ram_bytes_per_vector']} bytes a vector; built in {ix['build_seconds']} s. Exact "
                    f"search for the same queries, streamed over the memory map by numpy in the same run: {exact} s. "
                    "Re-rank xR: the 10 R best PQ candidates re-scored exactly from the memory map (the vectors stay "
                    "on disk; here in the page cache, warmed by the exact pass: from a cold disk each query reads 10 R "
                    "rows of 5 KB).", ""]  # fmt: skip


def _auto_table(a: dict) -> list[str]:
    lines = [_row("gallery", "auto pick", "measuring took (s)", "numpy (s, 200 queries)", "faiss flat (s)", "fastest")]
    lines.append("|---:|---|---:|---:|---:|---|")
    for r in a["rows"]:
        t = r["seconds_200_queries"]
        lines.append(_row(f"{r['n']:,}", r["auto_pick"], r["measure_seconds"], t["numpy"], t["faiss"], r["fastest"]))
    core = a.get("openblas_coretype")
    return lines + ["", f"OPENBLAS_CORETYPE in this environment: {core} (set by the machine's "
                    "environment; finegrain sets SkylakeX / Haswell by the CPU's flags only when it is unset). The "
                    "pick times both exact indexes on at most 32,768 gallery rows and caches the answer by slice "
                    "size, so the 1M gallery reused the 100k measurement (0 s).", ""]  # fmt: skip


def _extract_line(e: dict) -> list[str]:
    return [f"Sharded extraction of {e['images']} cub100 images (efficientnet_lite0, `finegrain extract` vs "
            f"`torchrun --nproc_per_node=2 -m finegrain extract`, gloo, this 2-core CPU): {e['seconds_1_process']} s "
            f"vs {e['seconds_2_processes']} s (x{e['speedup']}); same rows: {e['same_rows']}; features bitwise "
            f"equal: {e['bitwise_equal']} (max abs diff {e['max_abs_diff']}).", ""]  # fmt: skip


def scale_section(sc: dict) -> list[str]:
    if not sc:
        return []
    lines = ["## Scale out (issue 15)", "", f"Synthetic store: {sc['n']:,} x {sc['dim']} float32 in {sc['classes']:,} "
             "classes of low intrinsic dimension (a 64-d latent mixture through a random ReLU map), generated as a "
             "memory map under bench/cache/. Command: `python -m bench.scale`.", ""]  # fmt: skip
    if sc.get("note"):
        lines += [f"Timing: {sc['note']}.", ""]
    if sc.get("cub100"):
        c = sc["cub100"]
        st, lb = c["stream"], c["lbfgs"]
        lines += [f"cub100 (GeM + L2, efficientnet_lite0 store): streaming probe {st['top1']:.4f} top-1 "
                  f"(C {st['C']}, {st['seconds']} s) vs L-BFGS probe {lb['top1']:.4f} "
                  f"(C {lb['C']}, {lb['seconds']} s): {c['delta_points']:+.2f} points.", ""]  # fmt: skip
    for key, render in (("probe", _probe_table), ("ivfpq", _ivfpq_table), ("auto", _auto_table)):
        if sc.get(key):
            lines += render(sc[key])
    if sc.get("hnsw"):
        h = sc["hnsw"]
        lines += [_row(f"{h['n']:,} vectors, 1,000 queries", "build (s)", "query (s)", "recall@10", "RAM a vector (B)"),
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        for name in ("numpy exact", "hnsw"):
            r = h[name]
            lines.append(
                _row(name, r["build_seconds"], r["query_seconds_1000"], r["recall_at_10"], r["bytes_per_vector"])
            )
        lines.append("")
    if sc.get("extract"):
        lines += _extract_line(sc["extract"])
    return lines + ["### Projection: iNat 2021 (2.7M images, 10,000 classes)", "", *projection(sc), ""]


PARTS = {"cub100": part_cub100, "probe": part_probe, "ivfpq": part_ivfpq, "auto": part_auto, "hnsw": part_hnsw}


def _save(results: dict) -> None:
    from finegrain.atomic import atomic_write_json

    p, s, e = results.get("probe", {}), results.get("ivfpq", {}), results.get("extract", {})
    runs, built = s.get("runs", [{}]), s.get("index", {})
    best = next((r for r in runs if r.get("default")), None) or max(runs, key=lambda r: r.get("recall_at_10", 0))
    exact = s.get("exact_numpy_streamed_seconds")
    results["headline"] = {
        "stream_probe_peak_rss_gb": p.get("stream_full_store", {}).get("peak_rss_gb"),
        "stream_probe_top1_delta_points": p.get("top1_delta_points"),
        "stream_probe_cub100_delta_points": results.get("cub100", {}).get("delta_points"),
        "ivfpq_recall_at_10": best.get("recall_at_10"),  # the default setting FaissIndex chooses for the gallery
        "ivfpq_bytes_per_vector": built.get("ram_bytes_per_vector"),  # all RAM: codes, ids, centroids, PCA
        "ivfpq_code_bytes_per_vector": built.get("code_bytes"),
        "ivfpq_setting": {
            **{k: built.get(k) for k in ("pca", "nlist", "m")},
            **{k: best.get(k) for k in ("nprobe", "rerank", "query_seconds_1000")},
            "exact_numpy_seconds_1000": exact,
        },
        "sharded_extract_features_identical": e.get("bitwise_equal"),
    }
    atomic_write_json(OUT, results)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="data,probe,ivfpq,auto,extract")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--child-probe", nargs=3)
    ap.add_argument("--clean", action="store_true", help="delete the synthetic store at the end")
    args = ap.parse_args(argv)
    if args.child_probe:
        n, rows, solver = args.child_probe
        print(json.dumps(probe_child(int(n), int(rows), solver)))
        return
    results = json.load(open(OUT)) if os.path.exists(OUT) else {}
    results.update(n=args.n, dim=D, classes=CLASSES, command=f"python -m bench.scale --n {args.n}")
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        if part == "data":
            make_store(args.n)
        elif part == "extract":
            results["extract"] = part_extract()
        elif part == "probe_subset":  # merged into "probe"; a comparison on another row count is kept beside it
            p, sub = results.get("probe", {}), part_probe_subset(args.n)
            if p.get("subset_lbfgs", {}).get("rows") not in (None, sub["subset_lbfgs"]["rows"]):
                rows = p["subset_lbfgs"]["rows"]
                p[f"subset_{rows}_rows"] = {k: p.pop(k) for k in ("subset_stream", "subset_lbfgs", "top1_delta_points")}
            results["probe"] = {**p, **sub}
        else:
            results[part] = PARTS[part](args.n)
        print(f"{part}: {time.perf_counter() - t0:.0f} s", flush=True)
        _save(results)
    if args.clean:
        shutil.rmtree(CACHE, ignore_errors=True)


if __name__ == "__main__":
    main()
