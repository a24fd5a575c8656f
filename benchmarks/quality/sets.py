"""Labeled image sets for the quality harness, rebuilt from Debian packages, deterministically.

    apt-get install dataset-fashion-mnist fonts-noto-color-emoji fonts-symbola unicode-data \
        wesnoth-1.16-data librsvg2-bin papirus-icon-theme breeze-icon-theme ... (PACKAGES below)
    python benchmarks/quality/sets.py --root .bench/quality [--only glyphs emoji] [--force]

Installs nothing: a missing source stops with one line naming the package to `apt-get install`.
Each set is written as

    ROOT/NAME/train/<class>/<file>.png     labeled, the reference side of kNN and the probe's fit
    ROOT/NAME/test/<class>/<file>.png      labeled, held out BY SOURCE (font family, unit, theme...)
    ROOT/NAME/unlabeled/<i>.png            symlinks to the train images, flat, in a seeded order,
                                           named by number only: what `contrastive pretrain` sees
    ROOT/NAME/manifest.json                classes, counts, packages and versions, the split rule

and ROOT/mix/ is the transfer folder: unlabeled clip art and wallpaper photo crops, sources that
no set uses. Images are 64 x 64 (Fashion-MNIST keeps its native 28 x 28), drawn on white.
Inputs are sorted, samples and crops come from fixed seeds, splits from MD5 of the source's name,
so a rebuild on another machine with the same package versions gives the same files.

Sets (kind: source -> classes; split):
  fashion  photos of clothes: dataset-fashion-mnist -> 10 classes; 10k of the official train set
           and 2k of the official test set
  glyphs   letters: A-Z rendered from ~80 Latin font packages (2 fonts each), each at a size and
           place drawn from MD5 of font and letter -> 26 classes; test =
           whole font packages (related designs, e.g. URW and TeX Gyre, count as one package)
  emoji    pictograms: Noto Color Emoji and Symbola, Unicode emoji group -> 9 classes; test = whole
           base emoji (all skin tones and both styles of one emoji on one side)
  icons    desktop icons: 14 icon themes, icon context (apps, devices, places...) -> 8 classes;
           test = whole theme families (themes that share a designer lineage count as one)
  sprites  game units: Battle for Wesnoth unit sprites, race -> 19 classes; test = whole units (all
           frames of one unit on one side)
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 64
TEST_FRACTION = 0.2
SEED = 19  # issue 19; every sample and crop below derives from it

FONT_PACKAGES = """fonts-urw-base35 fonts-texgyre fonts-freefont-ttf fonts-dejavu-core fonts-dejavu-extra
fonts-liberation2 fonts-cmu fonts-adf-accanthis fonts-adf-baskervald fonts-adf-berenis fonts-adf-gillius
fonts-adf-ikarius fonts-adf-irianis fonts-adf-libris fonts-adf-mekanus fonts-adf-oldania fonts-adf-romande
fonts-adf-solothurn fonts-adf-switzera fonts-adf-tribun fonts-adf-universalis fonts-adf-verana
fonts-linuxlibertine fonts-ebgaramond fonts-crosextra-carlito fonts-crosextra-caladea fonts-cantarell
fonts-open-sans fonts-roboto-unhinted fonts-roboto-slab fonts-lato fonts-comic-neue fonts-dancingscript
fonts-kaushanscript fonts-lobster fonts-lobstertwo fonts-leckerli-one fonts-cabin fonts-comfortaa fonts-dosis
fonts-quicksand fonts-inter fonts-karla fonts-jura fonts-vollkorn fonts-oldstandard fonts-quattrocento
fonts-yanone-kaffeesatz fonts-inconsolata fonts-firacode fonts-jetbrains-mono fonts-courier-prime
fonts-ocr-a fonts-b612 fonts-sil-gentiumplus fonts-sil-charis fonts-sil-andika fonts-averia-gwf
fonts-averia-sans-gwf fonts-averia-serif-gwf fonts-cabinsketch fonts-bebas-neue fonts-humor-sans
fonts-junicode fonts-stix fonts-tuffy fonts-play fonts-dkg-handwriting fonts-gotico-antiqua
fonts-blankenburg fonts-isabella fonts-goudybookletter fonts-prociono fonts-fanwood fonts-linex
fonts-mononoki fonts-go fonts-paratype fonts-gfs-didot fonts-gfs-artemisia fonts-gfs-bodoni-classic
fonts-gfs-neohellenic""".split()
# Packages whose designs descend from one another: held out together, or test "unseen" fonts
# would have near-twins in train. TeX Gyre and GNU FreeFont are derived from URW's fonts.
FONT_LINEAGE = {"fonts-texgyre": "fonts-urw-base35", "fonts-freefont-ttf": "fonts-urw-base35",
                "fonts-dejavu-extra": "fonts-dejavu-core", "fonts-averia-sans-gwf": "fonts-averia-gwf",
                "fonts-averia-serif-gwf": "fonts-averia-gwf", "fonts-lobstertwo": "fonts-lobster"}
FONTS_PER_PACKAGE = 2
GLYPH_SCALE = (0.4, 0.9)  # the letter's box, as a fraction of the image side
NOT_LETTERS = re.compile(r"dingbat|symbol|d050000l|math|emoji|ornament|icon", re.I)

ICON_THEMES = {  # theme folder under /usr/share/icons -> (package, lineage)
    "Adwaita": ("adwaita-icon-theme", "gnome"), "gnome": ("gnome-icon-theme", "gnome"),
    "mate": ("mate-icon-theme", "gnome"), "Faba": ("moka-icon-theme", "snwh"),
    "Moka": ("moka-icon-theme", "snwh"), "Paper": ("paper-icon-theme", "snwh"),
    "Papirus": ("papirus-icon-theme", "snwh"), "Faenza": ("faenza-icon-theme", "faenza"),
    "Numix": ("numix-icon-theme", "numix"), "Tango": ("tango-icon-theme", "tango"),
    "breeze": ("breeze-icon-theme", "breeze"), "elementary": ("elementary-icon-theme", "elementary"),
    "nuoveXT2": ("lxde-icon-theme", "nuovext"), "oxygen": ("oxygen-icon-theme", "oxygen"),
}
ICON_CONTEXTS = {"actions": "actions", "apps": "apps", "categories": "categories", "devices": "devices",
                 "emblems": "emblems", "mimetypes": "mimetypes", "mimes": "mimetypes", "places": "places",
                 "status": "status"}
ICONS_PER_THEME_CONTEXT = 30
ICON_MIN_SIZE = 32  # smaller designs are a different drawing (pixel-hinted, often monochrome)

WESNOTH = Path("/usr/share/games/wesnoth/1.16/data/core/images/units")
SPRITE_RACES_MIN = 50  # races with fewer frames (transport, ogres) are left out
FRAMES_PER_UNIT = 12
SPRITES_PER_RACE = 240

EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
NOTO_EMOJI = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
SYMBOLA = Path("/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf")
EMOJI_PER_GROUP = 500
SKIN_TONES = {0x1F3FB, 0x1F3FC, 0x1F3FD, 0x1F3FE, 0x1F3FF}

FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_NAMES = ["tshirt-top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle-boot"]  # as benchmarks/quality_fashion_mnist.py (not imported: it starts JAX)
FASHION_TRAIN, FASHION_TEST = 10_000, 2_000

CLIPART = Path("/usr/share/openclipart/png")
MIX_CLIPART, MIX_CROPS = 7_000, 2_400
CLIPART_MAX_PIXELS = 4_000_000


class Missing(SystemExit):
    def __init__(self, what: Path | str, package: str):
        super().__init__(f"{what} not found: apt-get install {package}")


def need(path: Path, package: str) -> Path:
    if not path.exists():
        raise Missing(path, package)
    return path


def version(package: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    if out.returncode or not out.stdout:
        raise Missing(f"package {package}", package)
    return out.stdout


def package_files(package: str, suffixes: tuple[str, ...]) -> list[Path]:
    version(package)  # raises Missing
    out = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True, check=True).stdout
    return sorted(Path(p) for p in out.splitlines() if p.lower().endswith(suffixes) and Path(p).is_file())


def md5(key: str) -> str:
    return hashlib.md5(key.encode()).hexdigest()


def held_out(sizes: dict[str, int], fraction: float = TEST_FRACTION) -> set[str]:
    """Source groups (name -> image count) for the test side: taken in MD5 order of their names
    until they hold at least `fraction` of the images, at most all groups but one."""
    total, test, taken = sum(sizes.values()), set(), 0
    for key in sorted(sizes, key=md5)[:-1]:
        if taken >= fraction * total:
            break
        test.add(key)
        taken += sizes[key]
    return test


def fit(img: Image.Image, size: int = SIZE, margin: int = 4) -> Image.Image:
    """RGBA/RGB/L image -> RGB `size` x `size` on white: the ink's bounding box scaled (aspect kept)
    to fill `size - 2 margin` and centred."""
    img = img.convert("RGBA")
    bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
    flat = Image.alpha_composite(bg, img).convert("RGB")
    ink = Image.eval(flat.convert("L"), lambda v: 255 if v < 250 else 0).getbbox()
    if ink is None:
        return None
    flat = flat.crop(ink)
    inner = size - 2 * margin
    scale = inner / max(flat.size)
    flat = flat.resize((max(1, round(flat.width * scale)), max(1, round(flat.height * scale))), Image.LANCZOS)
    out = Image.new("RGB", (size, size), (255, 255, 255))
    out.paste(flat, ((size - flat.width) // 2, (size - flat.height) // 2))
    return out


# --- the sets: each returns (items, packages, split rule); an item is (split, class, file stem, image)

def build_fashion():
    def read(name, offset):
        return np.frombuffer(gzip.open(need(FASHION / name, "dataset-fashion-mnist")).read(), np.uint8, offset=offset)
    items = []
    for split, prefix, n in (("train", "train", FASHION_TRAIN), ("test", "t10k", FASHION_TEST)):
        x = read(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        y = read(f"{prefix}-labels-idx1-ubyte.gz", 8)
        items += [(split, FASHION_NAMES[y[i]], f"{i:05d}", Image.fromarray(x[i])) for i in range(n)]
    rule = f"first {FASHION_TRAIN} of the official train set; first {FASHION_TEST} of the official test set"
    return items, ["dataset-fashion-mnist"], rule


def _ink(font: ImageFont.FreeTypeFont, text: str) -> bytes:
    """The raw drawing of `text`, to compare with the font's .notdef (what a missing glyph gets)."""
    canvas = Image.new("L", (320, 320), 0)
    ImageDraw.Draw(canvas).text((160, 160), text, font=font, fill=255, anchor="mm")
    return canvas.tobytes()


