"""Quality harness (issue 19): the protocol users live, on the labeled sets of sets.py, against
raw pixels and the peer (lightly), same budget, same machine, same script.

    python benchmarks/quality/sets.py --root .bench/quality                      # once
    python benchmarks/quality/harness.py --root .bench/quality --minutes 10 --seeds 0 1 \
        --methods pixels ours ours-transfer lightly --out results.jsonl --tag defaults
    python benchmarks/quality/harness.py --summary results.jsonl                  # markdown tables

Methods, per set and seed S (runs go to ROOT/runs/<tag>/):
  pixels          each image read at 32 x 32 (PIL box filter), centred (its own mean removed) and
                  L2-normalised; S only orders the probe's minibatches
  ours            contrastive pretrain ROOT/SET/unlabeled --time-budget M --seed S --output RUN
                  [--extra flags], all else default; contrastive embed of train/ and test/ (defaults)
  ours-transfer   the same, pretrained once per seed on ROOT/mix (no image of any set), then used
                  to embed every set
  lightly         ../shared/peers/lightly_simclr_quality.py (its defaults: small CNN, batch 256,
                  SimCLRTransform, NT-Xent T=0.5, SGD) with the peer venv .peer/bin/python, --minutes M
                  on ROOT/SET/unlabeled; the script seeds torch with 0, so the harness replaces its
                  torch.manual_seed(0) by torch.manual_seed(S) (the script itself is unchanged)
  lightly-transfer  the peer pretrained on ROOT/mix, as ours-transfer
Scores, on the set's fixed train/test split (test held out by source, see each manifest.json):
  knn     k = 20 nearest train embeddings by cosine, votes weighted by exp(s / 0.07)
          (contrastive_cli.infer.knn.knn_accuracy, as `contrastive evaluate`)
  linear  logistic regression on standardised frozen features, Adam, 100 epochs, weight decay 1e-4
          (contrastive_cli.infer.evaluate.linear_probe_accuracy, as `contrastive evaluate`)
One JSON line per (set, method, seed) on stdout, appended to --out. Everything runs in sequence:
one training job at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PEER_SCRIPT = REPO.parent / "shared" / "peers" / "lightly_simclr_quality.py"
PEER_PYTHON = REPO / ".peer" / "bin" / "python"
PIXEL_SIZE = 32
METHODS = ["pixels", "ours", "ours-transfer", "lightly", "lightly-transfer"]
DEFAULT_METHODS = ["pixels", "ours", "ours-transfer", "lightly"]
# The peer script seeds torch with 0; this runs it unchanged with that seed replaced by argv[1].
PEER_SEEDED = ("import runpy, sys, torch; seed = int(sys.argv[1]); manual_seed = torch.manual_seed; "
               "torch.manual_seed = lambda _: manual_seed(seed); sys.argv = sys.argv[2:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")


def contrastive_bin() -> str:
    beside = Path(sys.executable).parent / "contrastive"
    found = str(beside) if beside.exists() else shutil.which("contrastive")
    if not found:
        sys.exit("`contrastive` not found: run with the project's venv (.venv/bin/python)")
    return found


def labels_of(paths: list[str], classes: list[str]) -> np.ndarray:
    """Class index of each path relative to a split folder (its first folder)."""
    lookup = {c: i for i, c in enumerate(classes)}
    return np.asarray([lookup[p.split("/", 1)[0]] for p in paths])


def classes_of(set_folder: Path) -> list[str]:
    """The class names of a set, as sets.py wrote them into its manifest.json."""
    return sorted(json.loads((set_folder / "manifest.json").read_text())["classes"])


def image_paths(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


def pixels(folder: Path, paths: list[str]) -> np.ndarray:
    """float32 [N, 32*32*3]: each image at 32 x 32, centred per image, unit length."""
    x = np.stack([np.asarray(Image.open(folder / p).convert("RGB").resize((PIXEL_SIZE, PIXEL_SIZE), Image.BOX),
                             np.float32).ravel() for p in paths])
    x -= x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def emit(out: Path, row: dict) -> None:
    """One result: the machine's load and the time added, printed and appended to `out` (JSON lines)."""
    row = {**row, "loadavg": round(os.getloadavg()[0], 2), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(json.dumps(row), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def run_logged(cmd: list[str], log: Path) -> str:
    """Run `cmd`, its stderr to `log`; return stdout. A failure exits with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as err:
        err.write(f"$ {shlex.join(cmd)}\n")
        err.flush()
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    if out.returncode:
        tail = log.read_text().splitlines()[-15:]
        sys.exit(f"failed ({out.returncode}): {shlex.join(cmd)}\n" + "\n".join(tail))
    return out.stdout


class Ours:
    """`contrastive pretrain` + `contrastive embed`, as a user types them."""

    def __init__(self, minutes: float, extra: list[str], steps: int = 0):
        self.bin, self.minutes, self.extra, self.steps = contrastive_bin(), minutes, extra, steps

    def pretrain(self, folder: Path, run: Path, seed: int) -> dict:
        length = ["--steps", str(self.steps)] if self.steps else ["--time-budget", f"{self.minutes:g}"]
        run_logged([self.bin, "pretrain", str(folder), *length, "--seed", str(seed),
                    "--output", str(run), "--force", *self.extra], run.with_suffix(".log"))
        summary = json.loads((run / "summary.json").read_text())
        return {"steps": summary.get("steps"), "train_s": round(summary.get("wall_s", 0), 1)}

    def embed(self, run: Path, folder: Path, name: str) -> tuple[np.ndarray, list[str]]:
        out = run / f"emb-{name}.npy"
        run_logged([self.bin, "embed", str(folder), "--model", str(run), "--output", str(out), "--force"],
                   run.with_suffix(".log"))
        index = json.loads(out.with_suffix(".json").read_text())
        if index.get("skipped"):
            print(f"note: {len(index['skipped'])} images skipped in {folder}", file=sys.stderr)
        return np.load(out), index["paths"]


class Lightly:
    """The peer script, run with the peer venv; it trains and embeds in one process."""

    def __init__(self, minutes: float):
        self.minutes = minutes

    @staticmethod
    def missing() -> str | None:
        if not PEER_PYTHON.exists():
            return f"{PEER_PYTHON} not found (python3 -m venv .peer && .peer/bin/pip install torch==2.14.1 torchvision==0.29.1 lightly)"
        if not PEER_SCRIPT.exists():
            return f"{PEER_SCRIPT} not found"
        return None

    def run(self, train: Path, embed: dict[str, Path], out: Path, seed: int) -> dict:
        shutil.rmtree(out, ignore_errors=True)
        specs = [f"{name}={folder}" for name, folder in embed.items()]
        stdout = run_logged([str(PEER_PYTHON), "-c", PEER_SEEDED, str(seed), str(PEER_SCRIPT), "--train", str(train),
                             "--minutes", f"{self.minutes:g}", "--out", str(out), "--embed", *specs],
                            out.with_suffix(".log"))
        info = json.loads(stdout.strip().splitlines()[-1])
        return {"steps": info["steps"], "train_s": info["train_s"]}

    @staticmethod
    def load(out: Path, name: str) -> tuple[np.ndarray, list[str]]:
        return np.load(out / f"{name}.npy"), json.loads((out / f"{name}.json").read_text())["paths"]


def score(train: np.ndarray, ytr: np.ndarray, test: np.ndarray, yte: np.ndarray, seed: int) -> dict:
    from contrastive_cli.infer.evaluate import linear_probe_accuracy
    from contrastive_cli.infer.knn import knn_accuracy

    return {"knn": round(knn_accuracy(train, ytr, test, yte), 4),
            "linear": round(linear_probe_accuracy(train, ytr, test, yte, seed=seed), 4),
            "n_train": len(ytr), "n_test": len(yte), "dim": int(train.shape[1])}


def labeled(feats: dict, seed: int, classes: list[str]) -> dict:
    """Scores from {split: (features, paths)}, labels read from the paths."""
    (xtr, ptr), (xte, pte) = feats["train"], feats["test"]
    return score(xtr, labels_of(ptr, classes), xte, labels_of(pte, classes), seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path(".bench/quality"), help="where sets.py wrote the sets")
    p.add_argument("--sets", nargs="+", default=None, help="default: every set under --root with a manifest")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=DEFAULT_METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--minutes", type=float, default=10.0, help="pretraining budget (ours: --time-budget; lightly: --minutes)")
    p.add_argument("--steps", type=int, default=0, help="ours: train this many steps instead of --minutes (screening "
                   "settings of equal step cost on a shared machine, where a time budget buys a varying number of steps)")
    p.add_argument("--extra", default="", help='flags added to `contrastive pretrain`, e.g. "--temperature 0.2 -b 64"')
    p.add_argument("--out", type=Path, default=Path("results.jsonl"))
    p.add_argument("--tag", default="", help="a name for this configuration, kept in every row and in the run paths")
    p.add_argument("--summary", type=Path, metavar="RESULTS.jsonl", help="print markdown tables of a results file, run nothing")
    a = p.parse_args()
    if a.summary:
        print(summary(a.summary))
        return
    sets = a.sets or sorted(d.name for d in a.root.iterdir() if (d / "manifest.json").exists() and d.name != "mix")
    manifests = {}
    for name in sets:
        f = a.root / name / "manifest.json"
        if not f.exists():
            sys.exit(f"{f} not found: python benchmarks/quality/sets.py --root {a.root} --only {name}")
        manifests[name] = json.loads(f.read_text())
    if any(m.endswith("transfer") for m in a.methods) and not (a.root / "mix" / "manifest.json").exists():
        sys.exit(f"{a.root / 'mix'} not found: python benchmarks/quality/sets.py --root {a.root} --only mix")
    peer_missing = Lightly.missing() if any(m.startswith("lightly") for m in a.methods) else None
    runs = a.root / "runs" / (a.tag or "untagged")
    ours, peer = Ours(a.minutes, shlex.split(a.extra), a.steps), Lightly(a.minutes)

    def report(name: str, method: str, seed: int, result: dict, **info) -> None:
        row = {"tag": a.tag, "set": name, "method": method, "seed": seed,
               "minutes": 0 if method == "pixels" or (a.steps and method.startswith("ours")) else a.minutes,
               **result, **info,
               "extra": a.extra if method.startswith("ours") else ""}
        emit(a.out, row)

    def classes(name: str) -> list[str]:
        return sorted(manifests[name]["classes"])

    for seed in a.seeds:
        for method in a.methods:
            if method.startswith("lightly") and peer_missing:
                print(f"skipped {method}: {peer_missing}", file=sys.stderr)
                continue
            if method == "pixels":
                for name in sets:
                    feats = {}
                    for split in ("train", "test"):
                        folder = a.root / name / split
                        paths = image_paths(folder)
                        feats[split] = (pixels(folder, paths), paths)
                    report(name, method, seed, labeled(feats, seed, classes(name)))
            elif method == "ours":
                for name in sets:
                    run = runs / f"{name}-ours-s{seed}"
                    info = ours.pretrain(a.root / name / "unlabeled", run, seed)
                    feats = {s: ours.embed(run, a.root / name / s, s) for s in ("train", "test")}
                    report(name, method, seed, labeled(feats, seed, classes(name)), **info)
            elif method == "ours-transfer":
                run = runs / f"mix-ours-s{seed}"
                info = ours.pretrain(a.root / "mix", run, seed)
                for name in sets:
                    feats = {s: ours.embed(run, a.root / name / s, f"{name}-{s}") for s in ("train", "test")}
                    report(name, method, seed, labeled(feats, seed, classes(name)), **info)
            elif method == "lightly":
                for name in sets:
                    out = runs / f"{name}-lightly-s{seed}"
                    info = peer.run(a.root / name / "unlabeled", {s: a.root / name / s for s in ("train", "test")}, out, seed)
                    feats = {s: Lightly.load(out, s) for s in ("train", "test")}
                    report(name, method, seed, labeled(feats, seed, classes(name)), **info)
            elif method == "lightly-transfer":
                out = runs / f"mix-lightly-s{seed}"
                embed = {f"{n}-{s}": a.root / n / s for n in sets for s in ("train", "test")}
                info = peer.run(a.root / "mix", embed, out, seed)
                for name in sets:
                    feats = {s: Lightly.load(out, f"{name}-{s}") for s in ("train", "test")}
                    report(name, method, seed, labeled(feats, seed, classes(name)), **info)


def summary(path: Path) -> str:
    """Markdown: for kNN and linear, set x method cells "mean (seed values)", and the mean over sets."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cell: dict[tuple[str, str], dict[int, dict]] = {}
    for r in rows:  # a later row for the same (set, column, seed) replaces an earlier one
        column = r["method"] + (f" [{r['tag']}]" if r.get("tag") else "") + (f" {r['minutes']:g} min" if r.get("minutes") else "")
        cell.setdefault((r["set"], column), {})[r["seed"]] = r
    sets = sorted({s for s, _ in cell})
    columns = sorted({c for _, c in cell}, key=lambda c: (METHODS.index(c.split()[0]) if c.split()[0] in METHODS else 99, c))
    out = []
    for metric in ("knn", "linear"):
        out += [f"\n{metric} accuracy: mean over seeds (each seed's value)\n",
                "| set | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        means: dict[str, list[float]] = {c: [] for c in columns}
        for s in sets:
            line = [s]
            for c in columns:
                got = cell.get((s, c))
                if not got:
                    line.append("")
                    continue
                vals = [got[k][metric] for k in sorted(got)]
                means[c].append(float(np.mean(vals)))
                line.append(f"{np.mean(vals):.3f} ({', '.join(f'{v:.3f}' for v in vals)})")
            out.append("| " + " | ".join(line) + " |")
        out.append("| **mean over sets** | " + " | ".join(
            f"**{np.mean(means[c]):.3f}**" if len(means[c]) == len(sets) else f"({len(means[c])} of {len(sets)} sets)"
            for c in columns) + " |")
    return "\n".join(out).strip()


if __name__ == "__main__":
    main()
