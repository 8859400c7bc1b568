"""Uploads: the size limit (declared and streamed), the multipart form, and decoding with finegrain's robust decoder.

Every way an upload can be wrong ends as an `UploadError` with an HTTP status and a one-line reason: 413 too large
(by Content-Length before reading, or counted while the body streams in), 415 not an image, 422 a file that starts
like an image but cannot be used (empty, truncated, a decompression bomb) or a form without an image.
"""

from __future__ import annotations

import os
import tempfile

from PIL import Image

from finegrain.data import ImageDecodeError, load_image

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# A 20 MB file can hold ~100 megapixels of JPEG; 50 megapixels covers phone and most camera photos, and refuses
# the decompression bombs Pillow would only warn about (its own warning starts at 89 megapixels).
MAX_PIXELS = 50_000_000
# The eval view resizes the short side to ~256 px: a 1 x 20,000 strip would become 256 x 5,120,000 pixels (4 GB).
MAX_ASPECT = 50
FORM_SLACK_BYTES = 64 * 1024  # multipart boundaries, headers and the small fields beside the file
DRAIN_FACTOR = 5  # a refused body is read (and dropped) up to 5x the limit so its 413 reaches the client


class UploadError(Exception):
    """An upload the service refuses: `status` (4xx) and a one-line `reason`."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class _CountingReceive:
    """The ASGI `receive` of a request, refusing a body that streams past `limit` bytes (chunked, or lying about
    its Content-Length)."""

    def __init__(self, receive, limit: int, shown_limit: int) -> None:
        self.receive, self.limit, self.shown_limit, self.seen, self.done = receive, limit, shown_limit, 0, False

    async def __call__(self):
        message = await self.receive()
        if message.get("type") == "http.request":
            self.seen += len(message.get("body", b""))
            self.done = not message.get("more_body", False)
            if self.seen > self.limit:
                raise UploadError(413, f"upload larger than the {_mb(self.shown_limit)} limit")
        else:
            self.done = True  # http.disconnect
        return message

    async def drain(self, cap: int) -> None:
        """Read and drop the rest of a refused body, up to `cap` bytes in all: a client still sending when the
        server answers and closes gets a connection reset instead of the answer (a 413 must reach it)."""
        while not self.done and self.seen <= cap:
            message = await self.receive()
            self.seen += len(message.get("body", b""))
            self.done = message.get("type") != "http.request" or not message.get("more_body", False)


def _mb(n: int) -> str:
    return f"{n / 1024 / 1024:g} MB"


def check_declared_size(headers, max_bytes: int) -> None:
    """413 before reading anything when Content-Length already says the body is too large."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + FORM_SLACK_BYTES:
        raise UploadError(413, f"upload of {_mb(int(declared))} is larger than the {_mb(max_bytes)} limit")


async def read_upload(request, max_bytes: int = MAX_UPLOAD_BYTES) -> tuple[bytes, dict[str, str]]:
    """The image bytes of a request and its other form fields. Accepts multipart/form-data with one file field
    (any name; `image` by convention) or a raw body with an image/* or application/octet-stream content type."""
    from starlette.requests import Request

    counting = _CountingReceive(request.receive, max_bytes + FORM_SLACK_BYTES, max_bytes)
    try:
        return await _read(Request(request.scope, counting), max_bytes)
    except UploadError as e:
        if e.status == 413:
            await counting.drain(DRAIN_FACTOR * max_bytes)
        raise


async def _read(limited, max_bytes: int) -> tuple[bytes, dict[str, str]]:
    check_declared_size(limited.headers, max_bytes)
    ctype = limited.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        data = await limited.body()
        fields: dict[str, str] = {}
    elif ctype == "multipart/form-data":
        data, fields = await _read_form(limited)
    else:
        raise UploadError(415, f"send the image as multipart/form-data (field 'image'), not {ctype or 'no type'}")
    if len(data) > max_bytes:
        raise UploadError(413, f"upload of {_mb(len(data))} is larger than the {_mb(max_bytes)} limit")
    return data, fields


async def _read_form(request) -> tuple[bytes, dict[str, str]]:
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    try:
        form = await request.form(max_files=1, max_fields=16)
    except UploadError:
        raise
    except HTTPException as e:  # Starlette's own refusal of a malformed form
        raise UploadError(400, f"malformed multipart form: {e.detail}") from None
    except (MultiPartException, Exception) as e:  # noqa: BLE001 - hostile bytes are the request's fault
        raise UploadError(400, f"malformed multipart form: {getattr(e, 'message', None) or e}") from None
    try:
        files = [v for v in form.values() if isinstance(v, UploadFile)]
        if not files:
            raise UploadError(422, "no image in the request: send a file in the multipart field 'image'")
        data = await files[0].read()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
    finally:
        await form.close()
    return data, fields


def decode_upload(data: bytes, *, min_side: int | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Upload bytes -> an RGB image (EXIF orientation applied), through `finegrain.data.load_image`.

    UploadError 415 when the bytes are not an image at all, 422 when they are an unusable one."""
    if not data:
        raise UploadError(422, "empty file (0 bytes)")
    # load_image reads a path: its size check, format sniffing and Pillow's lazy decoding all work on the file
    fd, path = tempfile.mkstemp(prefix="finegrain-upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        img = load_image(path, min_side=min_side, max_pixels=max_pixels)
    except ImageDecodeError as e:
        status = 415 if str(e).startswith("not an image") else 422
        raise UploadError(status, str(e)) from None
    except Exception as e:  # noqa: BLE001 - a decoder crash on hostile bytes is the upload's fault, not a 500
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise UploadError(422, f"cannot decode ({type(e).__name__}: {first_line})") from None
    finally:
        os.unlink(path)
    w, h = img.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise UploadError(422, f"a {w}x{h} image is too elongated to classify (more than {MAX_ASPECT}:1)")
    return img
