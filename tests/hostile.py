"""A folder of hostile inputs, written with Pillow and the filesystem in well under a second.

`write_hostile_folder(root)` returns what it wrote:

    {"root": Path,
     "good":    {relative path: what it is},          # every one must be used
     "skipped": {relative path: reason fragment},     # every one must be skipped with that reason
     "ignored": [relative path, ...],                 # hidden or not an image: neither used nor reported
     "colour":  {relative path: (top RGB, bottom RGB)}}  # decoded content to check (EXIF, GIF frame, ...)

Relative paths are POSIX strings as `data.scan_folder` reports them (str, may hold surrogate escapes
for names that are not UTF-8). What the filesystem and the user allow is detected, not assumed: as
root, chmod 000 does not stop reading, so those files are expected to be used instead of skipped;
where symlinks, FIFOs or non-UTF-8 names cannot be made, that entry is left out.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

from PIL import Image

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def _noise_jpeg(w: int = 64, h: int = 64, seed: int = 0) -> bytes:
    import numpy as np

    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a, "RGB").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of width x height, built directly (~11 KB for 10000 x 9000).

    10000 x 9000 = 90,000,000 pixels, over Pillow's Image.MAX_IMAGE_PIXELS (89,478,485) but under
    twice it, so Pillow itself only warns: the decoder has to refuse it on its own.
    """
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(row * height, 9)) + chunk(b"IEND", b""))


