"""load_image over a real corpus of awkward files: every good one becomes RGB, every bad one a one-line reason."""

from __future__ import annotations

import gc
import os
import re
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from finegrain.data.decode import MAX_IMAGE_PIXELS, ImageDecodeError, load_image
from tests.unit.bad_images import BLUE, EXPECTED_SIZE, GREEN, KINDS, RED, SIZE, make_bad_corpus

WHITE = (255, 255, 255)
GOOD = sorted(name for name, kind in KINDS.items() if kind == "ok")
BAD = sorted(name for name, kind in KINDS.items() if kind != "ok")
# What each refusal's one-line message must say, by kind.
REASON_WORDS = {
    "empty": ["empty"],
    "not_image": ["not an image"],
    "truncated": ["cannot decode", "truncated"],
    "bomb": ["decompression bomb", "pixels"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, dict[str, str]]:
    root = str(tmp_path_factory.mktemp("bad_images"))
    return root, make_bad_corpus(root)


def _path(corpus, name: str) -> str:
    root, kinds = corpus
    if name not in kinds:
        pytest.skip(f"{name} not written here (format unsupported by this Pillow build)")
    return os.path.join(root, name)


def _pixels(corpus, name: str, **kwargs) -> np.ndarray:
    img = load_image(_path(corpus, name), **kwargs)
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)  # [H, W, 3]


def test_corpus_has_every_kind(corpus):
    _, kinds = corpus
    assert set(kinds.values()) == {"ok", *REASON_WORDS}
    assert set(kinds) >= set(KINDS) - {"ok.webp"}


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("name", GOOD)
def test_good_file_decodes_to_rgb_at_its_size(corpus, name):
    img = load_image(_path(corpus, name))
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    assert img.size == EXPECTED_SIZE.get(name, SIZE)
    img.getpixel((0, 0))  # fully decoded: pixel access works without the file


@pytest.mark.parametrize("name", BAD)
def test_bad_file_raises_one_line_reason(corpus, name):
    with pytest.raises(ImageDecodeError) as excinfo:
        load_image(_path(corpus, name))
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, repr(msg)
    for word in REASON_WORDS[KINDS[name]]:
        assert word in msg.lower(), f"{name}: {msg!r} should mention {word!r}"
    assert excinfo.value.__cause__ is None  # the reason is the whole story: no chained traceback for the CLI


