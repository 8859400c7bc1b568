"""Nearest-neighbour search, side by side in one run: numpy brute force vs faiss flat (exact) vs faiss IVF.

Gallery [N, D] float32 of random-normal vectors around seeded cluster centres, queries from the same mixture,
cosine top-k. Each method runs in its own subprocess (same data, regenerated from the seed) so its peak RSS
is its own: the increase of VmHWM over the RSS once the data is in memory. Search time is the best of
--repeats; both libraries get the same thread count (BLAS and OpenMP). Recall@k is measured against numpy.

    python bench/search.py                      # 100,000 x 1,280 gallery, 1,000 queries, top-10
    python bench/search.py --n 20000 --d 256    # quick look
    python bench/search.py --openblas-coretype SkylakeX   # also faiss with its BLAS kernel forced
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("numpy", "faiss_flat", "faiss_ivf")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
GEN_BLOCK = 8192  # rows generated at a time, so making the data leaves no large temporary behind


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="gallery size")
    p.add_argument("--d", type=int, default=1280, help="dimension")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--clusters", type=int, default=1000, help="cluster centres in the gallery")
    p.add_argument("--cluster-scale", type=float, default=1.0, help="std of the centres; the noise has std 1")
    p.add_argument("--nprobe", type=int, default=16, help="IVF cells probed per query")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--openblas-coretype",
        help="also run the faiss methods with OPENBLAS_CORETYPE set to this (e.g. SkylakeX), for a CPU that "
        "faiss's bundled OpenBLAS does not recognise",
    )
    p.add_argument("--no-record", action="store_true", help="print only; leave bench/results alone")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--save-indices", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_data(args: argparse.Namespace):
    """-> gallery [n, d] and queries [queries, d], float32, each row a centre plus unit-variance noise."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.d), dtype=np.float32) * np.float32(args.cluster_scale)

    def sample(n: int) -> np.ndarray:
        out = np.empty((n, args.d), dtype=np.float32)
        for start in range(0, n, GEN_BLOCK):
            block = out[start : start + GEN_BLOCK]
            rng.standard_normal(out=block, dtype=np.float32)
            block += centres[rng.integers(0, args.clusters, len(block))]
        return out

    return sample(args.n), sample(args.queries)