def _render_letter(font: ImageFont.FreeTypeFont, ch: str, key: str) -> Image.Image | None:
    """The letter's ink scaled to GLYPH_SCALE of the image side and placed at a position, both drawn
    from MD5(key): fixed per image, so centred, box-filling letters do not hand raw pixels the answer."""
    canvas = Image.new("L", (320, 320), 255)
    ImageDraw.Draw(canvas).text((160, 160), ch, font=font, fill=0, anchor="mm")
    rng = np.random.default_rng(int(md5(key)[:8], 16))
    side = round(SIZE * rng.uniform(*GLYPH_SCALE))
    glyph = fit(canvas, size=side, margin=0)
    if glyph is None:
        return None
    out = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    out.paste(glyph, (int(rng.integers(0, SIZE - side + 1)), int(rng.integers(0, SIZE - side + 1))))
    return out


def build_glyphs():
    letters = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    rng = np.random.default_rng(SEED)
    fonts: dict[str, list[tuple[str, list[Image.Image]]]] = {}  # lineage -> [(font name, 26 images)]
    seen_names, seen_renders = set(), set()
    for package in FONT_PACKAGES:
        usable = []
        for path in package_files(package, (".ttf", ".otf")):
            try:
                font = ImageFont.truetype(str(path), 160)
            except OSError:
                continue
            name = " ".join(font.getname())
            if name in seen_names or NOT_LETTERS.search(name):
                continue
            notdef = _ink(font, "\uffff")
            if any(_ink(font, ch) == notdef for ch in letters):
                continue  # a letter missing: .notdef drawn instead
            renders = [_render_letter(font, ch, f"{name}/{ch}") for ch in letters]
            digest = md5("".join(md5(r.tobytes().hex()) if r else "-" for r in renders))
            if None in renders or digest in seen_renders or len({r.tobytes() for r in renders}) < 26:
                continue  # blank letters, a copy of a font already taken, or one shape for all
            seen_names.add(name)
            seen_renders.add(digest)
            usable.append((name, renders))
        pick = sorted(rng.choice(len(usable), min(FONTS_PER_PACKAGE, len(usable)), replace=False)) if usable else []
        fonts.setdefault(FONT_LINEAGE.get(package, package), []).extend((package, *usable[i]) for i in pick)
    test = held_out({k: len(v) for k, v in fonts.items()})
    items = []
    for lineage, entries in fonts.items():
        split = "test" if lineage in test else "train"
        for package, name, renders in entries:
            stem = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
            items += [(split, ch, f"{stem}", img.convert("L")) for ch, img in zip(letters, renders)]
    rule = (f"test = whole font packages in MD5 order of their names until >= {TEST_FRACTION:.0%} of the fonts "
            f"(derived designs grouped: {FONT_LINEAGE}); {FONTS_PER_PACKAGE} fonts per package (seeded); "
            f"letter box {GLYPH_SCALE} of the side, placed anywhere, both from MD5 of font and letter")
    return items, FONT_PACKAGES, rule


