"""Loading refuses bad files with a reason; PNG output carries metadata and the AI-generated label."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from megaportrait.shared.errors import PhotoRejected
from megaportrait.shared.imaging import (
    AI_GENERATED_LABEL,
    IPTC_TRAINED_ALGORITHMIC,
    decode_png,
    encode_png,
    load_image,
    read_png_metadata,
)


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _corrupt_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    start = data.index(b"IDAT") + 40
    data[start:start + 64] = bytes(range(64))
    return bytes(data)


def test_loads_real_photo_with_file_hash(people):
    path = people["obama"][0]
    img = load_image(path)
    assert img.pixels.dtype == np.uint8 and img.pixels.ndim == 3 and img.pixels.shape[2] == 3
    import hashlib

    assert img.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda good: b"", "unreadable"),
        (lambda good: b"this is not an image at all" * 10, "unreadable"),
        (lambda good: good[: len(good) // 3], "unreadable"),  # truncated JPEG
        (lambda good: _corrupt_png(), "unreadable"),  # compressed pixel data overwritten
    ],
    ids=["empty", "not-an-image", "truncated", "corrupt"],
)
def test_refuses_broken_files(astronaut, make, reason):
    with pytest.raises(PhotoRejected) as err:
        load_image(make(_jpeg(astronaut)), origin="case")
    assert err.value.reason == reason
    assert "case" in str(err.value)


def test_refuses_decompression_bomb_before_decoding():
    # A 20000 x 20000 PNG compresses to a few hundred kB; its header alone must be enough to refuse it.
    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, format="PNG")
    with pytest.raises(PhotoRejected) as err:
        load_image(buf.getvalue(), max_pixels=40_000_000)
    assert err.value.reason == "decompression_bomb"


def test_missing_file_is_unreadable(tmp_path):
    with pytest.raises(PhotoRejected) as err:
        load_image(tmp_path / "nope.jpg")
    assert err.value.reason == "unreadable"


def test_exif_orientation_is_applied(astronaut):
    im = Image.fromarray(astronaut[:, :400])  # 512 x 400, portrait when rotated
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).pixels.shape[:2] == (400, 512)


def test_png_carries_metadata_and_ai_label(astronaut):
    png = encode_png(astronaut, {"backend": "classic", "identity_score": 0.7})
    meta = read_png_metadata(png)
    assert meta["backend"] == "classic" and meta["identity_score"] == 0.7
    assert meta["provenance"] == AI_GENERATED_LABEL
    assert IPTC_TRAINED_ALGORITHMIC in meta["xmp"]
    np.testing.assert_array_equal(decode_png(png), astronaut)


def test_refuses_devices_pipes_directories_and_huge_files_before_reading(tmp_path, people):
    """A symlink to /dev/zero, a FIFO (no writer), a directory and a sparse 5 GiB file are refused from their metadata,
    at once and without reading; a symlink to a real photo still loads."""
    import os
    import time

    zero = tmp_path / "zero.jpg"
    zero.symlink_to("/dev/zero")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as fh:
        fh.truncate(5 * 1024**3)  # sparse: no disk used, but reading it would allocate 5 GiB
    started = time.monotonic()
    for path, reason in ((zero, "not_a_file"), (fifo, "not_a_file"), (folder, "not_a_file"), (huge, "too_large")):
        with pytest.raises(PhotoRejected) as err:
            load_image(path)
        assert err.value.reason == reason, (path.name, err.value)
    assert time.monotonic() - started < 2.0
    photo = people["obama"][0]
    with pytest.raises(PhotoRejected) as err:
        load_image(photo, max_bytes=photo.stat().st_size - 1)  # the configured limit is the one applied
    assert err.value.reason == "too_large" and f"limit {photo.stat().st_size - 1}" in err.value.detail
    with pytest.raises(PhotoRejected) as err:
        load_image(photo.read_bytes(), max_bytes=1000)
    assert err.value.reason == "too_large"
    link = tmp_path / "link.jpg"
    link.symlink_to(photo)
    assert load_image(link).sha256 == load_image(photo).sha256