def memory_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def reset_peak_rss() -> tuple[int, str]:
    """-> (baseline kB, how): VmHWM is reset to the current RSS where the kernel allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return memory_kb("VmRSS"), "VmHWM reset via /proc/self/clear_refs, baseline VmRSS"
    except OSError:
        return memory_kb("VmHWM"), "baseline VmHWM after data generation (no reset)"


def run_worker(args: argparse.Namespace) -> dict:
    """One method in this process: build the index, search --repeats times, report times and peak memory."""
    import numpy as np
    from threadpoolctl import threadpool_info

    from finegrain.heads.index import FaissIndex, NumpyIndex

    if args.worker.startswith("faiss"):
        import faiss  # imported before the baseline: the library itself is not the method's memory

        faiss.omp_set_num_threads(args.threads)
    X, Q = make_data(args)
    baseline_kb, how = reset_peak_rss()
    t0 = time.perf_counter()
    if args.worker == "numpy":
        index = NumpyIndex("cosine").add(X)
    else:
        index = FaissIndex("cosine", kind=args.worker.removeprefix("faiss_"), nprobe=args.nprobe).add(X)
    build_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        _, indices = index.search(Q, args.k)
        times.append(time.perf_counter() - t0)
    peak_kb = memory_kb("VmHWM")
    np.save(args.save_indices, indices)
    pools = [
        {"api": p["internal_api"], "threads": p["num_threads"], "lib": os.path.basename(p["filepath"])}
        | ({"arch": p["architecture"]} if p.get("architecture") else {})
        for p in threadpool_info()
    ]
    return {
        "build_s": round(build_s, 3),
        "search_s": round(min(times), 4),
        "search_runs_s": [round(t, 4) for t in times],
        "queries_per_s": round(args.queries / min(times), 1),
        "peak_rss_increase_mib": round((peak_kb - baseline_kb) / 1024, 1),
        "baseline_rss_mib": round(baseline_kb / 1024, 1),
        "memory_method": how,
        "thread_pools": pools,
        **({"nlist": index.nlist_, "nprobe": min(args.nprobe, index.nlist_)} if args.worker == "faiss_ivf" else {}),
    }


def recall_at_k(found, exact) -> float:
    return float(sum(len(set(a) & set(e)) for a, e in zip(found.tolist(), exact.tolist(), strict=True)) / exact.size)


def runs(args: argparse.Namespace) -> list[tuple[str, str, str | None]]:
    """-> (result key, method, OPENBLAS_CORETYPE or None) for every subprocess to run."""
    plain = [(method, method, None) for method in METHODS]
    forced = [(f"{m}@{args.openblas_coretype}", m, args.openblas_coretype) for m in METHODS if m.startswith("faiss")]
    return plain + (forced if args.openblas_coretype else [])


def run_all(args: argparse.Namespace, argv: list[str]) -> dict:
    import numpy as np

    base_env = {**os.environ, **dict.fromkeys(THREAD_VARS, str(args.threads))}
    base_env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, base_env.get("PYTHONPATH")]))
    base_env.pop("OPENBLAS_CORETYPE", None)
    results, indices = {}, {}
    with tempfile.TemporaryDirectory(prefix="fg-bench-search-") as tmp:
        for key, method, coretype in runs(args):
            path = os.path.join(tmp, f"{key}.npy")
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", method, "--save-indices", path]
            env = {**base_env, **({"OPENBLAS_CORETYPE": coretype} if coretype else {})}
            done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            results[key] = {"method": method, "openblas_coretype": coretype}
            results[key].update(json.loads(done.stdout.strip().splitlines()[-1]))
            indices[key] = np.load(path)
    for key, r in results.items():
        r["recall_at_k_vs_numpy"] = round(recall_at_k(indices[key], indices["numpy"]), 4)
    return results


def ratios(results: dict) -> dict[str, float]:
    """numpy search time / each faiss variant's search time (> 1: faiss is faster)."""
    numpy_s = results["numpy"]["search_s"]
    return {f"numpy_over_{key}": round(numpy_s / r["search_s"], 3) for key, r in results.items() if key != "numpy"}


def markdown(args: argparse.Namespace, results: dict) -> str:
    lines = [
        f"gallery {args.n:,} x {args.d:,} float32, {args.queries:,} queries, cosine top-{args.k}, "
        f"{args.threads} threads, best of {args.repeats}",
        "",
        f"| method | build (s) | search (s) | queries/s | numpy / this | peak RSS increase (MiB) | recall@{args.k} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    ratio = ratios(results)
    for key, r in results.items():
        name = {"numpy": "numpy brute force", "faiss_flat": "faiss flat (exact)", "faiss_ivf": "faiss IVF"}[r["method"]]
        if r["method"] == "faiss_ivf":
            name += f" (nlist={r['nlist']}, nprobe={r['nprobe']})"
        if r["openblas_coretype"]:
            name += f", OPENBLAS_CORETYPE={r['openblas_coretype']}"
        lines.append(
            f"| {name} | {r['build_s']:.2f} | {r['search_s']:.3f} | {r['queries_per_s']:,.0f} | "
            f"{ratio.get(f'numpy_over_{key}', 1.0):.2f} | {r['peak_rss_increase_mib']:,.0f} | "
            f"{r['recall_at_k_vs_numpy']:.4f} |"
        )
    plain = [r for r in results.values() if not r["openblas_coretype"]]
    arch = {p["lib"]: p["arch"] for r in plain for p in r["thread_pools"] if p.get("arch")}
    lines += ["", "OpenBLAS kernels detected (no override): " + ", ".join(f"{k}: {v}" for k, v in sorted(arch.items()))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    results = run_all(args, argv)
    table = markdown(args, results)
    print(table)
    if not args.no_record:
        sys.path.insert(0, ROOT)  # bench/ is a package beside src/, not installed
        from bench.common import record

        config = {k: v for k, v in vars(args).items() if k not in ("worker", "save_indices", "no_record")}
        value = {"config": {**config, "metric": "cosine"}, "results": results, "search_time_ratio": ratios(results)}
        record("representations.json", "search", {**value, "table": table})


if __name__ == "__main__":
    main()
