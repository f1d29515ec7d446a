"""Source-photo intake: every bad kind of photo is refused with its reason; the batch goes on."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from megaportrait.client.faces import REJECTION_REASONS, crop_face, face_crop_set, intake_photos
from megaportrait.shared.config import FaceSettings
from megaportrait.shared.face_analysis import FaceAnalyzer, cosine
from megaportrait.shared.imaging import load_image


def _jpeg(pixels: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def analyzer():
    return FaceAnalyzer()


def test_real_hard_cases_are_refused_with_reasons(analyzer, people, shared_data):
    hard = shared_data / "hard"
    batch = [*people["obama"], hard / "two_faces.jpg", hard / "three_faces.jpg", hard / "low_res_240p.jpg",
             hard / "partial_face.jpg", hard / "low_res_320x240.jpg"]
    report = intake_photos(batch, analyzer=analyzer, show_progress=False)
    reasons = {k.split("/")[-1]: v for k, v in report.reasons().items()}
    assert reasons == {"two_faces.jpg": "several_faces", "three_faces.jpg": "several_faces",
                       "low_res_240p.jpg": "face_too_small", "partial_face.jpg": "face_cut_off"}
    accepted = {a.origin.split("/")[-1]: a for a in report.accepted}
    assert set(accepted) == {p.name for p in people["obama"]} | {"low_res_320x240.jpg"}
    assert accepted["low_res_320x240.jpg"].flags == ("low_resolution",)


def test_generated_degradations_are_refused(analyzer, people):
    good = load_image(people["obama"][0]).pixels
    cases = {
        "dark": _jpeg((good * 0.15).astype(np.uint8)),
        "overexposed": _jpeg(np.clip(good.astype(int) * 2.2 + 60, 0, 255).astype(np.uint8)),
        "blurred": _jpeg(cv2.GaussianBlur(good, (0, 0), 3)),
        "corrupt": _jpeg(good)[:5000],
        "not-an-image": b"GIF89a but not really" * 50,
        "no-face": _jpeg(good[:200, :200]),  # curtain and wall above the head
        "good": _jpeg(good),
    }
    report = intake_photos([c for c in cases.values()], analyzer=analyzer, show_progress=False)
    by_reason = sorted(r.reason for r in report.rejected)
    assert by_reason == sorted(["too_dark", "too_bright", "blurred", "unreadable", "unreadable", "no_face"])
    assert len(report.accepted) == 1
    assert set(by_reason) <= set(REJECTION_REASONS)


def test_crop_is_aligned_and_keeps_identity(analyzer, people):
    img = load_image(people["obama"][1])
    report = intake_photos([img], FaceSettings(crop_size=256), analyzer=analyzer, show_progress=False)
    crop = report.accepted[0].crop
    assert crop.pixels.shape == (256, 256, 3)
    right_eye, left_eye = crop.face.landmarks5[0], crop.face.landmarks5[1]
    assert abs(right_eye[1] - left_eye[1]) < 2.0, "eyes are level after alignment"
    assert 90 < (right_eye[0] + left_eye[0]) / 2 * 2 < 166 * 2  # centred horizontally
    # The crop is the same person: re-detected in the crop, it embeds close to the original.
    again = analyzer.analyze(crop.pixels, mesh=False, largest_only=True)[0]
    assert cosine(again.embedding, report.accepted[0].face.embedding) > 0.8
    # The mesh moved with the crop: its nose tip lands on the crop's nose landmark.
    assert np.linalg.norm(crop.face.mesh[1, :2] - crop.face.landmarks5[2]) < 12


def test_face_crop_set_mean_embedding(analyzer, people):
    report = intake_photos(people["biden"], analyzer=analyzer, show_progress=False)
    crops = face_crop_set("person-b", report)
    assert len(crops.crops) == 2 and crops.embedder.startswith("sface")
    for a in report.accepted:
        assert cosine(crops.mean_embedding, a.face.embedding) > 0.8


def test_a_batch_never_stops_on_one_photo_whatever_it_raises(analyzer, people, tmp_path):
    """Hostile files are refused by reason before they are read, and an unexpected error in one photo (here a
    MemoryError from the detector) is recorded against that photo while the rest of the batch goes on."""
    zero = tmp_path / "zero.jpg"
    zero.symlink_to("/dev/zero")
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as fh:
        fh.truncate(5 * 1024**3)
    poisoned = load_image(people["obama"][1])

    class Exploding:
        def __getattr__(self, name):
            return getattr(analyzer, name)

        def detect(self, image, **kw):
            if image.sha256 == poisoned.sha256:
                raise MemoryError("simulated")
            return analyzer.detect(image, **kw)

    report = intake_photos([zero, huge, people["obama"][1], people["obama"][0]], FaceSettings(), Exploding(), show_progress=False)
    assert [(r.origin.split("/")[-1], r.reason) for r in report.rejected] == [
        ("zero.jpg", "not_a_file"), ("huge.jpg", "too_large"), (people["obama"][1].name, "intake_failed")]
    assert "MemoryError" in report.rejected[2].detail
    assert [a.origin for a in report.accepted] == [str(people["obama"][0])]
    assert {r.reason for r in report.rejected} <= set(REJECTION_REASONS)
    small = intake_photos([people["obama"][0]], FaceSettings(max_image_bytes=1000), analyzer, show_progress=False)
    assert small.reasons() == {str(people["obama"][0]): "too_large"}  # the configured limit is the one applied
