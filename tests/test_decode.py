"""data/decode.py, one file at a time: modes, EXIF, 16-bit, alpha, refusals; and load_folder."""
import os
import threading
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from contrastive_cli.data import decode as decoding
from contrastive_cli.errors import InputError

from hostile import bomb_png

RED, BLUE = (255, 0, 0), (0, 0, 255)


def save(path, im, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def decode(path, size=16):
    out = decoding.decode_or_reason(path, size)
    assert not isinstance(out, str), out
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    return out.astype(int)


def reason(path, size=16):
    with decoding.quiet_pillow():  # Pillow warns about the decompression bombs these tests build
        out = decoding.decode_or_reason(path, size)
    assert isinstance(out, str), "expected a skip reason"
    return out


# ---- decode: every mode to an RGB square ----------------------------------------------------------
def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), BLUE)
    im.paste(RED, (0, 0, 20, 20))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: red ends up on top
    out = decode(save(tmp_path / "r.jpg", im, exif=exif, quality=95))
    top, bottom = out[:4].mean((0, 1)), out[-4:].mean((0, 1))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50
    plain = decode(save(tmp_path / "p.jpg", im, quality=95))  # no tag: left/right as stored
    assert plain[:, :4].mean((0, 1))[0] > 200 and plain[:, -4:].mean((0, 1))[2] > 200


def test_16_bit_is_scaled_not_clipped(tmp_path):
    a = np.repeat(np.arange(16, dtype=np.uint16)[None] * 17 * 257, 16, axis=0)  # 0, 17, ..., 255 in 16 bits
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    out = decode(save(tmp_path / "g16.png", im))
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    np.testing.assert_array_equal(out[0, :, 0], np.arange(16) * 17)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_32_bit_and_float_ranges():
    as8 = decoding._to_rgb(Image.fromarray(np.full((2, 2), 200, np.int32)))  # "I" within 0..255: kept
    assert np.asarray(as8)[0, 0].tolist() == [200] * 3
    unit = decoding._to_rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32)))  # "F" within 0..1
    assert np.asarray(unit)[0, 0].tolist() == [128] * 3
    nan = decoding._to_rgb(Image.fromarray(np.full((2, 2), np.nan, np.float32)))
    assert np.asarray(nan)[0, 0].tolist() == [0] * 3


def test_alpha_is_composited_over_white(tmp_path):
    im = Image.new("RGBA", (16, 16), (0, 0, 0, 128))  # half-transparent black
    im.paste((255, 0, 0, 0), (0, 0, 16, 8))  # fully transparent red: white
    out = decode(save(tmp_path / "a.png", im))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert np.abs(out[-1, 0] - 127).max() <= 1
    la = Image.new("LA", (16, 16), (0, 0))
    assert decode(save(tmp_path / "la.png", la))[0, 0].tolist() == [255, 255, 255]


