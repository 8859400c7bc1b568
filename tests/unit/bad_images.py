"""A real corpus of awkward image files, written with Pillow and numpy, for the decoder tests.

`make_bad_corpus(root)` writes every file and returns {filename: kind}; kind is "ok" for a file that must decode,
else the reason it must be refused: "empty", "truncated", "not_image" or "bomb".
Good files are SIZE pixels unless EXPECTED_SIZE says otherwise; the colours each one must decode to are in the tests.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image, features

SIZE = (40, 30)  # (width, height) of every small good file
RED, BLUE, GREEN = (200, 30, 30), (30, 30, 200), (0, 200, 0)

KINDS = {
    "ok.jpg": "ok",
    "ok.png": "ok",
    "ok.bmp": "ok",
    "gray.png": "ok",
    "palette.png": "ok",
    "palette_transparent.png": "ok",
    "palette_transparent.gif": "ok",
    "rgba.png": "ok",
    "la.png": "ok",
    "cmyk.jpg": "ok",
    "gray16.png": "ok",
    "gray16.tif": "ok",
    "int32.tif": "ok",
    "float.tif": "ok",
    "bilevel.png": "ok",
    "ok.tif": "ok",
    "ok.webp": "ok",
    "exif_rotate.jpg": "ok",
    "corrupt_exif.jpg": "ok",
    "big.jpg": "ok",
    "empty.jpg": "empty",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "notes.jpg": "not_image",
    "fake_header_bomb.png": "bomb",
    "bomb.png": "bomb",
    "bomb_between_limits.png": "bomb",
}
EXPECTED_SIZE = {"exif_rotate.jpg": (SIZE[1], SIZE[0]), "big.jpg": (3000, 2000)}
BOMB_SIDE = 20_000  # a 20000x20000 1-bit PNG: 400 Mpixels, > 2x Pillow's limit, a few KB on disk
BETWEEN_SIDE = 12_000  # 144 Mpixels: above Pillow's warning limit, below its hard limit; finegrain refuses it


def halves(left: tuple[int, ...], right: tuple[int, ...], *, size=SIZE) -> np.ndarray:
    """[H, W, C] uint8: left half one colour, right half another."""
    w, h = size
    arr = np.empty((h, w, len(left)), dtype=np.uint8)
    arr[:, : w // 2] = left
    arr[:, w // 2 :] = right
    return arr


def gradient16(size=SIZE) -> np.ndarray:
    """[H, W] uint16: columns run linearly from 0 to 65535."""
    w, h = size
    return np.tile(np.linspace(0, 65535, w).round().astype(np.uint16), (h, 1))


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def write_bilevel_png(path: str, side: int, *, idat: bool = True) -> None:
    """A real all-black 1-bit side x side PNG, streamed row by row (Pillow would need side² bytes of memory)."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
    body = b""
    if idat:
        comp = zlib.compressobj(9)
        block = bytes((1 + (side + 7) // 8) * 1000)  # 1000 rows: filter byte 0 + packed zero bits
        full, rest = divmod(side, 1000)
        body = b"".join(comp.compress(block) for _ in range(full)) + comp.compress(block[: len(block) // 1000 * rest])
        body = _png_chunk(b"IDAT", body + comp.flush())
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + header + body + _png_chunk(b"IEND", b""))


def _palette_image(transparent: bool) -> Image.Image:
    """P image: index 0 (black) on the left half, index 1 (GREEN) on the right; index 0 transparent if asked."""
    img = Image.fromarray(halves((0,), (1,))[..., 0], "L").convert("P")
    img.putpalette([0, 0, 0, *GREEN] + [0, 0, 0] * 254)
    if transparent:
        img.info["transparency"] = 0
    return img


def _noise_bytes(fmt: str) -> bytes:
    """A real, incompressible image file, so cutting it in half cuts into the pixel data, not the headers."""
    arr = np.random.default_rng(0).integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, quality=95)  # PNG ignores quality
    return buf.getvalue()


def _write_good(root: str) -> None:
    def out(name: str) -> str:
        return os.path.join(root, name)

    rgb = Image.fromarray(halves(RED, BLUE))
    rgb.save(out("ok.jpg"), quality=95)
    rgb.save(out("ok.png"))
    rgb.save(out("ok.bmp"))
    rgb.save(out("ok.tif"))
    if features.check("webp"):
        rgb.save(out("ok.webp"), lossless=True)
    Image.new("L", SIZE, 128).save(out("gray.png"))
    _palette_image(False).save(out("palette.png"))
    for name in ("palette_transparent.png", "palette_transparent.gif"):
        img = _palette_image(True)
        img.save(out(name), transparency=0)
    # left half fully transparent black, right half opaque blue, bottom row half-transparent black
    rgba = halves((0, 0, 0, 0), (*BLUE, 255))
    rgba[-1] = (0, 0, 0, 128)
    Image.fromarray(rgba, "RGBA").save(out("rgba.png"))
    Image.fromarray(halves((0, 0), (50, 255)), "LA").save(out("la.png"))
    Image.fromarray(halves((0, 255, 255, 0), (255, 255, 0, 0)), "CMYK").save(out("cmyk.jpg"), quality=95)
    Image.fromarray(gradient16()).save(out("gray16.png"))
    Image.fromarray(gradient16()).save(out("gray16.tif"))
    Image.fromarray(gradient16().astype(np.int32)).save(out("int32.tif"))
    Image.fromarray(gradient16().astype(np.float32) / 65535.0 * 7.0 - 3.0).save(out("float.tif"))
    checker = (np.indices(SIZE[::-1]).sum(axis=0) % 2).astype(bool)
    Image.fromarray(checker).save(out("bilevel.png"))  # mode "1"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    rgb.save(out("exif_rotate.jpg"), quality=95, exif=exif)
    broken_exif = b"Exif\x00\x00II*\x00\xff\xff\xff\x7f"  # a TIFF header whose first IFD lies past the end
    rgb.save(out("corrupt_exif.jpg"), quality=95, exif=broken_exif)
    yy, xx = np.mgrid[0:2000, 0:3000]
    big = np.stack([xx * 255 // 2999, yy * 255 // 1999, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    Image.fromarray(big).save(out("big.jpg"), quality=85)


def _write_bad(root: str) -> None:
    def out(name: str) -> str:
        return os.path.join(root, name)

    open(out("empty.jpg"), "wb").close()
    for name, fmt in (("truncated.jpg", "JPEG"), ("truncated.png", "PNG")):
        data = _noise_bytes(fmt)
        with open(out(name), "wb") as f:
            f.write(data[: len(data) // 2])
    with open(out("notes.jpg"), "w", encoding="utf-8") as f:
        f.write("These are my notes about the birds.\nNot a picture.\n")
    # 100000x100000 claimed by the header alone: nothing behind it
    write_bilevel_png(out("fake_header_bomb.png"), 100_000, idat=False)
    write_bilevel_png(out("bomb.png"), BOMB_SIDE)
    write_bilevel_png(out("bomb_between_limits.png"), BETWEEN_SIDE)


def make_bad_corpus(root: str | os.PathLike) -> dict[str, str]:
    """Write the corpus under `root`; return {filename: kind} for every file written (WebP only where supported)."""
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    _write_good(root)
    _write_bad(root)
    return {name: kind for name, kind in KINDS.items() if os.path.exists(os.path.join(root, name))}
