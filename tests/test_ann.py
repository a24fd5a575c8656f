"""The approximate index (ann.py) and the choice between it and the exact search (find.py): on a
small clustered set with planted near-copies, approximate results match the exact ones within the
recall we state (groups equal, recall@10 >= 0.95) and report exact cosines; an index is tied to the
.npy it was built from (a changed .npy makes it stale, one line, and it is rebuilt); a file at X.ann
that contrastive did not write is never replaced without --force; `contrastive index` in a real process.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from contrastive_cli.cli import app
from contrastive_cli.errors import InputError
from contrastive_cli.infer import ann
from contrastive_cli.infer.embed import write_pair
from contrastive_cli.infer.find import find_duplicates, make_index, neighbors
from contrastive_cli.infer.search import duplicate_pairs, top_k

runner = CliRunner()


def clustered(n=4000, d=32, clusters=40, seed=0, copies=60):
    """Unit rows around `clusters` centres (within-cluster cosine ~0.6), rows n-copies.. near-copies
    (cosine ~0.99) of rows 0..copies-1, and rows 0, 1 and 2 each copied twice more (groups of 3)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)] + 0.8 * rng.normal(size=(n, d)) / np.sqrt(d)
    x[n - copies:] = x[:copies] + 0.1 * rng.normal(size=(copies, d)) / np.sqrt(d)
    x[n - copies - 3:n - copies] = x[:3] + 0.1 * rng.normal(size=(3, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def write(path, x):
    write_pair(path, x, {"paths": [f"{i:05d}.png" for i in range(len(x))], "root": "/data", "dim": x.shape[1],
                         "dtype": x.dtype.name, "normalized": True})
    return path


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    return write(tmp_path_factory.mktemp("ann") / "e.npy", clustered())


def test_default_cells_follow_the_row_count():
    assert [ann.default_nlist(n) for n in (1_000_000, 100_000, 10_000, 1_000, 50, 1)] == [4096, 1024, 128, 16, 1, 1]


def test_approximate_groups_equal_exact_ones(emb):
    approx = find_duplicates(emb, 0.95, search="approximate")
    exact = find_duplicates(emb, 0.95, search="exact")
    assert approx["search"] == {"method": "approximate", "index": "IVF64,SQfp16", "nprobe": 16}
    assert exact["search"] == {"method": "exact"}
    rows = [[m["row"] for m in g["members"]] for g in approx["groups"]]
    assert rows == [[m["row"] for m in g["members"]] for g in exact["groups"]]
    assert rows[:3] == [[0, 3937, 3940], [1, 3938, 3941], [2, 3939, 3942]] and len(rows) == 60
    scores = [m["score"] for g in approx["groups"] for m in g["members"]]
    np.testing.assert_allclose(scores, [m["score"] for g in exact["groups"] for m in g["members"]], atol=1e-6)
    assert ann.ann_path(emb).is_file()  # built on first use, beside the .npy


def test_approximate_pairs_have_the_recall_we_state_and_exact_cosines(emb):
    x = np.load(emb)
    idx, _ = ann.load_index(ann.ann_path(emb), x, ann.npy_digest(emb, json.loads(emb.with_suffix(".json").read_text())))
    if idx is None:
        idx = ann.build_index(x)
    for threshold in (0.8, 0.7):  # far below the copies: thousands of within-cluster pairs
        exact = {(int(a), int(b)) for i, j, _ in duplicate_pairs(x, threshold) for a, b in zip(i, j)}
        found = {}
        for i, j, s in ann.ann_pairs(x, x, idx, threshold, upper=True, nprobe=4):
            found.update(((int(a), int(b)), float(c)) for a, b, c in zip(i, j, s))
        assert len(exact) > 1000 and set(found) <= exact
        assert len(set(found) & exact) / len(exact) >= 0.95
        pairs = np.array(list(found))
        ref = np.einsum("td,td->t", x[pairs[:, 0]].astype(np.float32), x[pairs[:, 1]].astype(np.float32))
        np.testing.assert_allclose(list(found.values()), ref, atol=1e-6)


def test_approximate_top_k_recall_against_exact(emb):
    x = np.load(emb)
    idx = ann.build_index(x, nprobe=8)
    q = x[::40].astype(np.float32)  # 100 queries
    s, i = ann.ann_top_k(q, x, idx, 10)
    ref_s, ref_i = top_k(q, x, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i, ref_i)])
    assert recall >= 0.95
    assert (np.diff(s, axis=1) <= 0).all()  # best first
    same = i == ref_i
    np.testing.assert_allclose(s[same], ref_s[same], atol=1e-6)  # exact cosines
    s, i = ann.ann_top_k(q[:3], x, idx, 5, exclude=np.array([0, 40, 80]))
    assert not {0, 40, 80} & set(i.ravel().tolist())


