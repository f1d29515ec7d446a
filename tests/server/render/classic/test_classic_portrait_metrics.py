"""The four acceptance figures (shared.portrait_metrics) behave as defined, on a real template portrait."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from megaportrait.shared import portrait_metrics as pm
from megaportrait.shared.face_analysis import FaceAnalyzer, face_oval_mask
from megaportrait.shared.imaging import load_image


@pytest.fixture(scope="module")
def template(templates):
    return load_image(templates[3])


@pytest.fixture(scope="module")
def face(template):
    return FaceAnalyzer().analyze(template, largest_only=True)[0]


def test_lighting_correlation_ignores_exposure_but_sees_a_light_change(template, face):
    px = template.pixels
    assert pm.lighting_correlation(px, px, face.box) == pytest.approx(1.0)
    darker = (px.astype(np.float32) * 0.7).astype(np.uint8)
    assert pm.lighting_correlation(darker, px, face.box) > 0.99
    x0, _, w, _ = face.box
    ramp = np.clip(1.5 - 1.2 * (np.arange(px.shape[1], dtype=np.float32) - x0) / w, 0.3, 1.5)[None, :, None]
    side_lit = np.clip(px * ramp, 0, 255).astype(np.uint8)
    assert pm.lighting_correlation(side_lit, px, face.box) < 0.8


def test_seam_ratio_is_one_for_the_template_and_high_for_a_hard_paste(template, face):
    px = template.pixels
    mask = face_oval_mask(face, px.shape[:2])
    assert pm.seam_ratio(px, px, mask) == pytest.approx(1.0)
    pasted = px.copy()
    pasted[mask > 0] = np.clip(pasted[mask > 0].astype(int) - 60, 0, 255).astype(np.uint8)
    assert pm.seam_ratio(pasted, px, mask) > 2.0
    soft = cv2.GaussianBlur(mask.astype(np.float32) / 255, (0, 0), 6)
    blended = (px * (1 - soft[..., None]) + pasted * soft[..., None]).astype(np.uint8)
    assert pm.seam_ratio(blended, px, soft) < pm.seam_ratio(pasted, px, mask)


def test_tone_kept_is_judged_only_where_tones_differ():
    assert pm.tone_kept(30.0, 35.0, 45.0) is None  # 10 degrees apart: not judged
    assert pm.tone_kept(0.0, -5.0, 40.0) is True
    assert pm.tone_kept(30.0, -5.0, 40.0) is False
    assert pm.tone_kept(None, -5.0, 40.0) is False


def test_output_face_and_identity_of_the_template_itself(template, face):
    found = pm.output_face(FaceAnalyzer(), template.pixels)
    assert found is not None and pm.identity_cosine(found, face.embedding) > 0.95
    blank = np.full_like(template.pixels, 128)
    assert pm.output_face(FaceAnalyzer(), blank) is None and pm.identity_cosine(None, face.embedding) is None
