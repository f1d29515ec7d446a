"""Image I/O that refuses bad input with a reason, and PNG output that carries its provenance.

Arrays are (H, W, 3) uint8 RGB unless a function says otherwise.
"""
from __future__ import annotations

import io
import json
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .errors import PhotoRejected
from .records import SourceImage, sha256_hex

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
METADATA_KEY = "megaportrait"
XMP_KEY = "XML:com.adobe.xmp"
AI_GENERATED_LABEL = "AI-generated image (MegaPortrait): a synthetic portrait, not a photograph"
# IPTC digital source type for media created by a trained model.
IPTC_TRAINED_ALGORITHMIC = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def load_image(
    source: str | Path | bytes,
    *,
    origin: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> SourceImage:
    """Decode a photo file (or its bytes) into a `SourceImage`, EXIF orientation applied.

    Raises PhotoRejected with reason "not_a_file" (a device, FIFO, directory or socket, through any symlink),
    "too_large" (over `max_bytes`; both checked on the open file before a byte is read), "unreadable" (missing, not
    an image, corrupt, truncated) or "decompression_bomb" (declared size above `max_pixels`, checked before any pixel
    is decoded).
    """
    if isinstance(source, (bytes, bytearray)):
        data, origin = bytes(source), origin or "<bytes>"
        if len(data) > max_bytes:
            raise PhotoRejected(origin, "too_large", f"{len(data)} bytes (limit {max_bytes})")
    else:
        origin = origin or str(source)
        data = _read_bounded(Path(source), origin, max_bytes)
    if not data:
        raise PhotoRejected(origin, "unreadable", "file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise PhotoRejected(origin, "decompression_bomb", f"declares {w}x{h} = {w * h} pixels (limit {max_pixels})")
            im.load()
            im = ImageOps.exif_transpose(im)
            pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except PhotoRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PhotoRejected(origin, "decompression_bomb", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise PhotoRejected(origin, "unreadable", "not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise PhotoRejected(origin, "unreadable", f"corrupt or truncated image data ({exc})") from exc
    return SourceImage(pixels=np.ascontiguousarray(pixels), sha256=sha256_hex(data), origin=origin)


def _read_bounded(path: Path, origin: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`, checked on the open descriptor (no race with a swap)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO must not wait for a writer
    except OSError as exc:
        raise PhotoRejected(origin, "unreadable", f"cannot open file ({exc.strerror or exc})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PhotoRejected(origin, "not_a_file", "not a regular file (a device, pipe, socket or directory)")
        if st.st_size > max_bytes:
            raise PhotoRejected(origin, "too_large", f"{st.st_size} bytes (limit {max_bytes})")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise PhotoRejected(origin, "unreadable", f"cannot read file ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # grew after the check
        raise PhotoRejected(origin, "too_large", f"more than {max_bytes} bytes")
    return data


def _xmp_packet(label: str) -> str:
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/">'
        f"<Iptc4xmpExt:DigitalSourceType>{IPTC_TRAINED_ALGORITHMIC}</Iptc4xmpExt:DigitalSourceType>"
        f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{label}</rdf:li></rdf:Alt></dc:description>'
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
    )


def encode_png(pixels: np.ndarray, metadata: dict | None = None) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 image with `metadata` as JSON text and an XMP AI-generated label."""
    info = PngImagePlugin.PngInfo()
    meta = dict(metadata or {})
    meta.setdefault("provenance", AI_GENERATED_LABEL)
    info.add_itxt(METADATA_KEY, json.dumps(meta, sort_keys=True, default=str))
    info.add_itxt(XMP_KEY, _xmp_packet(meta["provenance"]))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_png_metadata(png: bytes) -> dict:
    """The MegaPortrait metadata and XMP packet embedded by `encode_png` (empty dict when absent)."""
    im = Image.open(io.BytesIO(png))
    text = getattr(im, "text", {}) or {}
    meta = json.loads(text[METADATA_KEY]) if METADATA_KEY in text else {}
    if XMP_KEY in text:
        meta["xmp"] = text[XMP_KEY]
    return meta


def decode_png(png: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of PNG bytes."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.uint8)
