"""The acceptance figures (shared.portrait_metrics) behave as defined, on a real template portrait."""
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


def test_collateral_region_is_hair_and_background_around_the_face(template, face):
    px = template.pixels
    region = pm.collateral_region(px, face.box)
    x, y, w, h = face.box
    assert region.sum() > 0.3 * (2.2 * w) * (1.95 * h) * 0.3
    # Nothing inside the face ellipse, nothing beyond the widened box.
    cx, cy = int(x + w / 2), int(y + h / 2)
    assert not region[cy - int(0.4 * h):cy + int(0.4 * h), cx - int(0.35 * w):cx + int(0.35 * w)].any()
    assert not region[:, :max(int(x - 0.6 * w) - 1, 0)].any() and not region[int(y + 1.15 * h) + 1:, :].any()
    # The template's skin-coloured pixels (cheeks) are not in it.
    cheeks = px[int(y + 0.45 * h):int(y + 0.6 * h), int(x + 0.25 * w):int(x + 0.75 * w)]
    skin_lab = pm.to_lab(cheeks).reshape(-1, 3)
    lab = pm.to_lab(px)
    near_skin = np.linalg.norm(lab[..., 1:] - np.median(skin_lab[:, 1:], axis=0), axis=2) < 3
    assert not (region & near_skin).any()


def test_collateral_change_counts_only_visible_changes_outside_the_face(template, face):
    px = template.pixels
    same = pm.collateral_change(px, px, face.box)
    assert same.share == 0.0 and same.mean_delta_e == 0.0 and same.region_px > 1000
    x, y, w, h = face.box
    # Repainting the face itself changes nothing the figure counts.
    inside = px.copy()
    inside[int(y + 0.2 * h):int(y + 0.8 * h), int(x + 0.2 * w):int(x + 0.8 * w)] = 0
    assert pm.collateral_change(inside, px, face.box).share == 0.0
    # A bright halo over the hair/background around the head is counted; a faint one (< 12 CIE76) is not.
    halo = np.zeros(px.shape[:2], np.uint8)
    cv2.ellipse(halo, (int(x + w / 2), int(y + h / 2)), (int(0.9 * w), int(1.0 * h)), 0, 0, 360, 1, -1)
    strong = np.where(halo[..., None] > 0, np.clip(px.astype(int) + 60, 0, 255), px).astype(np.uint8)
    faint = np.where(halo[..., None] > 0, np.clip(px.astype(int) + 4, 0, 255), px).astype(np.uint8)
    got = pm.collateral_change(strong, px, face.box)
    assert 0.2 < got.share <= 1.0 and got.mean_delta_e > 5
    assert pm.collateral_change(faint, px, face.box).share == 0.0
    diff_map = pm.collateral_difference_map(strong, px, face.box)
    assert diff_map.shape == px.shape and (diff_map == (255, 40, 40)).all(axis=2).any()
    with pytest.raises(ValueError, match="differ in size"):
        pm.collateral_change(px[:-1], px, face.box)