def _emoji_table() -> dict[str, list[tuple[str, str]]]:
    """Unicode group -> [(emoji string, base key)] for fully-qualified emoji (group Component left out)."""
    groups: dict[str, list[tuple[str, str]]] = {}
    group = None
    for line in need(EMOJI_TEST, "unicode-data").read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line and group != "Component":
            cps = [int(c, 16) for c in line.split(";")[0].split()]
            base = "-".join(f"{c:x}" for c in cps if c not in SKIN_TONES)
            groups.setdefault(group, []).append(("".join(map(chr, cps)), base))
    return groups


def _render_emoji(font, text: str, color: bool) -> Image.Image | None:
    canvas = Image.new("RGBA", (400, 220), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((200, 110), text, font=font, fill=(0, 0, 0, 255), anchor="mm", embedded_color=color)
    box = canvas.getbbox()
    if box is None or (box[2] - box[0]) > 1.5 * (box[3] - box[1]):
        return None  # nothing drawn, or a sequence drawn as several glyphs side by side
    return fit(canvas)


def build_emoji():
    noto = ImageFont.truetype(str(need(NOTO_EMOJI, "fonts-noto-color-emoji")), 109)  # its only bitmap size
    symbola = ImageFont.truetype(str(need(SYMBOLA, "fonts-symbola")), 96)
    symbola_notdef = _ink(symbola, "\uffff")
    items = []
    for group, entries in _emoji_table().items():
        cls = re.sub(r"[^a-z]+", "-", group.lower()).strip("-")
        by_base: dict[str, list[tuple[str, Image.Image]]] = {}
        for text, base in entries:
            drawn = by_base.setdefault(base, [])
            img = _render_emoji(noto, text, color=True)
            if img is not None:
                drawn.append((f"noto-{md5(text)[:10]}", img))
            plain = text.replace("\ufe0f", "")
            if len(plain) == 1 and _ink(symbola, plain) != symbola_notdef:
                img = _render_emoji(symbola, plain, color=False)
                if img is not None:
                    drawn.append((f"symbola-{md5(text)[:10]}", img))
        kept, n = {}, 0
        for base in sorted(by_base, key=md5):  # whole base emoji up to the cap, in MD5 order
            if by_base[base] and n < EMOJI_PER_GROUP:
                kept[base] = by_base[base]
                n += len(by_base[base])
        test = held_out({b: len(v) for b, v in kept.items()})
        items += [("test" if b in test else "train", cls, stem, img) for b, v in kept.items() for stem, img in v]
    rule = (f"per Unicode group, whole base emoji (skin tones removed) in MD5 order up to {EMOJI_PER_GROUP} images; "
            f"test = base emoji in MD5 order until >= {TEST_FRACTION:.0%}; Noto Color Emoji for every emoji, "
            "Symbola (black) where it has the single code point")
    return items, ["fonts-noto-color-emoji", "fonts-symbola", "unicode-data"], rule


def _icon_size(path: Path) -> int:
    for part in reversed(path.parts[:-1]):
        m = re.fullmatch(r"(\d+)(?:x\d+)?(@\dx)?", part)
        if m:
            return int(m.group(1)) * (int(m.group(2)[1]) if m.group(2) else 1)
    if path.suffix == ".svg":
        return 256  # "scalable"
    with Image.open(path) as im:
        return im.width


def _read_icon(path: Path) -> Image.Image | None:
    if path.suffix == ".svg":
        out = subprocess.run(["rsvg-convert", "-w", "128", "-h", "128", "-f", "png", str(path)], capture_output=True)
        if out.returncode:
            return None
        return fit(Image.open(io.BytesIO(out.stdout)))
    try:
        with Image.open(path) as im:
            return fit(im)
    except OSError:
        return None


def build_icons():
    shutil.which("rsvg-convert") or sys.exit("rsvg-convert not found: apt-get install librsvg2-bin")
    rng = np.random.default_rng(SEED)
    per_theme: dict[str, list[tuple[str, str, Image.Image]]] = {}
    for theme, (package, _) in ICON_THEMES.items():
        root = need(Path("/usr/share/icons") / theme, package)
        best: dict[tuple[str, str], tuple[int, Path]] = {}  # (context, icon name) -> largest design
        seen = set()
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = Path(dirpath).relative_to(root).parts
            ctx = next((ICON_CONTEXTS[p.split("@")[0]] for p in rel if p.split("@")[0] in ICON_CONTEXTS), None)
            if ctx is None:
                continue
            for f in sorted(filenames):
                p = Path(dirpath) / f
                if p.suffix not in (".png", ".svg") or "symbolic" in f or not p.exists():
                    continue
                real = p.resolve()
                if real in seen:
                    continue  # a link to an icon already listed
                seen.add(real)
                size = _icon_size(p)
                if size >= ICON_MIN_SIZE and size > best.get((ctx, p.stem), (0,))[0]:
                    best[(ctx, p.stem)] = (size, real)
        got = []
        for ctx in sorted(set(ICON_CONTEXTS.values())):
            names = sorted(n for c, n in best if c == ctx)
            for i in sorted(rng.permutation(len(names))):
                if sum(1 for g in got if g[0] == ctx) >= ICONS_PER_THEME_CONTEXT:
                    break
                img = _read_icon(best[(ctx, names[i])][1])
                if img is not None:
                    got.append((ctx, f"{theme}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', names[i])}", img))
        per_theme[theme] = got
    lineages: dict[str, int] = {}
    for theme, (_, lineage) in ICON_THEMES.items():
        lineages[lineage] = lineages.get(lineage, 0) + len(per_theme[theme])
    test = held_out(lineages)
    items = [("test" if ICON_THEMES[t][1] in test else "train", ctx, stem, img)
             for t, got in per_theme.items() for ctx, stem, img in got]
    rule = (f"class = icon context; up to {ICONS_PER_THEME_CONTEXT} icons per theme and context (seeded), the "
            f"largest design >= {ICON_MIN_SIZE} px, symbolic icons left out; test = whole theme lineages "
            f"{sorted(test)} (MD5 order until >= {TEST_FRACTION:.0%}); lineages: "
            f"{ {t: l for t, (_, l) in ICON_THEMES.items()} }")
    return items, sorted({p for p, _ in ICON_THEMES.values()}), rule


def _unit(path: Path, race: Path) -> str:
    """The unit a frame shows: its subfolder, else the longest standing sprite's name (a file
    beside it) that the frame's name extends ("wose-ancient-attack-1" -> "wose-ancient"), else the
    name before the first '-'."""
    rel = path.relative_to(race)
    if len(rel.parts) > 1:
        return rel.parts[0]
    stems = [s for s in (path.stem[:i] for i in range(len(path.stem), 0, -1))
             if (path.stem == s or path.stem.startswith(s + "-")) and (path.parent / f"{s}.png").exists()]
    return stems[0] if stems else path.stem.split("-")[0]


def build_sprites():
    need(WESNOTH, "wesnoth-1.16-data")
    items = []
    for race in sorted(d.name for d in WESNOTH.iterdir() if d.is_dir()):
        units: dict[str, list[Path]] = {}
        for p in sorted((WESNOTH / race).rglob("*.png")):
            units.setdefault(_unit(p, WESNOTH / race), []).append(p)
        if sum(map(len, units.values())) < SPRITE_RACES_MIN or len(units) < 2:
            continue
        kept, n = {}, 0
        for unit in sorted(units, key=md5):
            if n >= SPRITES_PER_RACE:
                break
            frames = units[unit]  # evenly spaced frames, the standing sprite (shortest name) first
            frames = sorted(frames, key=lambda p: (len(p.name), p.name))[:1] + [
                frames[i] for i in np.linspace(0, len(frames) - 1, min(len(frames), FRAMES_PER_UNIT) - 1).astype(int)]
            kept[unit] = list(dict.fromkeys(frames))
            n += len(kept[unit])
        test = held_out({u: len(v) for u, v in kept.items()})
        for unit, frames in kept.items():
            for p in frames:
                img = fit(Image.open(p), margin=2)
                if img is not None:
                    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", p.relative_to(WESNOTH / race).with_suffix("").as_posix())
                    items.append(("test" if unit in test else "train", race, stem, img))
    rule = (f"class = race folder (>= {SPRITE_RACES_MIN} frames); unit = subfolder, else the longest "
            "standing sprite's name that the frame's name extends; "
            f"up to {FRAMES_PER_UNIT} frames per unit, whole units in MD5 order up to {SPRITES_PER_RACE} per race; "
            f"test = whole units in MD5 order until >= {TEST_FRACTION:.0%} of the race")
    return items, ["wesnoth-1.16-data"], rule


SETS = {"fashion": ("photos of clothes", build_fashion), "glyphs": ("letters in many fonts", build_glyphs),
        "emoji": ("pictograms", build_emoji), "icons": ("desktop icons", build_icons),
        "sprites": ("game unit sprites", build_sprites)}


def write_set(root: Path, name: str, force: bool) -> dict:
    out = root / name
    if (out / "manifest.json").exists() and not force:
        return json.loads((out / "manifest.json").read_text())
    kind, build = SETS[name]
    items, packages, rule = build()
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    counts: dict[str, dict[str, int]] = {}
    train_files = []
    for split, cls, stem, img in sorted(items, key=lambda t: t[:3]):
        d = tmp / split / cls
        d.mkdir(parents=True, exist_ok=True)
        f = d / f"{stem}.png"
        assert not f.exists(), f"two images named {f}"
        img.save(f, optimize=False)
        counts.setdefault(cls, {"train": 0, "test": 0})[split] += 1
        if split == "train":
            train_files.append(f.relative_to(tmp))
    (tmp / "unlabeled").mkdir()
    order = np.random.default_rng(SEED).permutation(len(train_files))  # no trace of the class in name or order
    for i, j in enumerate(order):
        (tmp / "unlabeled" / f"{i:05d}.png").symlink_to(Path("..") / train_files[j])
    manifest = {
        "name": name, "kind": kind, "image_size": 28 if name == "fashion" else SIZE,
        "packages": {p: version(p) for p in packages}, "split_rule": rule, "seed": SEED,
        "n_train": sum(c["train"] for c in counts.values()), "n_test": sum(c["test"] for c in counts.values()),
        "classes": dict(sorted(counts.items())),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifest


def write_mix(root: Path, force: bool) -> dict:
    """ROOT/mix: clip art (openclipart-png; those of a seeded sample of MIX_CLIPART that are at most
    CLIPART_MAX_PIXELS) and MIX_CROPS square crops of wallpapers (gnome-backgrounds,
    mate-backgrounds: photos and drawn abstracts), unlabeled, flat."""
    out = root / "mix"
    if (out / "manifest.json").exists() and not force:
        return json.loads((out / "manifest.json").read_text())
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the sizes are checked below
    rng = np.random.default_rng(SEED)
    clipart = sorted(need(CLIPART, "openclipart-png").rglob("*.png"))
    walls = [p for pkg in ("gnome-backgrounds", "mate-backgrounds")
             for p in package_files(pkg, (".jpg", ".jpeg", ".png", ".webp"))]
    tmp = root / ".mix.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n_clip = 0
    for i in sorted(rng.choice(len(clipart), min(MIX_CLIPART, len(clipart)), replace=False)):
        try:
            with Image.open(clipart[i]) as im:
                if im.width * im.height > CLIPART_MAX_PIXELS:
                    continue  # some are posters of 170 Mpx: slow to decode, and no different at 64 px
                img = fit(im)
        except (OSError, Image.DecompressionBombError):
            continue
        if img is not None:
            img.save(tmp / f"clip-{n_clip:05d}.png")
            n_clip += 1
    n_crop = 0
    for k, p in enumerate(walls):
        with Image.open(p) as im:
            photo = im.convert("RGB")
        w, h = photo.size
        for _ in range(MIX_CROPS // len(walls) + (k < MIX_CROPS % len(walls))):
            s = int(rng.uniform(min(w, h) / 8, min(w, h) / 3))
            x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
            photo.crop((x, y, x + s, y + s)).resize((SIZE, SIZE), Image.LANCZOS).save(tmp / f"photo-{n_crop:05d}.png")
            n_crop += 1
    manifest = {"name": "mix", "kind": "unlabeled transfer folder: clip art and wallpaper photo crops",
                "packages": {p: version(p) for p in ("openclipart-png", "gnome-backgrounds", "mate-backgrounds")},
                "n_clipart": n_clip, "clipart_max_pixels": CLIPART_MAX_PIXELS, "n_photo_crops": n_crop,
                "n_wallpapers": len(walls), "seed": SEED}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--only", nargs="+", choices=[*SETS, "mix"], default=[*SETS, "mix"])
    p.add_argument("--force", action="store_true", help="rebuild sets that are already there")
    a = p.parse_args()
    a.root.mkdir(parents=True, exist_ok=True)
    for name in a.only:
        m = write_mix(a.root, a.force) if name == "mix" else write_set(a.root, name, a.force)
        brief = {k: v for k, v in m.items() if k not in ("classes", "packages", "split_rule")}
        brief |= {"classes": len(m["classes"])} if "classes" in m else {}
        print(json.dumps(brief), flush=True)


if __name__ == "__main__":
    main()
