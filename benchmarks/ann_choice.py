"""Which ANN library under `duplicates`: faiss IVF (range search) against usearch HNSW (top-k), on
the clustered data of search_million.py, all-pairs at cosine 0.95.

    pip install usearch            # not a dependency of contrastive; faiss-cpu is
    python benchmarks/ann_choice.py --n 200000

For each: build time (training included), the time to search every row (faiss: range search at the
threshold; usearch: its k nearest, k = --k, kept when above the threshold), and the recall of the
exact pairs of the first 5,000 rows. One process, one run each; JSON lines on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import search_million  # noqa: E402

T, SAMPLE = 0.95, 5000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--k", type=int, default=16)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        search_million.generate(Path(tmp) / "e.npy", a.n)
        x = np.load(Path(tmp) / "e.npy")
    n, d = x.shape
    xf = x.astype(np.float32)
    ref = set()
    s = xf[:SAMPLE] @ xf.T
    for i, j in zip(*np.nonzero(s >= T)):
        if i != j:
            ref.add((int(i), int(j)))
    del s
    print(json.dumps({"case": "machine", **search_million.cpu(), "n": n, "exact_sample_pairs": len(ref)}), flush=True)

    import faiss

    faiss.omp_set_num_threads(len(os.sched_getaffinity(0)))
    from contrastive_cli.infer import ann

    t = time.perf_counter()
    idx = ann.build_index(x)
    build = time.perf_counter() - t
    t = time.perf_counter()
    found = set()
    for s0 in range(0, n, 20000):
        lims, _, ids = idx.faiss.range_search(xf[s0:s0 + 20000], T)
        if s0 < SAMPLE:
            for i in range(min(SAMPLE - s0, 20000)):
                found |= {(s0 + i, int(j)) for j in ids[lims[i]:lims[i + 1]] if j != s0 + i}
    print(json.dumps({"case": "faiss", "index": idx.header["kind"], "nprobe": idx.header["nprobe"], "build_s": build,
                      "all_rows_s": time.perf_counter() - t, "recall": len(found & ref) / len(ref)}), flush=True)

    from usearch.index import Index

    t = time.perf_counter()
    u = Index(ndim=d, metric="ip", dtype="f16", connectivity=16, expansion_add=64, expansion_search=64)
    u.add(np.arange(n), x, threads=len(os.sched_getaffinity(0)))
    build = time.perf_counter() - t
    t = time.perf_counter()
    m = u.search(x, a.k, threads=len(os.sched_getaffinity(0)))
    took = time.perf_counter() - t
    found = {(i, int(j)) for i in range(SAMPLE) for j, dist in zip(m.keys[i], m.distances[i])
             if j != i and 1 - dist >= T}
    print(json.dumps({"case": "usearch", "index": "HNSW M=16 ef=64 f16", "k": a.k, "build_s": build,
                      "all_rows_s": took, "recall": len(found & ref) / len(ref)}), flush=True)


if __name__ == "__main__":
    main()
