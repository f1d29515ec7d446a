"""The four acceptance figures of a rendered portrait, as reusable functions (render tests, evaluation harness).

(a) identity: SFace cosine of the output's largest face to a reference identity embedding (the person's photos
    *other* than the pasted one), and the "template leak": cosine to the template's own face.
(b) skin tone: ITA (shared.skin_tone) of the output's central cheek/nose skin, compared with the person's ITA and
    the template face's ITA. "The person's ITA" is measured on the source face that was pasted (the crop the
    render used), because that photo is what the person's skin looked like under its own light.
(c) lighting: Pearson correlation of the output's and the template's low-pass luminance over the template's face box
    (L* resized to 64x64, Gaussian sigma 6 px, each divided by its mean).
(d) seam: gradient-magnitude energy (mean squared Sobel magnitude over L*, a*, b*) in a thin band along the blend
    mask's boundary, output over template at the same pixels; 1.0 means no more edge than the template had there.

Images are (H, W, 3) uint8 RGB; masks (H, W) float or uint8, "inside" where > 0.5 (float) or > 127 (uint8).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from .face_analysis import FaceAnalyzer, cosine
from .records import FaceRecord, SourceImage
from .skin_tone import face_ita

LIGHTING_SIZE = 64
LIGHTING_SIGMA = 6.0
TONE_MIN_GAP_DEG = 15.0
"""Skin tone is only judged where the person's and the template's ITA differ by more than this."""
SEAM_BAND_PX = 2
"""Half-width of the band along the mask boundary in which seam energy is measured, in pixels."""


@dataclass(frozen=True)
class PortraitFigures:
    """The acceptance figures of one output. None where a figure could not be measured (no face in the output)."""

    identity: float | None
    template_leak: float | None
    ita_person: float
    ita_template: float
    ita_output: float | None
    tone_kept: bool | None  # None when the person's and template's ITA are within TONE_MIN_GAP_DEG
    lighting: float
    seam_ratio: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def output_face(analyzer: FaceAnalyzer, pixels: np.ndarray, *, mesh: bool = True) -> FaceRecord | None:
    """The largest face of an output image with its embedding (and mesh when asked), or None if none is found."""
    image = SourceImage.from_array(pixels)
    faces = analyzer.detect(image)
    if not faces:
        return None
    face = faces[0]
    if mesh:
        face = analyzer.fit_mesh(image, face)
    return analyzer.embed(image, face)


def identity_cosine(face: FaceRecord | None, reference_embedding: np.ndarray) -> float | None:
    """Cosine of an (embedded) face to a reference embedding; None when there is no face."""
    if face is None or face.embedding is None:
        return None
    return cosine(face.embedding, reference_embedding)


def tone_kept(ita_output: float | None, ita_person: float, ita_template: float,
              min_gap: float = TONE_MIN_GAP_DEG) -> bool | None:
    """True if the output's ITA is closer to the person's than to the template's; None when the two differ by at
    most `min_gap` degrees (then the figure says nothing); False when the output has no measurable face."""
    if abs(ita_person - ita_template) <= min_gap:
        return None
    if ita_output is None:
        return False
    return abs(ita_output - ita_person) < abs(ita_output - ita_template)


def _box_slice(box: tuple[float, float, float, float], shape: tuple[int, ...]) -> tuple[slice, slice]:
    x, y, w, h = box
    x0, y0 = max(int(round(x)), 0), max(int(round(y)), 0)
    x1, y1 = min(int(round(x + w)), shape[1]), min(int(round(y + h)), shape[0])
    if x1 - x0 < 4 or y1 - y0 < 4:
        raise ValueError(f"face box {box} leaves no area inside a {shape[1]}x{shape[0]} image")
    return slice(y0, y1), slice(x0, x1)


def lightness(pixels: np.ndarray) -> np.ndarray:
    """(H, W) float32 CIE L* in [0, 100] of an (H, W, 3) uint8 RGB image."""
    return cv2.cvtColor(pixels.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)[..., 0]


def lowpass_luminance(pixels: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """(64, 64) float64: L* over `box`, resized to 64x64, Gaussian sigma 6, divided by its mean."""
    rows, cols = _box_slice(box, pixels.shape)
    patch = lightness(pixels[rows, cols])
    small = cv2.resize(patch, (LIGHTING_SIZE, LIGHTING_SIZE), interpolation=cv2.INTER_AREA).astype(np.float64)
    low = cv2.GaussianBlur(small, (0, 0), LIGHTING_SIGMA)
    return low / max(float(low.mean()), 1e-6)


def lighting_correlation(output: np.ndarray, template: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """Pearson correlation of the low-pass luminance of output and template over the template's face box."""
    a, b = lowpass_luminance(output, box).ravel(), lowpass_luminance(template, box).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def mask_boundary_band(mask: np.ndarray, half_width: int = SEAM_BAND_PX) -> np.ndarray:
    """(H, W) bool: pixels within `half_width` of the boundary of the mask (thresholded at its mid value)."""
    m = np.asarray(mask)
    binary = (m > (127 if m.dtype == np.uint8 else 0.5)).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * half_width + 1, 2 * half_width + 1))
    return (cv2.dilate(binary, kernel) - cv2.erode(binary, kernel)) > 0


def gradient_energy(pixels: np.ndarray) -> np.ndarray:
    """(H, W) float32: squared Sobel gradient magnitude summed over L*, a*, b*."""
    lab = cv2.cvtColor(pixels.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    gx = cv2.Sobel(lab, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(lab, cv2.CV_32F, 0, 1, ksize=3)
    return (gx * gx + gy * gy).sum(axis=2)


def seam_ratio(output: np.ndarray, template: np.ndarray, mask: np.ndarray, half_width: int = SEAM_BAND_PX) -> float | None:
    """Mean gradient energy along the mask boundary in the output over the template's at the same pixels.

    None when the mask has no boundary inside the image."""
    band = mask_boundary_band(mask, half_width)
    band[:1, :] = band[-1:, :] = False
    band[:, :1] = band[:, -1:] = False
    if not band.any():
        return None
    out_e = float(gradient_energy(output)[band].mean())
    tpl_e = float(gradient_energy(template)[band].mean())
    return out_e / max(tpl_e, 1e-6)


def measure_portrait(analyzer: FaceAnalyzer, output: np.ndarray, template: np.ndarray, template_face: FaceRecord,
                     person_reference: np.ndarray, ita_person: float, blend_mask: np.ndarray | None) -> PortraitFigures:
    """All four figures of one output. `template_face` must carry its embedding and (ideally) mesh;
    `person_reference`: the person's reference embedding (other photos than the pasted one)."""
    face = output_face(analyzer, output)
    ita_template = face_ita(template, template_face)
    ita_output = face_ita(output, face) if face is not None else None
    return PortraitFigures(
        identity=identity_cosine(face, person_reference),
        template_leak=identity_cosine(face, template_face.embedding) if template_face.embedding is not None else None,
        ita_person=float(ita_person),
        ita_template=float(ita_template),
        ita_output=ita_output,
        tone_kept=tone_kept(ita_output, ita_person, ita_template),
        lighting=lighting_correlation(output, template, template_face.box),
        seam_ratio=seam_ratio(output, template, blend_mask) if blend_mask is not None else None,
    )
