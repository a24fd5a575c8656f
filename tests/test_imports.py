"""The house: importing changes nothing in the process, --help starts no second process, and the
package's modules import each other in layers that only point down (function-level imports too)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "contrastive_cli"
# Lower layers first; a module may import its own layer or any layer before it, never one after.
LAYERS = [
    {"errors", "config", "files", "mesh", "checkpoint", "plot", "processor"},
    {"nn"},
    {"data"},
    {"infer"},
    {"train"},
    {"perf"},  # the opt-in wing: lazily imported by nn.conv and train.loop, it may import train
    {"console", "cli", "__init__", "__main__"},
]
# The wing's imports from below it that are allowed to be lazy (inside a function), with a fallback.
LAZY_UP = {("nn.conv", "perf.fastconv"), ("train.loop", "perf.stepcache")}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" and len(rel.parts) > 1 else rel.parts
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path) -> set[tuple[str, bool]]:
    """(imported module of the package, whether at module level) for every import in the file."""
    tree = ast.parse(path.read_text())
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if name == "__init__":
        package = []
    top_level = {id(n) for n in tree.body}
    known = modules()
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}".strip(".") in known else mod for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("contrastive_cli"):
            targets = [node.module.removeprefix("contrastive_cli").lstrip(".")]
        elif isinstance(node, ast.Import):
            targets = [a.name.removeprefix("contrastive_cli").lstrip(".") for a in node.names
                       if a.name.startswith("contrastive_cli")]
        else:
            continue
        for t in targets:
            t = t.strip(".") or "__init__"
            if t in known and t != name:
                out.add((t, id(node) in top_level))
    return out


def layer(name: str) -> int:
    head = name.split(".")[0]
    return next(i for i, group in enumerate(LAYERS) if head in group)


def test_the_import_graph_has_no_cycle_and_points_down():
    graph = {name: imports(name, path) for name, path in modules().items()}
    assert graph["train.probe"] and graph["cli"]  # the parser sees imports (the test can fail)
    upward = [(a, b) for a, targets in graph.items() for b, _ in targets
              if layer(b) > layer(a) and (a, b) not in LAZY_UP]
    assert upward == []
    lazy_ok = all(not top for a, targets in graph.items() for b, top in targets if (a, b) in LAZY_UP)
    assert lazy_ok, "the wing is imported lazily, inside a function with a fallback"
    # No cycle among the modules, counting function-level imports too.
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt, _ in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_inference_and_data_never_import_training():
    graph = {name: imports(name, path) for name, path in modules().items()}
    for name, targets in graph.items():
        if name.startswith(("infer", "data", "nn")):
            assert not [t for t, _ in targets if t.startswith(("train", "perf.stepcache"))], name


def test_no_module_reaches_into_jax_private_modules():
    for name, path in modules().items():
        assert "jax._src" not in path.read_text(), name


SIDE_EFFECTS = """
import json, logging, os, sys
first = {{k: os.environ.get(k) for k in ("XLA_FLAGS", "GLIBC_TUNABLES", "MALLOC_ARENA_MAX")}}
import contrastive_cli  # before JAX, as a user's script would: the old package set XLA_FLAGS here
import jax  # then: JAX sets TF_CPP_MIN_LOG_LEVEL and TPU_SKIP_MDS_QUERY itself when imported
before = dict(os.environ)
absl = logging.getLogger("absl").level
import contrastive_cli
import contrastive_cli.{module}
out = {{
    "flags_changed": [k for k, v in first.items() if os.environ.get(k) != v],
    "environ_changed": sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)),
    "absl_changed": logging.getLogger("absl").level != absl,
    "compilation_cache": jax.config.jax_compilation_cache_dir,
    "perf_malloc_imported": "contrastive_cli.perf.malloc" in sys.modules,
}}
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("module", ["cli", "train.loop", "infer.embed", "infer.evaluate", "infer.search",
                                    "perf.stepcache", "perf.fastconv"])
def test_importing_the_library_leaves_the_process_alone(module):
    """No environment variable (XLA_FLAGS, GLIBC_TUNABLES, ...), logger or JAX setting changes, and
    the malloc tuning is not even imported: it only runs when the CLI switches the wing on."""
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HOME": "/nonexistent"}
    out = subprocess.run([sys.executable, "-c", SIDE_EFFECTS.format(module=module)], env=env,
                         capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout)
    assert seen == {"flags_changed": [], "environ_changed": [], "absl_changed": False, "compilation_cache": None,
                    "perf_malloc_imported": False}


@pytest.mark.slow
def test_importing_the_package_imports_no_jax():
    code = "import sys, contrastive_cli; print('jax' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# The console entry point with os.execve replaced: a re-exec would print EXEC and exit 3.
ENTRY = """
import os, sys
def execve(*args):
    print("EXEC", flush=True)
    os._exit(3)
os.execve = execve
sys.argv = ["contrastive", *sys.argv[1:]]
from contrastive_cli.cli import main
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--help"], ["pretrain", "--help"], ["--version"]])
def test_help_and_version_start_no_second_process(args):
    out = subprocess.run([sys.executable, "-c", ENTRY, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "EXEC" not in out.stdout


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")
def test_a_training_command_does_restart_once_with_the_malloc_tunables(tmp_path):
    """The check above can fail: the same entry point re-executes for pretrain (before decoding)."""
    from contrastive_cli.perf import malloc

    if malloc.malloc_tunables_environ({}) is None:
        pytest.skip("glibc older than 2.35: no tunables to restart for")
    (tmp_path / "imgs").mkdir()
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", ENTRY, "pretrain", str(tmp_path / "imgs"), "--steps", "1"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 3 and "EXEC" in out.stdout
