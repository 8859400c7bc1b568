"""Nearest-neighbour search, side by side in one run: numpy brute force vs faiss flat (exact) vs faiss IVF.

Gallery [N, D] float32 of random-normal vectors around seeded cluster centres, queries from the same mixture,
cosine top-k. Each method runs in its own subprocess (same data, regenerated from the seed) so its peak RSS
is its own: the increase of VmHWM over the RSS once the data is in memory. Search time is the best of
--repeats; both libraries get the same thread count (BLAS and OpenMP). Recall@k is measured against numpy.

    python bench/search.py                      # 100,000 x 1,280 gallery, 1,000 queries, top-10
    python bench/search.py --n 20000 --d 256    # quick look
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


def run_all(args: argparse.Namespace, argv: list[str]) -> dict:
    import numpy as np

    env = {**os.environ, **dict.fromkeys(THREAD_VARS, str(args.threads))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    results, indices = {}, {}
    with tempfile.TemporaryDirectory(prefix="fg-bench-search-") as tmp:
        for method in METHODS:
            path = os.path.join(tmp, f"{method}.npy")
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", method, "--save-indices", path]
            done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            results[method] = json.loads(done.stdout.strip().splitlines()[-1])
            indices[method] = np.load(path)
    for method in METHODS:
        results[method]["recall_at_k_vs_numpy"] = round(recall_at_k(indices[method], indices["numpy"]), 4)
    return results


def markdown(args: argparse.Namespace, results: dict) -> str:
    flat = results["numpy"]["search_s"] / results["faiss_flat"]["search_s"]
    ivf = results["numpy"]["search_s"] / results["faiss_ivf"]["search_s"]
    ivf_info = f"nlist={results['faiss_ivf']['nlist']}, nprobe={results['faiss_ivf']['nprobe']}"
    lines = [
        f"gallery {args.n:,} x {args.d:,} float32, {args.queries:,} queries, cosine top-{args.k}, "
        f"{args.threads} threads, best of {args.repeats}",
        "",
        f"| method | build (s) | search (s) | queries/s | peak RSS increase (MiB) | recall@{args.k} vs exact |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = {"numpy": "numpy brute force", "faiss_flat": "faiss flat (exact)", "faiss_ivf": f"faiss IVF ({ivf_info})"}
    for method, r in results.items():
        lines.append(
            f"| {names[method]} | {r['build_s']:.2f} | {r['search_s']:.3f} | {r['queries_per_s']:,.0f} | "
            f"{r['peak_rss_increase_mib']:,.0f} | {r['recall_at_k_vs_numpy']:.4f} |"
        )
    lines += ["", f"search time numpy / faiss flat = {flat:.2f}x; numpy / faiss IVF = {ivf:.1f}x"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    results = run_all(args, argv)
    print(markdown(args, results))
    if not args.no_record:
        sys.path.insert(0, ROOT)  # bench/ is a package beside src/, not installed
        from bench.common import record

        config = {k: v for k, v in vars(args).items() if k not in ("worker", "save_indices", "no_record")}
        ratios = {
            "numpy_over_faiss_flat": round(results["numpy"]["search_s"] / results["faiss_flat"]["search_s"], 3),
            "numpy_over_faiss_ivf": round(results["numpy"]["search_s"] / results["faiss_ivf"]["search_s"], 3),
        }
        record(
            "representations.json",
            "search",
            {
                "config": {**config, "metric": "cosine"},
                "results": results,
                "search_time_ratio": ratios,
                "table": markdown(args, results),
            },
        )


if __name__ == "__main__":
    main()
