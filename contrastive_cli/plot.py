"""RUN/metrics.jsonl -> a PNG of loss and health metrics over steps, drawn with Pillow only.

A grid of small panels (loss; positive/negative cosine; batch top-1 and kNN accuracy; emb_std;
effective rank; learning rate), each with axes, ticks with values and a title. No JAX import.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from .errors import InputError
from .files import write_atomic

SOFTWARE = "contrastive plot"  # the PNG's Software text: a file with it may be replaced without --force

# (title, [(metrics key, legend label), ...]); a panel draws the keys the records have.
PANELS = (
    ("loss", [("loss", "loss")]),
    ("cosine similarity", [("pos_cos", "positive"), ("neg_cos", "negative")]),
    ("accuracy", [("top1", "batch top-1"), ("knn", "kNN")]),
    ("embedding std", [("emb_std", "emb_std")]),
    ("effective rank", [("eff_rank", "eff_rank")]),
    ("learning rate", [("lr", "lr")]),
)
COLUMNS = 3
PANEL_W, PANEL_H = 380, 250  # pixels per panel
HEADER = 34  # pixels above the panels, for the run's title
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 62, 14, 28, 34  # plot area inside a panel
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
GRID, AXIS, TEXT = "#e4e4e4", "#404040", "#202020"


def image_size() -> tuple[int, int]:
    """(width, height) of the picture `plot_metrics` draws."""
    rows = -(-len(PANELS) // COLUMNS)
    return COLUMNS * PANEL_W, HEADER + rows * PANEL_H


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metric records, one per logged step, in step order (a half-written line is skipped)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise InputError(f"run directory not found: {run_dir}")
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise InputError(f"{run_dir} has no metrics.jsonl (is it a run directory written by pretrain?)") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    by_step = {}
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step[record["step"]] = record  # a step logged again after a resume: the later line
    if not by_step:
        raise InputError(f"{path} has no metric records yet")
    return [by_step[s] for s in sorted(by_step)]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    raw = (hi - lo) / count
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 5, 10) if m * base >= raw * 0.999)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        v = first + len(ticks) * step
    return ticks


def _label(v: float) -> str:
    return f"{v:.3g}"  # 0.5, 0.0008, 2e-05, 1.2e+04


def _range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):  # a flat line: give it room
        pad = abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.06
    return lo - pad, hi + pad


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int], title: str, series: list[tuple[str, list]],
           x_range: tuple[float, float], fonts) -> None:
    small, big = fonts
    x0, y0 = box
    left, top = x0 + MARGIN_L, y0 + MARGIN_T
    right, bottom = x0 + PANEL_W - MARGIN_R, y0 + PANEL_H - MARGIN_B
    draw.text(((left + right) / 2, y0 + 6), title, fill=TEXT, font=big, anchor="mt")
    values = [v for _, pts in series for _, v in pts]
    if not values:
        draw.rectangle((left, top, right, bottom), outline=AXIS)
        draw.text(((left + right) / 2, (top + bottom) / 2), "not logged", fill=AXIS, font=small, anchor="mm")
        return
    (xa, xb), (ya, yb) = x_range, _range(values)

    def px(x, y):
        return (left + (x - xa) / (xb - xa) * (right - left), bottom - (y - ya) / (yb - ya) * (bottom - top))

    for t in nice_ticks(ya, yb):  # horizontal grid lines with their values
        _, y = px(xa, t)
        draw.line((left, y, right, y), fill=GRID)
        draw.line((left - 4, y, left, y), fill=AXIS)
        draw.text((left - 6, y), _label(t), fill=TEXT, font=small, anchor="rm")
    for t in nice_ticks(xa, xb):
        if t != int(t):  # steps are whole numbers
            continue
        x, _ = px(t, ya)
        draw.line((x, top, x, bottom), fill=GRID)
        draw.line((x, bottom, x, bottom + 4), fill=AXIS)
        draw.text((x, bottom + 6), str(int(t)), fill=TEXT, font=small, anchor="mt")
    draw.rectangle((left, top, right, bottom), outline=AXIS)
    draw.text((right, y0 + PANEL_H - 4), "step", fill=AXIS, font=small, anchor="rd")
    lines = [[px(x, v) for x, v in pts] for _, pts in series]
    for i, xy in enumerate(lines):
        colour = COLOURS[i % len(COLOURS)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2, joint="curve")
        for x, y in xy if len(xy) <= 12 else []:  # few points (e.g. kNN every N steps): mark them
            draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=colour)
    if len(series) > 1:
        _legend(draw, (left, top, right, bottom), [label for label, _ in series], lines, small)


def _legend(draw, area, labels, lines, font) -> None:
    """Labelled colour swatches in a white box, in the plot corner that covers the fewest points."""
    left, top, right, bottom = area
    w = 34 + max(draw.textlength(label, font=font) for label in labels)
    h = 6 + 14 * len(labels)
    corners = [(right - w - 4, top + 4), (right - w - 4, bottom - h - 4),
               (left + 4, top + 4), (left + 4, bottom - h - 4)]

    # The lines as dense points (16 per segment), so a segment crossing a corner counts too.
    dense = [(xa + (xb - xa) * k / 16, ya + (yb - ya) * k / 16)
             for xy in lines for (xa, ya), (xb, yb) in zip(xy, xy[1:] or xy) for k in range(17)]

    def covered(corner):
        x0, y0 = corner
        return sum(x0 - 3 <= x <= x0 + w + 3 and y0 - 3 <= y <= y0 + h + 3 for x, y in dense)

    x0, y0 = min(corners, key=covered)
    draw.rectangle((x0, y0, x0 + w, y0 + h), fill="white", outline=GRID)
    for i, label in enumerate(labels):
        ly = y0 + 10 + 14 * i
        draw.line((x0 + 6, ly, x0 + 24, ly), fill=COLOURS[i % len(COLOURS)], width=3)
        draw.text((x0 + 30, ly), label, fill=TEXT, font=font, anchor="lm")


def draw_metrics(records: list[dict], title: str) -> Image.Image:
    """The panels for `records` (metric dicts with a `step`) as an RGB image of `image_size()`."""
    img = Image.new("RGB", image_size(), "white")
    draw = ImageDraw.Draw(img)
    fonts = (_font(11), _font(13))
    draw.text((image_size()[0] / 2, HEADER / 2), title, fill=TEXT, font=_font(15), anchor="mm")
    steps = [r["step"] for r in records]
    x_range = (min(steps), max(steps)) if len(set(steps)) > 1 else (steps[0] - 1, steps[0] + 1)
    for i, (name, keys) in enumerate(PANELS):
        series = []
        for key, label in keys:
            pts = [(r["step"], float(r[key])) for r in records
                   if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                series.append((label, pts))
        row, col = divmod(i, COLUMNS)
        _panel(draw, (col * PANEL_W, HEADER + row * PANEL_H), name, series, x_range, fonts)
    return img


def _ours(path: Path) -> bool:
    """Whether `path` is a PNG that plot_metrics wrote (its Software text says so)."""
    try:
        with Image.open(path) as img:
            return img.format == "PNG" and getattr(img, "text", {}).get("Software") == SOFTWARE
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def plot_metrics(run_dir: Path, output: Path | None = None, *, force: bool = False) -> Path:
    """Draw RUN/metrics.jsonl to `output` (default RUN/metrics.png), written atomically; its path.

    An existing `output` is replaced only when it is a PNG this function wrote, or with `force`.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    output = Path(output) if output is not None else run_dir / "metrics.png"
    if output.suffix.lower() != ".png":
        raise InputError(f"output {output} must end in .png")
    if output.is_dir():
        raise InputError(f"output {output} is a folder")
    if not output.parent.is_dir():
        raise InputError(f"output folder {output.parent} does not exist")
    if (output.exists() or output.is_symlink()) and not force and not _ours(output):
        raise InputError(f"{output} already exists and is not a plot written by `contrastive plot`; "
                         f"pass --force to replace it")
    last = records[-1]
    loss = last.get("loss")
    title = (f"{run_dir.resolve().name}: {len(records)} log steps to step {last['step']}"
             + (f", final loss {loss:.4g}" if isinstance(loss, (int, float)) else ""))
    img = draw_metrics(records, title)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", SOFTWARE)
    write_atomic(output, lambda f: img.save(f, format="PNG", pnginfo=info))
    return output
