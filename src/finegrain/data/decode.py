"""Robust image decoding: any photo a user has becomes RGB, or a one-line reason why it can't."""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# Pillow refuses images above 2x this many pixels and only warns above 1x; we refuse above 1x.
MAX_IMAGE_PIXELS = 89_478_485


class ImageDecodeError(Exception):
    """The file is not a usable image; str(e) is the reason, on one line."""


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit grayscale: scale to 8 bits instead of clipping (convert("L") would saturate).
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if mode == "F" or lo < 0 or hi > 65535:
            # Float data, and 32-bit integers outside the 16-bit range, have no fixed white point:
            # stretch the image's own min..max (dividing by 65535 and clipping would turn them mostly white).
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        else:
            # 8- or 16-bit data (mode "I" is also how Pillow stores 16-bit PNGs): keep the absolute scale.
            arr = arr / (65535.0 if mode.startswith("I;16") or hi > 255 else 255.0) * 255.0
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_image(
    path: str | os.PathLike, *, min_side: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode `path` to an RGB image with EXIF orientation applied.

    `min_side`: the short side the caller will resize to; a large JPEG is then decoded at a reduced DCT scale
    that still keeps at least that many pixels (much faster on camera photos, no visible change).
    Raises ImageDecodeError for zero-byte, truncated, non-image and decompression-bomb files.
    Truncated files fail here: Pillow's LOAD_TRUNCATED_IMAGES is left False on purpose.
    """
    try:
        if os.path.getsize(path) == 0:
            raise ImageDecodeError("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # malformed EXIF metadata ("Tag data larger than file", "Corrupt EXIF data"): the pixels are fine and
            # the warning tells a user nothing they can act on
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.(TiffImagePlugin|JpegImagePlugin)")
            # `with` closes the file on every path: Pillow keeps it open after load() for GIF/TIFF and on errors.
            with Image.open(path) as src:
                if src.width * src.height > max_pixels:
                    raise ImageDecodeError(
                        f"{src.width}x{src.height} pixels exceeds the decompression-bomb limit of {max_pixels}"
                    )
                if min_side and src.format == "JPEG" and min(src.size) >= 2 * min_side:
                    scale = min_side / min(src.size)
                    src.draft("RGB", (int(src.width * scale) + 1, int(src.height * scale) + 1))
                img = ImageOps.exif_transpose(src)  # also forces the full decode, so truncation surfaces here
                img.load()
            return _to_rgb(img)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"decompression bomb: {e}") from None
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageDecodeError(f"cannot decode ({msg})") from None


def unreadable(path: str) -> str | None:
    """Why `path` cannot be an image file (None: it may be one; decoding decides)."""
    if os.path.isdir(path):
        return "is a directory, not an image file"
    if not os.path.exists(path):
        return "no such file"
    return None
