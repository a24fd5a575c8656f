"""embfile: a pair whose index records the .npy's size and sha256 opens only with that very .npy; a
pair left half-replaced is refused with one line; an index written before the checksum still opens."""
import json

import numpy as np
import pytest

from contrastive_cli.errors import InputError
from contrastive_cli.infer.embed import write_pair
from contrastive_cli.infer.embfile import load_embeddings


def unit_rows(n, d=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def index_for(x, tag):
    return {"paths": [f"{tag}{i}.png" for i in range(len(x))], "root": "/data", "dim": int(x.shape[1]),
            "dtype": x.dtype.name, "normalized": True}


def test_a_pair_written_together_opens_and_records_its_checksum(tmp_path):
    x = unit_rows(5)
    write_pair(tmp_path / "e.npy", x, index_for(x, "a"))
    array, index = load_embeddings(tmp_path / "e.npy")
    np.testing.assert_array_equal(array, x)
    assert index["npy_bytes"] == (tmp_path / "e.npy").stat().st_size and len(index["npy_sha256"]) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "e.npy"]


def test_new_index_beside_old_array_same_shape_is_refused(tmp_path):
    """What a crash between the two renames leaves: the new index (renamed first) and the old
    array. Same row count, width and dtype: only the checksum tells them apart."""
    old, new = unit_rows(5, seed=0), unit_rows(5, seed=1)
    write_pair(tmp_path / "e.npy", old, index_for(old, "old"))
    old_bytes = (tmp_path / "e.npy").read_bytes()
    write_pair(tmp_path / "e.npy", new, index_for(new, "new"))
    (tmp_path / "e.npy").write_bytes(old_bytes)
    with pytest.raises(InputError) as e:
        load_embeddings(tmp_path / "e.npy")
    message = str(e.value)
    assert "\n" not in message and "sha256 differs" in message and "embed the folder again" in message


def test_a_different_size_is_refused_before_hashing(tmp_path):
    x = unit_rows(5)
    write_pair(tmp_path / "e.npy", x, index_for(x, "a"))
    index = json.loads((tmp_path / "e.json").read_text())
    np.save(tmp_path / "e.npy", np.concatenate([x, x[:1]])[:5].astype(np.float32))  # same shape
    with open(tmp_path / "e.npy", "ab") as f:
        f.write(b"\0" * 16)  # trailing bytes: np.load still reads it
    with pytest.raises(InputError, match=f"the index says {index['npy_bytes']}"):
        load_embeddings(tmp_path / "e.npy")


def test_an_index_from_before_the_checksum_still_opens(tmp_path):
    x = unit_rows(4)
    np.save(tmp_path / "e.npy", x)
    (tmp_path / "e.json").write_text(json.dumps(index_for(x, "a")))
    array, index = load_embeddings(tmp_path / "e.npy")
    assert array.shape == (4, 8) and "npy_sha256" not in index
