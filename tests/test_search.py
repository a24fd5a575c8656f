"""Search: top_k and duplicate pairs agree exactly with brute-force NumPy for any chunking; near-duplicate
groups find planted copies of real images; load_embeddings' messages; the neighbors/duplicates CLI.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from contrastive_cli.cli import app
from contrastive_cli.errors import InputError
from contrastive_cli.infer.search import _flatten, _union, duplicate_groups, duplicate_pairs, load_embeddings, top_k

runner = CliRunner()
FASHION = Path(__file__).parent.parent / "examples" / "fashion-mnist"


def unit_rows(n, d=16, seed=0, dtype=np.float32):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def brute_top_k(q, x, k):
    s = np.clip(q.astype(np.float64) @ x.astype(np.float64).T, -1, 1)
    i = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, i, axis=1), i


def brute_pairs(x, threshold, y=None):
    s = x.astype(np.float64) @ (x if y is None else y).astype(np.float64).T
    keep = s >= threshold
    if y is None:
        keep &= np.triu(np.ones_like(keep), 1)
    return set(zip(*np.nonzero(keep)))


def write_embeddings(path, x, paths=None, root="/data", model="/runs/a"):
    np.save(path, x)
    index = {"paths": paths or [f"img{i:03d}.png" for i in range(len(x))], "root": root, "model": model,
             "dim": int(x.shape[1]), "normalized": True, "dtype": x.dtype.name}
    path.with_suffix(".json").write_text(json.dumps(index))
    return path


# --- top_k --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, chunk, k", [
    (50, 16, 5),  # N not a multiple of the chunk
    (50, 8, 20),  # k > chunk
    (50, 16, 50),  # k == N
    (50, 64, 3),  # one chunk bigger than N
    (50, 1, 2),  # one row at a time
])
def test_top_k_equals_brute_force(n, chunk, k):
    x, q = unit_rows(n), unit_rows(7, seed=1)
    s, i = top_k(q, x, k, chunk=chunk)
    ref_s, ref_i = brute_top_k(q, x, k)
    assert s.shape == i.shape == (7, k) and s.dtype == np.float32 and i.dtype == np.int64
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-6)


def test_top_k_leaves_out_invalid_rows_and_puts_the_earlier_of_equal_rows_first():
    x = unit_rows(30, seed=3)
    x[[4, 17, 25]] = x[9]  # four equal rows, 17 left out below
    valid = np.ones(30, bool)
    valid[[17, 2]] = False
    for chunk in (30, 7, 1):
        s, i = top_k(x[9], x, 5, chunk=chunk, valid=valid)
        assert i[0, :3].tolist() == [4, 9, 25] and np.allclose(s[0, :3], 1.0) and s[0, 3] < 1 - 1e-3
        assert not {2, 17} & set(i[0].tolist())


def test_top_k_float16_and_memmap(tmp_path):
    x = unit_rows(40, seed=2, dtype=np.float16)
    x16, _ = load_embeddings(write_embeddings(tmp_path / "e.npy", x))
    assert isinstance(x16, np.memmap) and x16.dtype == np.float16
    q = x[:3]
    ref_s, ref_i = brute_top_k(q.astype(np.float32), x.astype(np.float32), 6)
    for _ in range(2):  # a second pass reads pages the first one released
        s, i = top_k(q, x16, 6, chunk=16)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_allclose(s, ref_s, atol=1e-6)
        assert (i[:, 0] == [0, 1, 2]).all()


@pytest.mark.parametrize("k", [0, 41])
def test_top_k_rejects_k_out_of_range(k):
    with pytest.raises(InputError, match=f"k = {k} must be between 1 and the number of embeddings \\(40\\)"):
        top_k(unit_rows(1), unit_rows(40), k)


def test_top_k_rejects_queries_of_another_width():
    with pytest.raises(InputError, match=r"queries have shape \(2, 8\); expected \[Q, 16\]"):
        top_k(unit_rows(2, d=8), unit_rows(10), 3)


# --- duplicate pairs and groups -----------------------------------------------------------------

def planted(n=60, seed=3):
    """Random unit rows with copies: 7 and 40 of row 3, 50 of row 10 (slightly moved)."""
    x = unit_rows(n, seed=seed)
    x[7] = x[40] = x[3]
    x[50] = x[10] + 0.05 * unit_rows(1, seed=9)[0]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("chunk", [7, 16, 60, 1000])
def test_duplicate_pairs_equal_brute_force(chunk):
    x = planted()
    for threshold in (0.99, 0.5):
        got = [tuple(map(int, p)) for i, j, s in duplicate_pairs(x, threshold, chunk=chunk) for p in zip(i, j)]
        assert sorted(got) == sorted(brute_pairs(x, threshold)) and len(got) == len(set(got))
    assert sorted(brute_pairs(x, 0.99)) == [(3, 7), (3, 40), (7, 40), (10, 50)]


def test_duplicate_pairs_across_two_sets():
    x, y = planted(), unit_rows(25, seed=4)
    y[5], y[24] = x[10], x[59]
    for chunk in (4, 64):
        found = [(int(a), int(b), float(c)) for i, j, s in duplicate_pairs(x, 0.5, other=y, chunk=chunk)
                 for a, b, c in zip(i, j, s)]
        assert {(a, b) for a, b, _ in found} == brute_pairs(x, 0.5, y)
    assert {(a, b) for a, b, s in found if s > 0.99} == {(10, 5), (50, 5), (59, 24)}


def test_duplicate_groups_are_transitive_and_largest_first():
    x = planted()
    progress = []
    groups = duplicate_groups(x, 0.99, chunk=16, on_progress=lambda done, total: progress.append((done, total)))
    assert [g.rows.tolist() for g in groups] == [[3, 7, 40], [10, 50]]
    np.testing.assert_allclose(groups[0].scores, 1.0, atol=1e-6)
    assert 0.99 < groups[1].scores[0] == groups[1].scores[1] < 1
    assert progress == [(t, 10) for t in range(1, 11)]  # 4 row blocks: 4 + 3 + 2 + 1 blocks
    # a chain a~b~c with cos(a, c) below the threshold is one group
    a = np.array([1.0, 0, 0])
    b = np.array([np.cos(0.1), np.sin(0.1), 0])
    c = np.array([np.cos(0.2), np.sin(0.2), 0])
    chain = np.stack([c, unit_rows(1, d=3)[0], a, b]).astype(np.float32)
    assert [g.rows.tolist() for g in duplicate_groups(chain, np.cos(0.15))] == [[0, 2, 3]]
    assert duplicate_groups(unit_rows(30), 0.999) == []


def test_union_find_matches_a_plain_one():
    rng = np.random.default_rng(5)
    n = 200
    i, j = rng.integers(0, n, (2, 150))
    parent = np.arange(n)
    for lo in range(0, 150, 40):  # blocks of pairs, as duplicate_groups feeds them
        _union(parent, i[lo:lo + 40], j[lo:lo + 40])
    roots = _flatten(parent)
    ref = list(range(n))

    def find(a):
        while ref[a] != a:
            a = ref[a]
        return a

    for a, b in zip(i, j):
        ref[find(a)] = find(b)
    same = roots[:, None] == roots[None, :]
    ref_roots = np.array([find(a) for a in range(n)])
    np.testing.assert_array_equal(same, ref_roots[:, None] == ref_roots[None, :])


def test_duplicate_pairs_validates_at_the_call():
    with pytest.raises(InputError, match="threshold 1.5 is not a cosine"):
        duplicate_pairs(unit_rows(5), 1.5)
    with pytest.raises(InputError, match="different widths: 16 and 8"):
        duplicate_pairs(unit_rows(5), 0.9, other=unit_rows(5, d=8))


# --- load_embeddings ----------------------------------------------------------------------------

def test_load_embeddings_messages(tmp_path):
    with pytest.raises(InputError, match="embeddings not found: .*nope.npy"):
        load_embeddings(tmp_path / "nope.npy")
    np.save(tmp_path / "e.npy", unit_rows(4))
    with pytest.raises(InputError, match=r"index .*e.json not found beside .*e.npy"):
        load_embeddings(tmp_path / "e.npy")
    write_embeddings(tmp_path / "e.npy", unit_rows(4), paths=["a.png", "b.png", "c.png"])
    with pytest.raises(InputError, match="lists 3 paths but .*e.npy has 4 rows"):
        load_embeddings(tmp_path / "e.npy")
    (tmp_path / "e.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read index"):
        load_embeddings(tmp_path / "e.npy")
    write_embeddings(tmp_path / "e.npy", np.zeros((2, 3, 4), np.float32), paths=["a", "b"])
    with pytest.raises(InputError, match=r"shape \(2, 3, 4\); expected a 2-D \[N, D\]"):
        load_embeddings(tmp_path / "e.npy")
    write_embeddings(tmp_path / "e.npy", np.zeros((2, 3), np.int64))
    with pytest.raises(InputError, match="dtype int64; expected float32 or float16"):
        load_embeddings(tmp_path / "e.npy")
    (tmp_path / "t.npy").write_text("hello")
    with pytest.raises(InputError, match="cannot read .*t.npy as a .npy array"):
        load_embeddings(tmp_path / "t.npy")
    x, index = load_embeddings(write_embeddings(tmp_path / "e.npy", unit_rows(4, dtype=np.float16)))
    assert x.shape == (4, 16) and index["dtype"] == "float16"


# --- real images: planted copies and light edits of Fashion-MNIST -------------------------------

THRESHOLD = 0.985  # see planted_folder: distinct images stay below 0.971, copies and edits above 0.997


@pytest.fixture(scope="module")
def planted_folder(tmp_path_factory):
    """A 3-step run on examples/fashion-mnist, and the embeddings of 43 distinct images plus, for 4 of
    them, an exact copy, a JPEG at quality 85 and a 2x bicubic upscale.

    Measured here (float16, embeddings centred on the run's mean feature): distinct images reach
    cosine 0.971 (median -0.02), the copies and these edits stay above 0.997, so 0.985 separates
    them. (Before centring, this barely-trained encoder put every image above 0.99: distinct pairs
    reached 0.9966, copies 0.9996, a margin of 0.003 instead of 0.026.)
    """
    root = tmp_path_factory.mktemp("planted")
    run = root / "run"
    result = runner.invoke(app, ["pretrain", str(FASHION), "--steps", "3", "-b", "16", "--quiet", "-o", str(run)])
    assert result.exit_code == 0, result.output
    folder = root / "images"
    folder.mkdir()
    originals = sorted(FASHION.rglob("*.png"))[::7]
    for f in originals:
        shutil.copy(f, folder / f"{f.parent.name}-{f.stem}.png")
    planted = {}
    for f in originals[::11]:
        name = f"{f.parent.name}-{f.stem}"
        im = Image.open(f)
        shutil.copy(f, folder / f"{name}-copy.png")
        im.convert("RGB").save(folder / f"{name}-q85.jpg", quality=85)
        im.resize((2 * im.width, 2 * im.height), Image.BICUBIC).save(folder / f"{name}-up.png")
        planted[f"{name}.png"] = {f"{name}-copy.png", f"{name}-q85.jpg", f"{name}-up.png"}
    emb = root / "emb.npy"
    result = runner.invoke(app, ["embed", str(folder), "-m", str(run), "-o", str(emb), "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    return emb, folder, run, planted


@pytest.mark.slow
def test_planted_copies_group_with_their_originals(planted_folder):
    emb, folder, run, planted = planted_folder
    x, index = load_embeddings(emb)
    assert len(x) == 43 + 12 and x.dtype == np.float16
    groups = [{index["paths"][r] for r in g.rows} for g in duplicate_groups(x, THRESHOLD, chunk=16)]
    assert sorted(map(sorted, groups)) == sorted(sorted({o} | c) for o, c in planted.items())
    # the margin this threshold rests on, measured
    s = x.astype(np.float32) @ x.astype(np.float32).T
    base = [p.split("-copy")[0].split("-q85")[0].split("-up")[0].split(".")[0] for p in index["paths"]]
    same = np.equal.outer(base, base)
    off = ~np.eye(len(x), dtype=bool)
    assert s[same & off].min() > THRESHOLD > s[~same].max()


@pytest.mark.slow
def test_neighbors_of_an_image_file_finds_its_copies(planted_folder):
    emb, folder, run, planted = planted_folder
    original = sorted(planted)[0]
    result = runner.invoke(app, ["neighbors", str(emb), "--query", str(folder / original), "-k", "4", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["model"] == str(run.resolve())  # taken from the index
    assert {Path(n["path"]).name for n in out["neighbors"]} == {original} | planted[original]
    assert out["neighbors"][0]["cosine"] > 0.999


# --- CLI ----------------------------------------------------------------------------------------

@pytest.fixture
def emb(tmp_path):
    return write_embeddings(tmp_path / "e.npy", planted(), root=str(tmp_path))


@pytest.mark.slow
def test_help_lists_the_commands_without_importing_jax():
    code = ("import sys; from typer.testing import CliRunner; from contrastive_cli.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert 'jax' not in sys.modules, 'jax imported'; print(r.stdout)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "neighbors" in out.stdout and "duplicates" in out.stdout
    for command in ("neighbors", "duplicates"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "--json" in result.stdout and "--csv" in result.stdout


@pytest.mark.slow
def test_neighbors_by_row_and_path_leave_the_query_out(emb):
    result = runner.invoke(app, ["neighbors", str(emb), "--row", "3", "-k", "3"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["rank", "row", "cosine", "path"] and len(lines) == 4
    assert [line.split()[1] for line in lines[1:3]] == ["7", "40"] and lines[3].split()[1] != "3"
    assert lines[1].split()[3] == str(emb.parent / "img007.png")
    result = runner.invoke(app, ["neighbors", str(emb), "--path", "img010.png", "-k", "2", "--csv"])
    assert result.exit_code == 0, result.output
    rows = [line.split(",") for line in result.stdout.splitlines()]
    assert rows[0] == ["rank", "row", "path", "cosine"] and rows[1][:3] == ["1", "50", str(emb.parent / "img050.png")]
    assert 0.99 < float(rows[1][3]) < 1 and len(rows) == 3
    by_file = runner.invoke(app, ["neighbors", str(emb), "--path", str(emb.parent / "img010.png"), "-k", "2", "--csv"])
    assert by_file.stdout == result.stdout
    result = runner.invoke(app, ["neighbors", str(emb), "--row", "0", "-k", "100", "--json"])
    out = json.loads(result.stdout)
    assert len(out["neighbors"]) == 59 and 0 not in [n["row"] for n in out["neighbors"]]
    assert "only 59 other rows" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args, code, message", [
    (["--row", "1", "--path", "img001.png"], 2, "exactly one of"),
    ([], 2, "exactly one of"),
    (["--row", "1", "--json", "--csv"], 2, "not both"),
    (["--row", "1", "--model", "run"], 2, "only used with --query"),
    (["--row", "60"], 1, "row 60 is out of range"),
    (["--path", "nope.png"], 1, "nope.png is not in the index"),
    (["--query", "nope.png"], 1, "image not found: nope.png"),
])
def test_neighbors_usage_errors(emb, args, code, message):
    result = runner.invoke(app, ["neighbors", str(emb), *args])
    assert result.exit_code == code and message in " ".join(result.stderr.split()), result.stderr
    assert result.stdout == ""


@pytest.mark.slow
def test_duplicates_csv_json_and_cross(emb, tmp_path):
    result = runner.invoke(app, ["duplicates", str(emb), "--threshold", "0.99"])
    assert result.exit_code == 0, result.output
    rows = [line.split(",") for line in result.stdout.splitlines()]
    assert rows[0] == ["group", "row", "path", "score"]
    assert [(g, r) for g, r, _, _ in rows[1:]] == [("1", "3"), ("1", "7"), ("1", "40"), ("2", "10"), ("2", "50")]
    assert "2 groups holding 5 of 60 images" in result.stderr
    out = json.loads(runner.invoke(app, ["duplicates", str(emb), "-t", "0.99", "--json"]).stdout)
    assert [[m["row"] for m in g["members"]] for g in out["groups"]] == [[3, 7, 40], [10, 50]]
    other = write_embeddings(tmp_path / "o.npy", planted()[[50, 20]], paths=["x.png", "y.png"], root="/other")
    result = runner.invoke(app, ["duplicates", str(emb), "-t", "0.99", "--cross", str(other)])
    rows = [line.split(",") for line in result.stdout.splitlines()]
    assert rows[0] == ["row", "path", "other_row", "other_path", "score"]
    assert sorted((r[0], r[2], r[3]) for r in rows[1:]) == [("10", "0", "/other/x.png"), ("20", "1", "/other/y.png"),
                                                            ("50", "0", "/other/x.png")]
    pairs = json.loads(runner.invoke(app, ["duplicates", str(emb), "-t", "0.99", "--cross", str(other), "--json"]).stdout)["pairs"]
    assert [p["score"] for p in pairs] == sorted((p["score"] for p in pairs), reverse=True)


@pytest.mark.slow
@pytest.mark.parametrize("args, code, message", [
    (["-t", "1.5"], 2, "--threshold"),
    ([], 2, "--threshold"),
    (["-t", "0.9", "--cross", "nope.npy"], 1, "embeddings not found: nope.npy"),
])
def test_duplicates_usage_errors(emb, args, code, message):
    result = runner.invoke(app, ["duplicates", str(emb), *args])
    assert result.exit_code == code and message in result.stderr, result.stderr
    result = runner.invoke(app, ["duplicates", str(emb.parent / "missing.npy"), "-t", "0.9"])
    assert result.exit_code == 1 and "embeddings not found" in result.stderr


# --- rows that are not finite ------------------------------------------------------------------

def with_bad_rows(path):
    """planted() with row 5 NaN, row 12 +inf and row 30 partly -inf: they would rank first (NaN) or
    score 1 against everything (inf clipped), and join every group."""
    x = planted()
    x[5] = np.nan
    x[12] = np.inf
    x[30, :3] = -np.inf
    return write_embeddings(path, x, root=str(path.parent))


def test_top_k_and_pairs_leave_invalid_rows_out():
    x = planted()
    valid = np.ones(len(x), bool)
    valid[[7, 20]] = False
    s, i = top_k(x[3], x, 58, chunk=16, valid=valid)
    assert 7 not in i[0] and 20 not in i[0] and sorted(i[0]) == sorted(set(range(60)) - {7, 20})
    pairs = {(int(a), int(b)) for p, q, _ in duplicate_pairs(x, 0.99, chunk=7, valid=valid) for a, b in zip(p, q)}
    assert pairs == {(3, 40), (10, 50)}
    with pytest.raises(InputError, match="between 1 and the number of embeddings \\(58 finite\\)"):
        top_k(x[3], x, 59, valid=valid)
    with pytest.raises(InputError, match="not finite"):
        top_k(np.full((1, 16), np.nan, np.float32), x, 3)


def test_neighbors_and_duplicates_skip_rows_that_are_not_finite(tmp_path):
    emb = with_bad_rows(tmp_path / "e.npy")
    result = runner.invoke(app, ["neighbors", str(emb), "--row", "3", "-k", "60", "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)["neighbors"]
    assert [n["row"] for n in found[:2]] == [7, 40] and len(found) == 56
    assert not {5, 12, 30} & {n["row"] for n in found}
    warning = " ".join(result.stderr.split())
    assert "left out 3 row(s) that are not finite (NaN or infinite), rows 5, 12, 30" in warning
    result = runner.invoke(app, ["duplicates", str(emb), "-t", "0.99", "--json"])
    assert result.exit_code == 0, result.output
    assert [[m["row"] for m in g["members"]] for g in json.loads(result.stdout)["groups"]] == [[3, 7, 40], [10, 50]]
    assert "left out 3 row(s)" in result.stderr
    other = write_embeddings(tmp_path / "o.npy", np.stack([planted()[10], np.full(16, np.nan, np.float32)]),
                             paths=["x.png", "nan.png"], root="/other")
    result = runner.invoke(app, ["duplicates", str(emb), "-t", "-1", "--cross", str(other), "--json"])
    pairs = json.loads(result.stdout)["pairs"]
    assert {p["other_row"] for p in pairs} == {0} and not {5, 12, 30} & {p["row"] for p in pairs}
    assert f"{other}: left out 1 row(s)" in " ".join(result.stderr.split())


def test_a_query_row_that_is_not_finite_is_one_line(tmp_path):
    emb = with_bad_rows(tmp_path / "e.npy")
    result = runner.invoke(app, ["neighbors", str(emb), "--row", "5"])
    assert result.exit_code == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "row 5" in lines[0] and "is not finite" in " ".join(result.stderr.split())
