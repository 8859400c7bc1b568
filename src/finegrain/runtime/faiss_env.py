"""faiss's process environment, set before its first import (BLAS kernels, OpenMP idling): the one place finegrain
touches environment variables for a library; heads/index.py imports faiss only through `import_faiss`."""

from __future__ import annotations

import os
import sys


def import_faiss():
    """faiss, with OpenBLAS told this CPU's kernels first.

    faiss-cpu's bundled OpenBLAS (0.3.15) does not recognise recent CPUs (AMD Zen 4 here) and falls back to its
    Prescott kernels, 2.7x slower than numpy at exact search (BENCHMARKS.md). OPENBLAS_CORETYPE is read when the
    library loads, so it is set, unless the user set it, before the first import: SkylakeX with AVX-512, else
    Haswell with AVX2. faiss's OpenMP threads sleep when idle (OMP_WAIT_POLICY=PASSIVE for its import, unless set).
    """
    if "faiss" not in sys.modules and "OPENBLAS_CORETYPE" not in os.environ:
        from finegrain.runtime.settings import _cpu_flags  # one reader of /proc/cpuinfo

        flags = _cpu_flags() or set()
        core = "SkylakeX" if "avx512f" in flags else "Haswell" if "avx2" in flags else None
        if core:
            os.environ["OPENBLAS_CORETYPE"] = core
    if "faiss" in sys.modules:
        return sys.modules["faiss"]
    # faiss's bundled libgomp spins idle threads: on a busy machine training fast-scan PQ (thousands of tiny k-means)
    # took 41 s instead of 0.3 s. Its libgomp reads the policy once, when loaded; torch's own copy never sees it.
    ours = "OMP_WAIT_POLICY" not in os.environ
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import faiss
    finally:
        if ours:
            del os.environ["OMP_WAIT_POLICY"]
    return faiss
