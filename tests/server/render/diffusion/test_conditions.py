"""Control images and crop geometry, checked on a real portrait's face mesh."""
from __future__ import annotations

import numpy as np
import pytest

from megaportrait.server.render.diffusion import conditions as C
from megaportrait.server.render.diffusion.framing import (FaceFrame, band_feather, face_region, inner_feather,
                                                          seam_band)
from megaportrait.shared.face_analysis import MESH_FACE_OVAL
from megaportrait.shared.records import SourceImage


@pytest.fixture(scope="module")
def face_crop(analyzer, astronaut):
    """(crop (256, 256, 3) uint8, mesh in crop pixels, frame, face) for skimage's astronaut portrait."""
    img = SourceImage.from_array(astronaut)
    face = analyzer.analyze(img, embed=False, largest_only=True)[0]
    assert face.mesh is not None
    frame = FaceFrame.around(face, astronaut.shape[:2], 256, 2.0)
    return frame.crop(astronaut), frame.mesh_to_crop(face.mesh), frame, face


def test_every_configurable_condition_has_an_extractor():
    from megaportrait.server.render.diffusion.params import CONDITION_NAMES

    assert set(C.CONDITIONS) == set(CONDITION_NAMES)
    assert C.GEOMETRIC <= set(CONDITION_NAMES)


def test_mesh_triangles_cover_the_mesh():
    tris = C.mesh_triangles()
    assert tris.shape[1] == 3 and 840 <= len(tris) <= 870  # mediapipe's tesselation has 852 faces
    assert set(np.unique(tris)) == set(range(468))


def test_depth_is_nearest_at_the_nose_and_empty_off_the_face(face_crop):
    crop, mesh, _, _ = face_crop
    depth = C.depth_map(crop, mesh)[..., 0].astype(int)
    nose_x, nose_y = np.round(mesh[1, :2]).astype(int)  # mesh point 1: nose tip
    cheek_x, cheek_y = np.round(mesh[234, :2] * 0.8 + mesh[1, :2] * 0.2).astype(int)  # near the right face edge
    assert depth[nose_y, nose_x] > depth[cheek_y, cheek_x] + 30
    assert depth[:8, :8].max() == 0 and depth[-8:, -8:].max() == 0
    covered = depth > 0
    oval = C.cv2.fillPoly(np.zeros_like(depth, np.uint8), [np.round(mesh[list(MESH_FACE_OVAL), :2]).astype(np.int32)], 1)
    assert (covered & (oval == 0)).mean() < 0.01  # the mesh stays inside its oval
    assert covered[oval > 0].mean() > 0.85


def test_normals_face_outwards_left_and_right(face_crop):
    crop, mesh, _, _ = face_crop
    normals = C.normal_map(crop, mesh).astype(int) - 128
    # Image-left edge of the face (the subject's right cheek) faces left; the image-right edge faces right.
    left = np.round(mesh[234, :2] * 0.85 + mesh[1, :2] * 0.15).astype(int)
    right = np.round(mesh[454, :2] * 0.85 + mesh[1, :2] * 0.15).astype(int)
    nose = np.round(mesh[1, :2]).astype(int)
    assert normals[left[1], left[0], 0] < -20 and normals[right[1], right[0], 0] > 20
    assert normals[nose[1], nose[0], 2] > 80  # the nose tip faces the camera


def test_sketch_lineart_and_hints(face_crop):
    crop, mesh, _, _ = face_crop
    sketch = C.landmark_sketch(crop, mesh)
    assert sketch.shape == crop.shape and sketch.dtype == np.uint8
    ox, oy = np.round(mesh[152, :2]).astype(int)  # chin, on the oval
    assert sketch[oy - 2:oy + 3, ox - 2:ox + 3].max() > 0 and sketch[:10, :10].max() == 0
    lines = C.lineart_xdog(crop)[..., 0]
    assert 0.005 < (lines > 128).mean() < 0.4  # a line drawing: mostly black, with real lines
    gray = C.cv2.cvtColor(crop, C.cv2.COLOR_RGB2GRAY).astype(float)
    grad = np.hypot(*np.gradient(C.cv2.GaussianBlur(gray, (0, 0), 1.0)))
    assert grad[lines > 128].mean() > 3 * grad[lines == 0].mean()  # the lines sit on the image's edges
    flat = C.lineart_xdog(np.full_like(crop, 120))[..., 0]
    assert flat.max() == 0
    edges = C.canny_edges(crop)[..., 0]
    assert set(np.unique(edges)) <= {0, 255} and (edges > 0).mean() > 0.01
    hint = C.colour_hint(crop, cells=8)
    assert len(np.unique(hint[:32, :32].reshape(-1, 3), axis=0)) == 1  # one cell, one colour
    tile = C.tile_hint(crop)
    assert tile.shape == crop.shape and np.abs(tile.astype(int) - crop).mean() < 20
    for name in C.CONDITIONS:
        assert C.control_image(name, crop, mesh).shape == crop.shape
    with pytest.raises(C.MeshRequired):
        C.control_image("normals", crop, None)


def test_frame_round_trip_and_exact_paste(face_crop, astronaut):
    crop, mesh, frame, face = face_crop
    # The mesh lands on the face in the crop: the nose tip is near the crop's centre.
    assert np.abs(mesh[1, :2] - 128).max() < 40
    mask = face_region(face, astronaut.shape[:2], 0.04)
    alpha = inner_feather(mask, 10)
    assert (alpha[mask == 0] == 0).all() and alpha.max() == pytest.approx(1.0) and 0 < alpha[mask > 0].min() < 0.2
    painted = np.zeros_like(crop)
    out = frame.paste(painted, astronaut, alpha)
    assert np.array_equal(out[mask == 0], astronaut[mask == 0])
    assert out[alpha == 1].max() == 0
    band = seam_band(mask, 6)
    assert (band[mask == 0] > 0).any() and (band[mask > 0] > 0).any()
    balpha = band_feather(band, 6)
    assert (balpha[band == 0] == 0).all() and balpha.max() > 0.9


def test_match_colour_moves_face_colour_to_the_template_and_nothing_else(face_crop, small_templates, analyzer):
    import cv2

    from megaportrait.server.render.diffusion.shading import match_colour

    crop, _, frame, face = face_crop
    other = small_templates[1].pixels
    ref = cv2.resize(other, crop.shape[:2][::-1], interpolation=cv2.INTER_AREA)
    mask = frame.crop_mask(face_region(face, (512, 512), 0.0))
    out = match_colour(crop, ref, mask)
    sel = mask > 0
    lab = lambda im: cv2.cvtColor(im, cv2.COLOR_RGB2LAB).astype(float)[sel].mean(axis=0)  # noqa: E731
    before, after = np.abs(lab(crop) - lab(ref)).max(), np.abs(lab(out) - lab(ref)).max()
    assert after < 5 and after < before / 3, (before, after)  # 8-bit Lab rounding and clipping keep a little
    assert np.array_equal(out[~sel], crop[~sel])
