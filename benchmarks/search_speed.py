"""Search speed and peak memory: streamed `top_k` / `duplicate_pairs` against a NumPy full-matrix baseline.

    python benchmarks/search_speed.py                 # 100k float32 and 1M float16, D=512 (~6 min on 2 busy cores)
    python benchmarks/search_speed.py --sizes 100000  # quick
    python benchmarks/search_speed.py --pairs-budget 0  # no time limit on all-pairs (1M: hours on a CPU)
    python benchmarks/search_speed.py --million       # issue 20: the approximate index at 1M x 256 (search_million.py)

Data: random unit vectors written chunk by chunk into a .npy in a temp folder (the 1M set in float16:
1 GB, as `embed --dtype float16` would write it), with rows 100..199 near-copies (cosine ~0.9999)
of rows 0..99, so all-pairs at cosine >= 0.9 must find exactly 100 pairs in any prefix of 200 rows or
more (random 512-d pairs stay below ~0.35). Queries: 1,000 rows of the set, slightly moved; k = 10.

Every case (data generation too) runs in its own subprocess, so its peak resident memory (VmHWM:
resident pages, file mappings included) is its own; `base_mib` is that peak after importing JAX and
opening the data, before any work. (Not getrusage's ru_maxrss: on Linux it survives exec, so a child
reports its parent's peak when that is higher.)
All-pairs runs longer than --pairs-budget seconds are stopped there and their total extrapolated from
the blocks done (blocks are equal work), marked `"extrapolated": true`. Times include the one compile
unless a case says otherwise (`compile_s` is the warm-up on one chunk). JSON lines on stdout, a table on stderr.
The children run as `contrastive neighbors` / `duplicates` do: glibc's malloc as it comes (only the
training and embedding commands switch the speed wing on), so peak memory is what those commands
would reach; runs before the reorganisation (session 8) had malloc tuned by `import contrastive_cli`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

D, K, QUERIES, PLANTED, THRESHOLD = 512, 10, 1000, 100, 0.9


def generate(path: Path, n: int, dtype: str, seed: int = 0, chunk: int = 65536) -> None:
    """n random unit rows [n, D] into a .npy, chunk by chunk (memory: one chunk); rows 100..199 near-copies."""
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, D))
    for start in range(0, n, chunk):
        x = rng.normal(size=(min(chunk, n - start), D)).astype(np.float32)
        out[start:start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    copies = out[:PLANTED].astype(np.float32) + 0.01 * rng.normal(size=(PLANTED, D)).astype(np.float32) / np.sqrt(D)
    out[PLANTED:2 * PLANTED] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    out.flush()
    del out


def queries(x: np.ndarray) -> np.ndarray:
    q = x[:QUERIES].astype(np.float32) + 0.05 * np.random.default_rng(1).normal(size=(QUERIES, D)).astype(np.float32) / np.sqrt(D)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def rss_mib() -> float:
    """This process's peak resident memory in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; bytes on macOS


class _Stop(Exception):
    pass