def test_palette_transparency_and_other_modes(tmp_path):
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(0, (0, 0, 16, 8))
    out = decode(save(tmp_path / "p.png", pal, transparency=0))
    assert out[0, 0].tolist() == [255, 255, 255] and out[-1, 0].tolist() == [0, 0, 255]
    cmyk = decode(save(tmp_path / "c.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0))))
    assert cmyk[8, 8, 0] > 240 and cmyk[8, 8, 1:].max() < 15
    assert decode(save(tmp_path / "b.png", Image.new("1", (16, 16), 1)))[0, 0].tolist() == [255] * 3
    assert decode(save(tmp_path / "l.png", Image.new("L", (16, 16), 77)))[0, 0].tolist() == [77] * 3


def test_animation_first_frame_tiny_and_panorama(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE)]
    gif = save(tmp_path / "a.gif", frames[0], save_all=True, append_images=frames[1:], duration=50)
    assert decode(gif)[4, 4].tolist() == list(RED)
    assert decode(save(tmp_path / "one.png", Image.new("RGB", (1, 1), BLUE)))[0, 0].tolist() == list(BLUE)
    pano = Image.new("RGB", (4000, 50), BLUE)
    pano.paste(RED, (1975, 0, 2025, 50))  # the centre square survives the crop
    out = decode(save(tmp_path / "pano.png", pano), size=24)
    assert out[12, 12].tolist() == list(RED)


def test_a_png_named_jpg_is_decoded_by_its_content(tmp_path):
    assert decode(save(tmp_path / "x.jpg", Image.new("RGB", (8, 8), BLUE), format="PNG"))[0, 0].tolist() == list(BLUE)


# ---- decode: refusals, each with a reason, each bounded before decoding -------------------------
def test_reasons_for_broken_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert reason(tmp_path / "empty.jpg") == "empty file (0 bytes)"
    (tmp_path / "text.jpg").write_text("hello\n" * 10)
    assert reason(tmp_path / "text.jpg").startswith("not an image")
    good = save(tmp_path / "n.jpg", Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)))
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert reason(tmp_path / "cut.jpg") == "truncated file"
    (tmp_path / "dir.jpg").mkdir()
    assert reason(tmp_path / "dir.jpg").startswith("not a regular file")
    assert reason(tmp_path / "gone.jpg") == "file vanished"


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_reasons_for_bad_symlinks(tmp_path):
    os.symlink("missing.jpg", tmp_path / "broken.jpg")
    assert reason(tmp_path / "broken.jpg").startswith("broken symlink")
    os.symlink("b.jpg", tmp_path / "a.jpg")
    os.symlink("a.jpg", tmp_path / "b.jpg")
    assert reason(tmp_path / "a.jpg") == "symlink loop"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    out = []
    t = threading.Thread(target=lambda: out.append(decoding.decode_or_reason(fifo, 16)), daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():  # unblock the reader so the test run can end, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("decoding a FIFO blocked")
    assert out[0].startswith("not a regular file")


def test_pixel_limit_is_checked_before_any_pixel_is_decoded(tmp_path, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(bomb_png(10000, 9000))  # 90 M pixels: Pillow itself only warns

    def no_decoding(self):
        raise AssertionError("decoded a file over the pixel limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert reason(tmp_path / "bomb.png").startswith("too large: 10000 x 9000 = 90,000,000 pixels")
    (tmp_path / "huge.png").write_bytes(bomb_png(20000, 9000))  # over twice the limit: Pillow refuses it itself
    assert reason(tmp_path / "huge.png").startswith("too large: over twice")
    monkeypatch.undo()
    small = save(tmp_path / "small.png", Image.new("RGB", (20, 20)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 399)
    assert reason(small).startswith("too large: 20 x 20 = 400 pixels")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the user's way to switch the guard off
    decode(small)


def test_load_folder_keeps_warning_filters_and_reports_skips(tmp_path):
    save(tmp_path / "a.png", Image.new("RGB", (8, 8), RED))
    save(tmp_path / "b.png", Image.new("RGB", (8, 8), BLUE))
    (tmp_path / "bomb.png").write_bytes(bomb_png(10000, 9000))
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = decoding.load_folder(tmp_path, 8, workers=3)
    assert list(warnings.filters) == before
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert s.paths == ["a.png", "b.png"] and s.images.shape == (2, 8, 8, 3)
    assert s.images[0, 0, 0].tolist() == list(RED) and s.images[1, 0, 0].tolist() == list(BLUE)
    assert [p for p, _ in s.skipped] == ["bomb.png"]


def test_load_folder_without_usable_images(tmp_path):
    with pytest.raises(InputError, match="no image files"):
        decoding.load_folder(tmp_path, 8)
    (tmp_path / "x.jpg").write_bytes(b"nope")
    with pytest.raises(InputError, match=r"none of the 1 image files .* x\.jpg: not an image"):
        decoding.load_folder(tmp_path, 8)
