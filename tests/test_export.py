"""export: the ONNX model in ONNX Runtime, the safetensors file reloaded into Flax, and the StableHLO
artifact in a fresh process without this package all give the features `embed` writes; exported
files run as `--model` for embed, similarity and neighbors; nothing is overwritten without --force."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hostile import write_good_folder
from typer.testing import CliRunner

from contrastive_cli.cli import app
from contrastive_cli.infer.embfile import load_embeddings
from contrastive_cli.infer.encoder import load_encoder
from contrastive_cli.infer.export import read_safetensors
from contrastive_cli.infer.portable import ExportedEncoder, OnnxEncoder, load_model, load_run_quickly

pytestmark = pytest.mark.slow  # trains runs

runner = CliRunner()


def pretrain(root, encoder):
    folder = write_good_folder(root / "images", n=9, size=20)
    run = root / f"run-{encoder}"
    result = runner.invoke(app, ["pretrain", str(folder), "-o", str(run), "--steps", "1", "--batch-size", "4",
                                 "--image-size", "16", "--encoder", encoder, "--quiet"])
    assert result.exit_code == 0, result.output
    return folder, run


RUNS = {}  # encoder -> (folder, run): each trained once for the module


@pytest.fixture(scope="module", params=["small", "resnet18"])
def trained(request, tmp_path_factory):
    if request.param not in RUNS:
        RUNS[request.param] = pretrain(tmp_path_factory.mktemp(request.param), request.param)
    return RUNS[request.param]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    if "small" not in RUNS:
        RUNS["small"] = pretrain(tmp_path_factory.mktemp("small"), "small")
    return RUNS["small"]


def images(folder, n):
    """uint8 [n, 16, 16, 3]: the folder's first n images decoded as embed decodes them."""
    from contrastive_cli.data.decode import decode_or_reason

    return np.stack([decode_or_reason(p, 16) for p in sorted(folder.iterdir())[:n]])


def export(run, out, *extra):
    result = runner.invoke(app, ["export", str(run), "-o", str(out), *extra])
    return result


def test_onnx_in_onnx_runtime_gives_embed_features(trained, tmp_path):
    import onnxruntime as ort

    folder, run = trained
    out = tmp_path / "encoder.onnx"
    result = export(run, out)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    about = json.loads(session.get_modelmeta().custom_metadata_map["contrastive"])
    assert about["image_size"] == 16 and about["step"] == 1 and about["layout"] == "NHWC"
    encoder = load_encoder(run)  # the run's own convolution (winograd on CPU), as embed runs it
    for n in (1, 7):  # dynamic batch size
        x = images(folder, n)
        got = session.run(None, {"images": x})[0]
        assert got.shape == (n, encoder.dim)
        np.testing.assert_allclose(got, encoder.embed(x), atol=1e-4)


def test_onnx_float_and_nchw_inputs(small, tmp_path):
    import onnxruntime as ort

    folder, run = small
    out = tmp_path / "f.onnx"
    assert export(run, out, "--input", "float32", "--nchw").exit_code == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = images(folder, 3)
    got = session.run(None, {"images": (x.astype(np.float32) / 255).transpose(0, 3, 1, 2)})[0]
    np.testing.assert_allclose(got, load_encoder(run).embed(x), atol=1e-4)


def test_safetensors_reloads_into_the_flax_model(trained, tmp_path):
    from safetensors import safe_open

    folder, run = trained
    out = tmp_path / "encoder.safetensors"
    assert export(run, out, "-f", "safetensors").exit_code == 0
    with safe_open(str(out), framework="numpy") as f:
        names = set(f.keys())
        about = json.loads(f.metadata()["contrastive"])
    assert "centre" in names and any(n.startswith("stats.encoder.") and n.endswith(".mean") for n in names)
    assert about["config"]["model"]["encoder"] == run.name.split("-")[1]
    x = images(folder, 7)
    np.testing.assert_array_equal(read_safetensors(out).embed(x), load_encoder(run, conv="xla").embed(x))


STABLEHLO_READER = """
import sys, numpy as np, jax
exported = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
np.save(sys.argv[3], np.asarray(exported.call(np.load(sys.argv[2]))))
assert not any(m.startswith("contrastive_cli") for m in sys.modules), "imported the package"
"""


def test_stablehlo_runs_in_a_fresh_process_without_the_package(trained, tmp_path):
    folder, run = trained
    out = tmp_path / "encoder.stablehlo"
    assert export(run, out, "-f", "stablehlo").exit_code == 0
    x = images(folder, 7)
    np.save(tmp_path / "x.npy", x)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", STABLEHLO_READER, str(out), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), load_encoder(run).embed(x), atol=1e-5)


def test_export_never_overwrites_without_force(small, tmp_path):
    _, run = small
    out = tmp_path / "mine.onnx"
    out.write_bytes(b"the user's own file")
    result = export(run, out)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {out} already exists; pass --force to replace it"
    assert out.read_bytes() == b"the user's own file"
    assert export(run, out, "--force").exit_code == 0
    assert out.read_bytes()[:4] != b"the "
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.onnx"]  # no temporary file left
    bad = export(run, tmp_path / "x.stablehlo", "-f", "stablehlo", "--nchw")
    assert bad.exit_code == 1 and "--nchw" in bad.stderr and "Traceback" not in bad.output