def _two_tone(w: int, h: int, first, second, *, vertical: bool = False) -> Image.Image:
    """Left half `first`, right half `second` (top/bottom when `vertical`)."""
    im = Image.new("RGB", (w, h), second)
    im.paste(first, (0, 0, w, h // 2) if vertical else (0, 0, w // 2, h))
    return im


def _readable(path: Path) -> bool:
    """Can this process actually read `path`? (root can read chmod 000 files)."""
    try:
        with open(path, "rb") as f:
            f.read(1)
        return True
    except OSError:
        return False


def write_hostile_folder(root: Path) -> dict:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    good: dict[str, str] = {}
    skipped: dict[str, str] = {}
    ignored: list[str] = []
    colour: dict[str, tuple] = {}

    def img(rel: str, im: Image.Image, what: str, **save) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, **save)
        good[rel] = what
        return path

    def raw(rel: str, data: bytes) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    # ---- good: every mode and shape decode_image must turn into an RGB square --------------------
    img("rgb.jpg", Image.new("RGB", (40, 30), GREEN), "plain RGB JPEG")
    img("cmyk.jpg", Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "CMYK JPEG (red)")
    colour["cmyk.jpg"] = (RED, RED)
    img("gray.png", Image.new("L", (20, 20), 128), "grayscale PNG")
    gray16 = Image.new("I;16", (20, 20))
    gray16.paste(200 * 257, (0, 0, 20, 10))  # 200 * 257 is exactly 200 in 8 bits: scaled, not clipped
    gray16.paste(50 * 257, (0, 10, 20, 20))
    img("gray16.png", gray16, "16-bit grayscale PNG (mode I;16)")
    colour["gray16.png"] = ((200,) * 3, (50,) * 3)
    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(0, (0, 0, 20, 10))
    img("palette_transparent.png", pal, "palette PNG, index 0 transparent", transparency=0)
    colour["palette_transparent.png"] = (WHITE, BLUE)  # transparent over white
    rgba = Image.new("RGBA", (20, 20), (0, 0, 255, 255))
    rgba.paste((255, 0, 0, 0), (0, 0, 20, 10))
    img("rgba.png", rgba, "RGBA PNG, top half fully transparent")
    colour["rgba.png"] = (WHITE, BLUE)
    # Stored 40x20 with red on the left; orientation 6 means "rotate 90 degrees clockwise to
    # display", so the decoded image is 20x40 with red on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    img("exif_rotated.jpg", _two_tone(40, 20, RED, BLUE), "JPEG with EXIF orientation 6", exif=exif, quality=95)
    colour["exif_rotated.jpg"] = (RED, BLUE)
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE, GREEN)]
    img("animated.gif", frames[0], "animated GIF, 3 frames (first is red)", save_all=True,
        append_images=frames[1:], duration=100, loop=0)
    colour["animated.gif"] = (RED, RED)
    img("one_pixel.png", Image.new("RGB", (1, 1), BLUE), "1x1 image")
    colour["one_pixel.png"] = (BLUE, BLUE)
    img("panorama.jpg", Image.new("RGB", (4000, 50), GREEN), "4000x50 panorama")
    img("ünïcödé 画像.jpg", Image.new("RGB", (24, 24), GREEN), "non-ASCII name with a space")
    img("with space.png", Image.new("RGB", (24, 24), GREEN), "space in the name")
    img("UPPER.JPG", Image.new("RGB", (24, 24), GREEN), "uppercase .JPG")
    img("Shout.PNG", Image.new("RGB", (24, 24), GREEN), "uppercase .PNG")
    img("sub/deeper/nested.jpg", Image.new("RGB", (24, 24), GREEN), "two folders down")
    img("mislabelled.jpg", Image.new("RGB", (24, 24), GREEN), "a PNG named .jpg", format="PNG")
    img("[red]brackets[/].png", Image.new("RGB", (24, 24), GREEN), "Rich markup in the name")

    # ---- skipped: each with the reason a user should read ------------------------------------------
    jpeg = _noise_jpeg()
    raw("truncated.jpg", jpeg[: len(jpeg) // 2])
    skipped["truncated.jpg"] = "truncated"
    raw("empty.jpg", b"")
    skipped["empty.jpg"] = "empty"
    raw("text.jpg", b"this is not a picture\n" * 20)
    skipped["text.jpg"] = "not an image"
    raw("[/]closing tag.jpg", b"markup that would crash Rich if printed unescaped\n")
    skipped["[/]closing tag.jpg"] = "not an image"
    raw("bomb.png", bomb_png(10000, 9000))
    skipped["bomb.png"] = "too large"
    ignored += [".dotfile.jpg", ".hidden/a.jpg", ".hidden/deep/b.png", "sub/.cache/c.jpg", "notes.txt"]
    for rel in ignored[:4]:
        img(rel, Image.new("RGB", (8, 8), RED), "")
        del good[rel]
    raw("notes.txt", b"not an image extension\n")

    # chmod 000: skipped, unless this process (root) can read it anyway.
    locked = img("locked.png", Image.new("RGB", (24, 24), GREEN), "chmod 000 but readable (running as root)")
    locked.chmod(0)
    if not _readable(locked):
        del good["locked.png"]
        skipped["locked.png"] = "permission denied"
    locked_dir = root / "locked_dir"
    img("locked_dir/inside.jpg", Image.new("RGB", (24, 24), GREEN), "in a chmod 000 folder readable as root")
    locked_dir.chmod(0)
    if not os.access(locked_dir, os.R_OK | os.X_OK):
        del good["locked_dir/inside.jpg"]
        skipped["locked_dir/"] = "permission denied"

    if hasattr(os, "symlink"):
        try:
            os.symlink("does-not-exist.jpg", root / "broken_link.jpg")
            skipped["broken_link.jpg"] = "broken symlink"
            os.symlink("loop_b.jpg", root / "loop_a.jpg")
            os.symlink("loop_a.jpg", root / "loop_b.jpg")
            skipped["loop_a.jpg"] = skipped["loop_b.jpg"] = "symlink loop"
            os.symlink("rgb.jpg", root / "link_to_rgb.jpg")
            good["link_to_rgb.jpg"] = "symlink to a good file"
            os.symlink(".", root / "sub" / "loop_dir")  # a folder that contains itself: never followed
            if os.path.exists("/dev/zero"):
                os.symlink("/dev/zero", root / "dev_zero.jpg")  # endless bytes
                skipped["dev_zero.jpg"] = "not a regular file"
        except OSError:  # no symlinks here (Windows without developer mode)
            pass
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "pipe.jpg")  # open() would wait for a writer forever
        skipped["pipe.jpg"] = "not a regular file"
    try:  # a name that is not UTF-8 (Linux allows any bytes): must not crash a report or the index
        name = os.fsdecode(b"latin1-\xe9t\xe9.jpg")
        raw(name, jpeg[:300])
        skipped[name] = "truncated"
    except (OSError, UnicodeError):
        pass
    return {"root": root, "good": good, "skipped": skipped, "ignored": ignored, "colour": colour}


def write_good_folder(root: Path, n: int = 16, size: int = 24, seed: int = 0) -> Path:
    """`n` small random RGB PNGs: a folder pretrain can run on."""
    import numpy as np

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"img{i:03d}.png")
    return root
