"""Search at a million (issue 20): approximate duplicates and top-k over 1M x 256 float16 clustered
embeddings, against the exact search, with the exact path's GFLOP/s before and after.

    python benchmarks/search_speed.py --million          # the same as: python benchmarks/search_million.py
    python benchmarks/search_million.py --n 200000       # quicker

Data: N unit rows around 4,000 Gaussian cluster centres (Dirichlet cluster sizes; per-cluster spread
log-uniform, within-cluster cosine ~0.4-0.94, so the tightest clusters hold natural pairs above the
threshold too), written with `write_pair` as `embed --dtype float16` would (index with sha256).
Planted: 5,000 (original, copy) pairs and 1,000 groups of an original and 2-4 copies, each copy at
cosine 0.955-0.995 to its original; threshold 0.95.

Cases, each in its own process (peak memory = its VmHWM, file mappings included):
  generate        the data
  duplicates      `find_duplicates(EMB, 0.95)` with no index beside: build on first use + all-pairs
                  range search + groups (what `contrastive duplicates EMB -t 0.95` runs), then the
                  pairs again to measure recall of the planted pairs and of the exact pairs of a
                  random sample of rows (exact: those rows against all N)
  exact_topk      10,000 top-10 queries (rows of the set, moved slightly), exact `top_k` (after)
  before_topk     1,000 of them through the exact top_k after and before issue 20 (BEFORE), alternating, median of 3
  ann_topk        the same 10,000 through the index (loaded from disk), recall@10 against exact_topk
  faiss_flat      faiss IndexFlatIP (exact, float32) on the same queries: the anchor
  pairs           exact all-pairs on the first --pairs-n rows, after and before, alternating, median of 3
  peak            float32 matmul 8192 x 256 x 8192: NumPy's BLAS and JAX, median of 5
JSON lines on stdout, a table on stderr, with the machine's load average and CPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

D, CLUSTERS, THRESHOLD, K, QUERIES, SAMPLE = 256, 4000, 0.95, 10, 10_000, 2000
PAIRS, GROUPS = 5000, 1000
BEFORE = "1622d5f"  # main before issue 20


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu() -> dict:
    text = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    isa = sorted({w for w in text.split() if w.startswith("avx512")})
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "avx512": " ".join(isa), "load_1m": os.getloadavg()[0]}


def median_s(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


# --- data ---------------------------------------------------------------------------------------

def generate(path: Path, n: int, seed: int = 0, chunk: int = 65536) -> dict:
    from contrastive_cli.infer.embed import write_pair

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLUSTERS, D)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = np.exp(rng.uniform(np.log(0.25), np.log(1.2), CLUSTERS)).astype(np.float32)
    label = rng.choice(CLUSTERS, size=n, p=rng.dirichlet(np.full(CLUSTERS, 2.0)))
    x = np.empty((n, D), np.float16)
    for s in range(0, n, chunk):
        c = label[s:s + chunk]
        v = centres[c] + spread[c, None] * rng.normal(size=(len(c), D)).astype(np.float32) / np.sqrt(D)
        x[s:s + chunk] = v / np.linalg.norm(v, axis=1, keepdims=True)
    # planted copies: originals and copy rows all distinct
    sizes = np.concatenate([np.ones(PAIRS, int), rng.integers(2, 5, GROUPS)])  # copies per original
    rows = rng.permutation(n)[:len(sizes) + sizes.sum()]
    originals, copies = rows[:len(sizes)], rows[len(sizes):]
    of = np.repeat(originals, sizes)  # [C]: each copy's original
    cos = rng.uniform(0.955, 0.995, len(of))
    eps = np.sqrt(1 / cos**2 - 1)  # |noise| for that cosine, noise orthogonal to the original
    o = x[of].astype(np.float32)
    g = rng.normal(size=o.shape).astype(np.float32)
    g -= (g * o).sum(1, keepdims=True) * o
    v = o + eps[:, None].astype(np.float32) * g / np.linalg.norm(g, axis=1, keepdims=True)
    x[copies] = v / np.linalg.norm(v, axis=1, keepdims=True)
    planted = np.stack([np.minimum(of, copies), np.maximum(of, copies)], 1)
    np.save(path.with_name("planted.npy"), planted)
    write_pair(path, x, {"paths": [f"img{i:07d}.jpg" for i in range(n)], "root": "/photos", "dim": D,
                         "dtype": "float16", "normalized": True})
    exact = np.einsum("td,td->t", x[planted[:, 0]].astype(np.float32), x[planted[:, 1]].astype(np.float32))
    return {"planted_pairs": len(planted), "planted_min_cos": float(exact.min()), "file_mib": path.stat().st_size >> 20}


def queries(x: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(len(x), QUERIES, replace=False))
    q = x[rows].astype(np.float32) + 0.2 * rng.normal(size=(QUERIES, D)).astype(np.float32) / np.sqrt(D)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def before_module():
    """search.py as it was before issue 20, loaded from git beside the current package."""
    src = subprocess.run(["git", "show", f"{BEFORE}:contrastive_cli/infer/search.py"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent).stdout
    spec = importlib.util.spec_from_loader("contrastive_cli.infer._search_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "contrastive_cli.infer"
    exec(compile(src, f"{BEFORE}:search.py", "exec"), module.__dict__)
    return module


# --- cases --------------------------------------------------------------------------------------

def child(case: str, file: Path, n: int, pairs_n: int) -> dict:
    out: dict = {"case": case, "n": n}
    if case == "generate":
        t = time.perf_counter()
        out.update(generate(file, n))
        return dict(out, s=time.perf_counter() - t)
    from contrastive_cli.infer import ann, search
    from contrastive_cli.infer.embfile import load_embeddings
    from contrastive_cli.infer.find import find_duplicates

    x, index = load_embeddings(file)
    out["base_mib"] = rss_mib()
    if case == "duplicates":
        notes = []
        t = time.perf_counter()
        result = find_duplicates(file, THRESHOLD, on_info=lambda m: notes.append(time.perf_counter()))
        out["s"] = time.perf_counter() - t
        out.update(search=result["search"], groups=len(result["groups"]),
                   grouped=sum(len(g["members"]) for g in result["groups"]), peak_mib=rss_mib())
        del result
        idx, _ = ann.load_index(ann.ann_path(file), x, ann.npy_digest(file, index))
        t = time.perf_counter()
        found = [np.stack([i, j], 1) for i, j, _ in ann.ann_pairs(x, x, idx, THRESHOLD, upper=True)]
        out["pairs_s"] = time.perf_counter() - t
        found = np.unique(np.concatenate(found), axis=0)
        out["pairs"] = len(found)
        codes = set((found[:, 0] * n + found[:, 1]).tolist())
        planted = np.load(file.with_name("planted.npy"))
        out["recall_planted"] = float(np.mean([a * n + b in codes for a, b in planted]))
        rows = np.sort(np.random.default_rng(2).choice(n, SAMPLE, replace=False))
        t = time.perf_counter()
        exact = set()
        for i, j, _ in search.duplicate_pairs(np.asarray(x[rows]), THRESHOLD, other=x):
            a, b = rows[i], j
            keep = a != b
            exact |= set((np.minimum(a, b)[keep] * n + np.maximum(a, b)[keep]).tolist())
        out["exact_sample_s"] = time.perf_counter() - t
        out["exact_sample_pairs"] = len(exact)
        out["recall_exact_sample"] = len(exact & codes) / max(1, len(exact))
        out["peak_mib"] = max(out["peak_mib"], rss_mib())
        return out
    q = queries(x)
    if case == "exact_topk":
        search.top_k(q[:8], x[:search.CHUNK], K)  # compile
        t = time.perf_counter()
        s, i = search.top_k(q, x, K)
        out["s"] = time.perf_counter() - t
        out["queries"] = len(q)
        out["gflops"] = 2 * len(q) * n * D / out["s"] / 1e9
        np.save(file.with_name("exact_topk.npy"), i)
    elif case == "before_topk":  # the same 1,000 queries through the code before and after, alternating
        old, qs = before_module(), q[:1000]
        for m in (search, old):
            m.top_k(qs[:8], x[:search.CHUNK], K)  # compile
        times = {"after": [], "before": []}
        for _ in range(3):
            for name, m in (("after", search), ("before", old)):
                t = time.perf_counter()
                m.top_k(qs, x, K)
                times[name].append(time.perf_counter() - t)
        for name, ts in times.items():
            out[f"{name}_s"] = sorted(ts)[1]
            out[f"{name}_gflops"] = 2 * len(qs) * n * D / out[f"{name}_s"] / 1e9
        out["queries"] = len(qs)
    elif case == "ann_topk":
        t = time.perf_counter()
        idx, why = ann.load_index(ann.ann_path(file), x, ann.npy_digest(file, index))
        out["load_s"] = time.perf_counter() - t
        assert idx is not None, why
        s, i = ann.ann_top_k(q[:100], x, idx, K)  # warm
        out["s"] = median_s(lambda: ann.ann_top_k(q, x, idx, K), 3)
        s, i = ann.ann_top_k(q, x, idx, K)
        ref = np.load(file.with_name("exact_topk.npy"))
        out["recall_at_10"] = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(i, ref)]))
        out["queries"] = QUERIES
        out["nprobe"] = idx.header["nprobe"]
    elif case == "faiss_flat":
        faiss = ann.faiss_module()
        flat = faiss.IndexFlatIP(D)
        for s0 in range(0, n, 65536):
            flat.add(np.asarray(x[s0:s0 + 65536], np.float32))
        t = time.perf_counter()
        s, i = flat.search(q, K)
        out["s"] = time.perf_counter() - t
        out["gflops"] = 2 * QUERIES * n * D / out["s"] / 1e9
        ref = np.load(file.with_name("exact_topk.npy"))
        out["agrees_with_exact"] = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(i, ref)]))
    elif case == "pairs":
        sub = np.asarray(x[:pairs_n])
        useful = pairs_n * pairs_n * D  # N^2 / 2 pairs x 2D flops
        count = lambda m: sum(len(i) for i, _, _ in m.duplicate_pairs(sub, THRESHOLD))  # noqa: E731
        old = before_module()
        list(old.duplicate_pairs(sub[:4096], THRESHOLD))  # compile
        times = {"after": [], "before": []}
        for _ in range(3):  # alternating, so that the other jobs on the machine weigh on both alike
            for name, m in (("after", search), ("before", old)):
                t = time.perf_counter()
                count(m)
                times[name].append(time.perf_counter() - t)
        for name, ts in times.items():
            out[f"{name}_s"] = sorted(ts)[1]
            out[f"{name}_gflops"] = useful / out[f"{name}_s"] / 1e9
        out["pairs"] = count(search)
        out["pairs_before"] = count(old)
    elif case == "peak":
        import jax
        import jax.numpy as jnp

        a, b = (np.random.default_rng(s).normal(size=(8192, D)).astype(np.float32) for s in (0, 1))
        flops = 2 * 8192 * 8192 * D
        out["numpy_gflops"] = flops / median_s(lambda: a @ b.T, 5) / 1e9
        f = jax.jit(lambda a, b: jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST))
        ja, jb = jax.device_put(a), jax.device_put(b)
        f(ja, jb).block_until_ready()
        out["jax_gflops"] = flops / median_s(lambda: f(ja, jb).block_until_ready(), 5) / 1e9
    out["peak_mib"] = rss_mib()
    return out


def run_case(case: str, file: Path, n: int, pairs_n: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", case, "--file", str(file), "--n", str(n),
                           "--pairs-n", str(pairs_n)], capture_output=True, text=True)
    if proc.returncode:
        return {"case": case, "n": n, "error": proc.stderr.strip().splitlines()[-3:]}
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--pairs-n", type=int, default=40_000, help="rows of the exact all-pairs before/after")
    p.add_argument("--cases", nargs="+", default=["generate", "duplicates", "exact_topk", "before_topk",
                                                   "ann_topk", "faiss_flat", "pairs", "peak"])
    p.add_argument("--dir", type=Path, default=None, help="where to write the data (default: a temp folder)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.file, a.n, a.pairs_n)))
        return

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        rest = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()
                if k not in ("case", "n", "s", "peak_mib", "base_mib")}
        timing = f"{row['s']:8.1f} s" if "s" in row else " " * 10
        memory = f"{row['peak_mib']:6.0f} MiB peak" if "peak_mib" in row else " " * 15
        print(f"{row['case']:>12} {row['n']:>9,} {timing} {memory}  {json.dumps(rest)}", file=sys.stderr, flush=True)

    emit({"case": "machine", "n": a.n, **cpu()})
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        file = Path(tmp) / "emb.npy"
        for case in a.cases:
            emit(dict(run_case(case, file, a.n, a.pairs_n), load_1m=os.getloadavg()[0]))
    emit({"case": "machine", "n": a.n, **cpu()})


if __name__ == "__main__":
    main()