def test_exported_files_embed_like_the_run(small, tmp_path):
    folder, run = small
    ref = tmp_path / "run.npy"
    assert runner.invoke(app, ["embed", str(folder), "-m", str(run), "-o", str(ref)]).exit_code == 0
    want, _ = load_embeddings(ref)
    for fmt in ("onnx", "stablehlo", "safetensors"):
        model = tmp_path / f"encoder.{fmt}"
        assert export(run, model, "-f", fmt).exit_code == 0
        out = tmp_path / f"{fmt}.npy"
        result = runner.invoke(app, ["embed", str(folder), "-m", str(model), "-o", str(out)])
        assert result.exit_code == 0, result.output
        got, index = load_embeddings(out)
        assert index["paths"] == load_embeddings(ref)[1]["paths"] and index["model"] == str(model.resolve())
        np.testing.assert_allclose(got, want, atol=1e-4)
    a, b = sorted(folder.iterdir())[:2]
    scores = {m: runner.invoke(app, ["similarity", str(a), str(b), "-m", str(m)]).stdout
              for m in (run, tmp_path / "encoder.onnx", tmp_path / "encoder.stablehlo")}
    assert len({round(float(s), 4) for s in scores.values()}) == 1, scores
    found = runner.invoke(app, ["neighbors", str(ref), "--query", str(a), "-m", str(tmp_path / "encoder.onnx"),
                                "--json", "-k", "1"])
    assert Path(json.loads(found.stdout)["neighbors"][0]["path"]).name == a.name  # itself, cosine 1


def foreign_onnx(path, size=12):
    """An ONNX model we did not write: float NCHW [B, 3, size, size] in, each channel's mean out."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)], "foreign",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_an_onnx_encoder_from_elsewhere(tmp_path):
    folder = write_good_folder(tmp_path / "images", n=4, size=20)
    foreign_onnx(tmp_path / "theirs.onnx")
    encoder = load_model(tmp_path / "theirs.onnx")
    assert isinstance(encoder, OnnxEncoder) and encoder.image_size == 12 and encoder.dim == 3
    out = tmp_path / "e.npy"
    result = runner.invoke(app, ["embed", str(folder), "-m", str(tmp_path / "theirs.onnx"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    from contrastive_cli.data.decode import decode_or_reason

    x = np.stack([decode_or_reason(p, 12) for p in sorted(folder.iterdir())]).astype(np.float32) / 255
    mean = ((x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).mean(axis=(1, 2))  # torchvision's preprocessing
    np.testing.assert_allclose(load_embeddings(out)[0], mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-5)


def test_bad_model_files_are_one_line(tmp_path):
    folder = write_good_folder(tmp_path / "images", n=2)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    (tmp_path / "junk.stablehlo").write_bytes(b"not a model")
    for model, words in (("junk.onnx", "cannot load the ONNX model"), ("junk.stablehlo", "is not a StableHLO export"),
                         ("missing.onnx", "model file not found")):
        result = runner.invoke(app, ["embed", str(folder), "-m", str(tmp_path / model), "-o", str(tmp_path / "e.npy")])
        assert result.exit_code == 1, result.output
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


MISSING_RUNTIME = """
import sys
from pathlib import Path
sys.modules["onnxruntime"] = None  # as if contrastive[onnx] were not installed
from contrastive_cli.errors import InputError
from contrastive_cli.infer.portable import load_model
try:
    load_model(sys.argv[1])
except InputError as e:
    print(e)
"""


def test_without_onnx_runtime_one_line_says_what_to_install(tmp_path):
    foreign_onnx(tmp_path / "m.onnx")
    done = subprocess.run([sys.executable, "-c", MISSING_RUNTIME, str(tmp_path / "m.onnx")], capture_output=True,
                          text=True)
    assert done.stdout.strip() == "running an ONNX model needs ONNX Runtime: pip install 'contrastive[onnx]'"


def test_a_run_is_cached_for_quick_queries_and_the_cache_follows_the_checkpoint(small, tmp_path, monkeypatch):
    folder, run = small
    monkeypatch.setenv("CONTRASTIVE_CACHE_DIR", str(tmp_path / "cache"))
    x = images(folder, 3)
    first = load_run_quickly(run)  # read from the checkpoint, then cached
    second = load_run_quickly(run)
    assert not isinstance(first, ExportedEncoder) and isinstance(second, ExportedEncoder)
    assert second.step == first.step == 1 and second.name == "small"
    np.testing.assert_allclose(second.embed(x), first.embed(x), atol=1e-5)
    weights = next((run / "checkpoints" / "1" / "model").rglob("*.ocdbt"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # touched
    assert not isinstance(load_run_quickly(run), ExportedEncoder)  # read (and checked) again