def child(case: str, file: str, n: int, budget: float) -> dict:
    """One measurement, in this (fresh) process."""
    out: dict = {"case": case, "n": n}
    if case == "generate":
        dtype = "float32" if n <= 200_000 else "float16"
        t = time.perf_counter()
        generate(Path(file), n, dtype)
        return dict(out, s=time.perf_counter() - t, dtype=dtype, file_mib=round(Path(file).stat().st_size / 2**20))
    if case.startswith("numpy"):
        # the baseline holds the whole set in memory, read (not mapped) when it is the whole file
        rows = np.load(file, mmap_mode="r").shape[0]
        x = np.load(file).astype(np.float32, copy=False) if n == rows else np.array(np.load(file, mmap_mode="r")[:n], np.float32)
        out["base_mib"] = rss_mib()
        t = time.perf_counter()
        if case == "numpy_topk":
            s = queries(x) @ x.T  # [Q, N]
            top = np.argpartition(-s, K, axis=1)[:, :K]
            order = np.argsort(-np.take_along_axis(s, top, 1), axis=1)
            out["top1"] = np.take_along_axis(top, order, 1)[:, 0].tolist()[:5]
        else:
            s = x @ x.T  # [N, N]
            i, j = np.nonzero(s >= THRESHOLD)
            out["pairs"] = int((i < j).sum())
        out["s"] = time.perf_counter() - t
        out["peak_mib"] = rss_mib()
        return out

    import jax

    from contrastive_cli.infer import embfile
    from contrastive_cli.infer import search

    if case == "topk_norelease":  # what streaming through a memmap costs without dropping its pages
        embfile.release = lambda *a: None
    x = np.load(file, mmap_mode="r")[:n]
    q = queries(x)
    jax.numpy.zeros(1).block_until_ready()
    out["base_mib"] = rss_mib()
    out["backend"] = jax.default_backend()
    t = time.perf_counter()
    if case.startswith("topk"):
        search.top_k(q, x[:search.CHUNK], K)  # compile on one chunk: the same shapes
        out["compile_s"] = time.perf_counter() - t
        t = time.perf_counter()
        s, i = search.top_k(q, x, K)
        out["top1"] = i[:, 0].tolist()[:5]
    else:
        list(search.duplicate_pairs(x[:search.CHUNK], THRESHOLD))
        out["compile_s"] = time.perf_counter() - t
        t = time.perf_counter()
        state = {"pairs": 0, "done": 0, "total": 0}

        def progress(done, total):
            state["done"], state["total"] = done, total
            if budget and time.perf_counter() - t > budget and done < total:
                raise _Stop

        try:
            for i, j, s in search.duplicate_pairs(x, THRESHOLD, on_progress=progress):
                state["pairs"] += len(i)
        except _Stop:
            pass
        out.update(blocks=f"{state['done']}/{state['total']}", pairs=state["pairs"])
    out["s"] = time.perf_counter() - t
    if case == "pairs" and state["done"] < state["total"]:
        out.update(extrapolated=True, measured_s=out["s"], s=out["s"] * state["total"] / state["done"])
    out["peak_mib"] = rss_mib()
    return out


def run_case(case: str, file: Path, n: int, budget: float) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", case, "--file", str(file), "--n", str(n),
                           "--pairs-budget", str(budget)], capture_output=True, text=True)
    if proc.returncode:
        return {"case": case, "n": n, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    if "--million" in sys.argv:  # the clustered 1M benchmark of issue 20, with its own options
        sys.path.insert(0, str(Path(__file__).parent))
        import search_million

        sys.argv.remove("--million")
        return search_million.main()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--pairs-budget", type=float, default=60.0, help="seconds per all-pairs run (0: no limit)")
    p.add_argument("--numpy-pairs-n", type=int, default=20_000, help="all-pairs sizes compared with NumPy")
    p.add_argument("--dir", type=Path, default=None, help="where to write the data (default: a temp folder)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.file, a.n, a.pairs_budget)))
        return

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        extra = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()
                 if k not in ("case", "n", "s", "peak_mib", "base_mib")}
        timing = f"{row['s']:9.1f} s" if "s" in row else " " * 11
        memory = f"{row['peak_mib']:6.0f} MiB peak ({row['base_mib']:4.0f} base)" if "peak_mib" in row else " " * 26
        print(f"{row['case']:>15} {row['n']:>9,} {timing} {memory}  {json.dumps(extra)}", file=sys.stderr, flush=True)

    emit({"case": "machine", "n": os.cpu_count(), "load_1m": os.getloadavg()[0]})
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        for n in a.sizes:
            file = Path(tmp) / f"x{n}.npy"
            emit(run_case("generate", file, n, a.pairs_budget))
            emit(run_case("topk", file, n, a.pairs_budget))
            if n <= 200_000:  # [1000, N] float32 scores and the set in memory: fits at 100k, 4 + 2 GB at 1M
                emit(run_case("numpy_topk", file, n, a.pairs_budget))
                emit(run_case("topk_norelease", file, n, a.pairs_budget))
                m = min(n, a.numpy_pairs_n)
                emit(run_case("pairs", file, m, a.pairs_budget))
                emit(run_case("numpy_pairs", file, m, a.pairs_budget))  # an [m, m] float32 matrix: 1.6 GB at 20k
            emit(run_case("pairs", file, n, a.pairs_budget))
    emit({"case": "machine", "n": os.cpu_count(), "load_1m": os.getloadavg()[0]})


if __name__ == "__main__":
    main()