@pytest.mark.parametrize("name", ["ok.png", "ok.bmp", "ok.tif", "ok.webp"])
def test_lossless_rgb_keeps_exact_colours(corpus, name):
    a = _pixels(corpus, name)
    w = SIZE[0]
    assert (a[:, : w // 2] == RED).all()
    assert (a[:, w // 2 :] == BLUE).all()


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("name", ["ok.jpg", "corrupt_exif.jpg"])
def test_jpeg_colours_close(corpus, name):
    a = _pixels(corpus, name)
    assert np.abs(a[15, 5] - RED).max() <= 12
    assert np.abs(a[15, 35] - BLUE).max() <= 12


def test_exif_orientation_6_is_applied(corpus):
    a = _pixels(corpus, "exif_rotate.jpg")
    assert a.shape[:2] == (SIZE[0], SIZE[1])  # stored 40 wide x 30 high, displayed 30 wide x 40 high
    # orientation 6: the stored left column is the displayed top row
    assert np.abs(a[5, 15] - RED).max() <= 12
    assert np.abs(a[35, 15] - BLUE).max() <= 12


def test_gray_l_becomes_equal_channels(corpus):
    a = _pixels(corpus, "gray.png")
    assert (a == 128).all()


def test_palette_without_transparency_keeps_black(corpus):
    a = _pixels(corpus, "palette.png")
    assert (a[:, :20] == 0).all()
    assert (a[:, 20:] == GREEN).all()


@pytest.mark.parametrize("name", ["palette_transparent.png", "palette_transparent.gif"])
def test_palette_transparency_composites_on_white(corpus, name):
    a = _pixels(corpus, name)
    assert (a[:, :20] == WHITE).all()  # transparent index 0 (black in the palette) shows the white background
    assert (a[:, 20:] == GREEN).all()


def test_rgba_transparent_area_is_white(corpus):
    a = _pixels(corpus, "rgba.png")
    assert (a[:-1, :20] == WHITE).all()  # fully transparent black → white, not black
    assert (a[:-1, 20:] == BLUE).all()  # opaque pixels untouched
    assert np.abs(a[-1] - 127).max() <= 1  # black at alpha 128 over white → mid-gray


def test_la_composites_on_white(corpus):
    a = _pixels(corpus, "la.png")
    assert (a[:, :20] == WHITE).all()
    assert (a[:, 20:] == 50).all()


def test_cmyk_jpeg_colours(corpus):
    a = _pixels(corpus, "cmyk.jpg")
    assert np.abs(a[15, 5] - (255, 0, 0)).max() <= 12  # C=0 M=255 Y=255 K=0 is red
    assert np.abs(a[15, 35] - (0, 0, 255)).max() <= 12  # C=255 M=255 Y=0 K=0 is blue


@pytest.mark.parametrize("name", ["gray16.png", "gray16.tif", "int32.tif", "float.tif"])
def test_high_bit_depth_gray_is_scaled_not_clipped(corpus, name):
    a = _pixels(corpus, name)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()
    row = a[0, :, 0]
    # the 0..65535 ramp must come out as a 0..255 ramp: a clipped conversion is 255 from the second column on
    assert np.abs(row - np.linspace(0, 255, SIZE[0])).max() <= 1.5, row
    assert abs(row[SIZE[0] // 2] - 128) <= 5  # mid-gray stays mid-gray
    assert (row == 255).sum() == 1


def test_bilevel_is_black_and_white(corpus):
    a = _pixels(corpus, "bilevel.png")
    assert set(np.unique(a)) == {0, 255}
    assert (a[0, 0] == 0).all() and (a[0, 1] == 255).all() and (a[1, 0] == 255).all()


def test_max_pixels_refuses_a_small_image_over_the_limit(corpus):
    path = _path(corpus, "ok.png")
    w, h = SIZE
    assert load_image(path, max_pixels=w * h).size == SIZE  # exactly at the limit is fine
    with pytest.raises(ImageDecodeError) as excinfo:
        load_image(path, max_pixels=w * h - 1)
    msg = str(excinfo.value)
    assert "\n" not in msg and f"{w}x{h}" in msg and "decompression" in msg and "pixels" in msg


def test_real_bomb_refused_even_when_pillow_limit_disabled(corpus, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # someone else switched Pillow's own check off
    for name in ("bomb.png", "bomb_between_limits.png"):
        with pytest.raises(ImageDecodeError, match="pixels"):
            load_image(_path(corpus, name))


def test_default_limit_is_pillows_warning_limit():
    assert MAX_IMAGE_PIXELS == 89_478_485


@pytest.mark.parametrize(("min_side", "max_short"), [(224, 448), (500, 1000), (900, 1000)])
def test_min_side_draft_decodes_big_jpeg_smaller(corpus, min_side, max_short):
    img = load_image(_path(corpus, "big.jpg"), min_side=min_side)
    assert img.mode == "RGB"
    assert min_side <= min(img.size) <= max_short  # never below what the caller resizes to, well below 2000
    assert abs(img.width / img.height - 1.5) < 0.01
    a = np.asarray(img).astype(int)  # the gradient survives the reduced decode: dark blue top-left, yellow bottom-right
    assert np.abs(a[0, 0] - (0, 0, 90)).max() <= 12
    assert np.abs(a[-1, -1] - (255, 255, 90)).max() <= 12


def test_min_side_close_to_the_short_side_decodes_full_size(corpus):
    assert load_image(_path(corpus, "big.jpg"), min_side=1500).size == (3000, 2000)
    assert load_image(_path(corpus, "big.jpg")).size == (3000, 2000)
    assert load_image(_path(corpus, "ok.jpg"), min_side=16).size == SIZE  # 30 < 2 x 16: no reduction


def test_min_side_reduces_any_jpeg_but_never_png(corpus):
    assert 8 <= min(load_image(_path(corpus, "ok.jpg"), min_side=8).size) < SIZE[1]  # 30 >= 2 x 8: DCT-scaled
    assert load_image(_path(corpus, "ok.png"), min_side=4).size == SIZE


def test_missing_file_and_folder_are_decode_errors(tmp_path):
    with pytest.raises(ImageDecodeError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageDecodeError) as excinfo:
        load_image(tmp_path)
    assert "\n" not in str(excinfo.value)


def test_no_file_handle_left_open(corpus):
    """Every file is closed when load_image returns or raises, GIFs and truncated files included."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")  # e.g. Pillow's "Corrupt EXIF data"
        warnings.simplefilter("always", ResourceWarning)
        root, kinds = corpus
        errors = []
        for name in kinds:
            try:
                load_image(os.path.join(root, name))
            except ImageDecodeError as e:
                errors.append(e)  # callers keep the errors of bad files to report them
        gc.collect()
        assert len(errors) == len(BAD)
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, leaks


def test_importing_finegrain_keeps_truncated_images_an_error():
    import finegrain
    import finegrain.data  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    src = os.path.dirname(finegrain.__file__)
    setters = []
    for dirpath, _, filenames in os.walk(src):
        for fname in filenames:
            if fname.endswith(".py"):
                with open(os.path.join(dirpath, fname), encoding="utf-8") as f:
                    if re.search(r"LOAD_TRUNCATED_IMAGES\s*=(?!=)", f.read()):
                        setters.append(fname)
    assert not setters, f"these modules set Pillow's global LOAD_TRUNCATED_IMAGES: {setters}"


def _int32_tiff(path, arr: np.ndarray) -> str:
    img = Image.fromarray(arr.astype(np.int32))
    assert img.mode == "I"
    img.save(path)
    with Image.open(path) as check:  # a real 32-bit signed integer TIFF, read back as mode I
        assert check.mode == "I" and np.array_equal(np.asarray(check), arr)
    return str(path)


@pytest.mark.parametrize(("lo", "hi"), [(0, 1_000_000), (-500_000, 500_000)])
def test_int32_tiff_beyond_16_bits_is_scaled_by_its_range(tmp_path, lo, hi):
    """Issue 10: values above 65535 came out 92% white (divided by 65535, then clipped)."""
    w, h = SIZE
    ramp = np.rint(np.linspace(lo, hi, w)).astype(np.int64)
    path = _int32_tiff(tmp_path / "ramp.tif", np.tile(ramp, (h, 1)))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == SIZE
    a = np.asarray(img).astype(int)
    assert (a == a[:1, :, :]).all() and (a[..., 0] == a[..., 2]).all()  # every row the same gray ramp
    row = a[0, :, 0]
    assert abs(a.mean() - 127.5) <= 3, a.mean()  # mid-gray on average, not mostly white
    assert (a == 255).mean() <= 1.5 / w  # only the brightest column is white
    assert row[0] == 0 and row[-1] == 255
    assert (np.diff(row) > 0).all(), row  # the gradient keeps its order, no flat clipped run
    assert np.abs(row - np.linspace(0, 255, w)).max() <= 1.5, row


def test_int32_tiff_in_16_bit_range_keeps_the_absolute_scale(tmp_path):
    """Mode-I data that fits 16 bits is still divided by 65535: a dark image stays dark, not stretched."""
    w, h = SIZE
    ramp = np.rint(np.linspace(0, 32768, w)).astype(np.int64)  # 0 .. half of 16-bit white
    img = load_image(_int32_tiff(tmp_path / "dark.tif", np.tile(ramp, (h, 1))))
    row = np.asarray(img).astype(int)[0, :, 0]
    assert np.abs(row - np.rint(ramp / 65535 * 255)).max() <= 1, row
    assert row.max() <= 128


def test_malformed_exif_decodes_without_a_warning_that_says_nothing_to_the_user(tmp_path):
    """EXIF whose tag points past its block: Pillow warns "Tag data larger than file" on stderr; the pixels are fine."""
    import io
    import struct
    import warnings

    from PIL import Image, ImageOps

    from finegrain.data.decode import load_image

    ifd = struct.pack("<2sHI", b"II", 42, 8) + struct.pack("<H", 1) + struct.pack("<HHII", 0x010E, 2, 5000, 100)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, "JPEG", exif=b"Exif\x00\x00" + ifd + struct.pack("<I", 0))
    path = tmp_path / "exif.jpg"
    path.write_bytes(buf.getvalue())
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        ImageOps.exif_transpose(Image.open(path))
    assert any("Tag data larger than file" in str(w.message) for w in raw)  # Pillow does warn on this file
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        img = load_image(str(path))
    assert img.size == (64, 48) and not ours