def test_neighbors_approximate_and_exact_agree_on_planted_copies(emb):
    a = neighbors(emb, 2, row=0, search="approximate")
    e = neighbors(emb, 2, row=0, search="exact")
    assert [n["row"] for n in a["neighbors"]] == [n["row"] for n in e["neighbors"]]
    assert {n["row"] for n in a["neighbors"]} == {3937, 3940}
    assert a["search"]["method"] == "approximate" and e["search"] == {"method": "exact"}
    assert neighbors(emb, 2, row=0)["search"] == {"method": "exact"}  # auto: 4,000 rows are searched exactly


def test_a_changed_npy_makes_the_index_stale_and_it_is_rebuilt(tmp_path):
    path = write(tmp_path / "e.npy", clustered(n=1000))
    assert make_index(path)["built"] and not make_index(path)["built"]  # the second: up to date
    header = ann.read_header(ann.ann_path(path))
    x = clustered(n=1000, seed=1)  # same shape, other rows
    write(path, x)
    loaded, why = ann.load_index(ann.ann_path(path), x, ann.npy_digest(path, json.loads(path.with_suffix(".json").read_text())))
    assert loaded is None and "\n" not in why
    assert why == f"index {ann.ann_path(path)} is out of date: the embeddings changed since it was built (their sha256 differs)"
    result = neighbors(path, 3, row=0, search="approximate")
    assert result["warnings"] == [f"{why}; building it again"]
    assert ann.read_header(ann.ann_path(path))["npy_sha256"] != header["npy_sha256"]
    assert neighbors(path, 3, row=0, search="approximate")["warnings"] == []  # loaded, not rebuilt
    write(path, clustered(n=900))
    assert "built for 1000 x 32 embeddings, not 900 x 32" in neighbors(path, 3, row=0, search="approximate")["warnings"][0]


def test_a_file_at_the_index_path_that_is_not_ours_is_kept(tmp_path):
    path = write(tmp_path / "e.npy", clustered(n=1000))
    ann.ann_path(path).write_bytes(b"my notes")
    with pytest.raises(InputError, match=r"e.ann exists and is not an index contrastive wrote; pass --force"):
        make_index(path)
    result = find_duplicates(path, 0.95, search="approximate")
    assert "e.ann exists and is not an index contrastive wrote: left as it is" in " ".join(result["warnings"])
    assert ann.ann_path(path).read_bytes() == b"my notes" and len(result["groups"]) == 60
    assert make_index(path, force=True)["built"] and ann.is_ours(ann.ann_path(path))


def test_non_finite_rows_are_not_indexed(tmp_path):
    x = clustered(n=1000)
    x[5] = np.nan
    path = write(tmp_path / "e.npy", x)
    result = find_duplicates(path, 0.95, search="approximate")
    assert "left out 1 row(s)" in result["warnings"][0]
    assert ann.read_header(ann.ann_path(path))["indexed"] == 999
    assert 5 not in [n["row"] for n in neighbors(path, 50, row=0, search="approximate")["neighbors"]]


def test_index_cli_and_its_errors(tmp_path):
    path = write(tmp_path / "e.npy", clustered(n=1000))
    result = runner.invoke(app, ["index", str(path), "--nlist", "8", "--nprobe", "2"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{ann.ann_path(path)}\n" and "IVF8,SQfp16" in result.stderr
    out = json.loads(runner.invoke(app, ["duplicates", str(path), "-t", "0.95", "--json"]).stdout)
    assert out["search"] == {"method": "exact"} and len(out["groups"]) == 60  # auto: small file, exact
    result = runner.invoke(app, ["index", str(path), "--nlist", "5000"])
    assert result.exit_code == 1 and "nlist 5000 must be between 1 and the number of rows (1000)" in result.stderr
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["index", str(tmp_path / "nope.npy")])
    assert result.exit_code == 1 and "embeddings not found" in result.stderr


@pytest.mark.slow
def test_index_then_neighbors_in_real_processes(tmp_path):
    path = write(tmp_path / "e.npy", clustered(n=1000))
    cmd = [sys.executable, "-m", "contrastive_cli"]
    built = subprocess.run([*cmd, "index", str(path)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0 and built.stdout.strip() == str(ann.ann_path(path)), built.stderr
    found = subprocess.run([*cmd, "neighbors", str(path), "--row", "0", "-k", "2", "--nprobe", "4", "--json"],
                           capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr
    out = json.loads(found.stdout)
    assert [n["row"] for n in out["neighbors"]] == [937, 940] and out["search"] == {"method": "exact"}  # 1,000 rows
