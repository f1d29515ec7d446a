"""The acceptance figures of a rendered portrait, as reusable functions (render tests, evaluation harness).

(a) identity: SFace cosine of the output's largest face to a reference identity embedding (the person's photos
    *other* than the pasted one), and the "template leak": cosine to the template's own face.
(b) skin tone: ITA (shared.skin_tone) of the output's central cheek/nose skin, compared with the person's ITA and
    the template face's ITA. "The person's ITA" is measured on the source face that was pasted (the crop the
    render used), because that photo is what the person's skin looked like under its own light.
(c) lighting: Pearson correlation of the output's and the template's low-pass luminance over the template's face box
    (L* resized to 64x64, Gaussian sigma 6 px, each divided by its mean).
(d) seam: gradient-magnitude energy (mean squared Sobel magnitude over L*, a*, b*) in a thin band along the blend
    mask's boundary, output over template at the same pixels; 1.0 means no more edge than the template had there.
(e) collateral change (issue 17): how much of the template's hair, headwear and background near the face the render
    changed. Region: the template's largest face box (x, y, w, h) widened by 0.6 w on each side, 0.8 h above and
    0.15 h below, minus the ellipse centred on the box with semi-axes 0.55 w and 0.6 h, minus the template's
    skin-coloured pixels (chroma (a*, b*) within 2.5 x max(4, spread) of the median chroma of the box's central
    40 %, spread = 1.4826 x the median absolute deviation of those central chroma distances). Figure: the share of
    region pixels whose CIE76 colour difference (render vs template) exceeds 12, and the mean difference there.

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
COLLATERAL_DELTA_E = 12.0
"""CIE76 colour difference above which a pixel of the collateral region counts as visibly changed."""


@dataclass(frozen=True)
class CollateralChange:
    """Figure (e): share of the template's hair/background pixels near the face visibly changed (CIE76 > 12), the
    mean CIE76 difference over them, and how many pixels the region held."""

    share: float
    mean_delta_e: float
    region_px: int

    def as_dict(self) -> dict:
        return {"share": round(self.share, 5), "mean_delta_e": round(self.mean_delta_e, 3), "region_px": self.region_px}


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
    collateral: "CollateralChange | None" = None

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


def to_lab(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 CIELAB (L* 0-100) of an (H, W, 3) uint8 RGB image."""
    return cv2.cvtColor(pixels.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def collateral_region(template: np.ndarray, box: tuple[float, float, float, float],
                      template_lab: np.ndarray | None = None) -> np.ndarray:
    """(H, W) bool: the template's hair, headwear and background near the face (see (e) in the module notes)."""
    h, w = template.shape[:2]
    x, y, bw, bh = (float(v) for v in box)
    lab = to_lab(template) if template_lab is None else template_lab
    x0, x1 = max(int(np.floor(x - 0.6 * bw)), 0), min(int(np.ceil(x + 1.6 * bw)), w)
    y0, y1 = max(int(np.floor(y - 0.8 * bh)), 0), min(int(np.ceil(y + 1.15 * bh)), h)
    region = np.zeros((h, w), bool)
    if x1 <= x0 or y1 <= y0:
        return region
    region[y0:y1, x0:x1] = True
    ellipse = np.zeros((h, w), np.uint8)
    centre = (int(round(x + bw / 2)), int(round(y + bh / 2)))
    cv2.ellipse(ellipse, centre, (max(1, int(round(0.55 * bw))), max(1, int(round(0.6 * bh)))), 0, 0, 360, 1, -1)
    region &= ellipse == 0
    rows, cols = _box_slice((x + 0.3 * bw, y + 0.3 * bh, 0.4 * bw, 0.4 * bh), template.shape)
    central = lab[rows, cols, 1:].reshape(-1, 2).astype(np.float64)
    centre_ab = np.median(central, axis=0)
    dist = np.linalg.norm(central - centre_ab, axis=1)
    spread = max(4.0, 1.4826 * float(np.median(np.abs(dist - np.median(dist)))))
    chroma = np.linalg.norm(lab[..., 1:] - centre_ab.astype(np.float32), axis=2)
    return region & (chroma > 2.5 * spread)


def collateral_change(output: np.ndarray, template: np.ndarray,
                      box: tuple[float, float, float, float]) -> CollateralChange:
    """Figure (e) of one output against its template; `box` is the template's largest face box (x, y, w, h)."""
    if output.shape != template.shape:
        raise ValueError(f"output {output.shape} and template {template.shape} differ in size")
    t_lab = to_lab(template)
    region = collateral_region(template, box, t_lab)
    n = int(region.sum())
    if n == 0:
        return CollateralChange(0.0, 0.0, 0)
    delta = np.linalg.norm(to_lab(output)[region] - t_lab[region], axis=1)
    return CollateralChange(float((delta > COLLATERAL_DELTA_E).mean()), float(delta.mean()), n)


def collateral_difference_map(output: np.ndarray, template: np.ndarray,
                              box: tuple[float, float, float, float]) -> np.ndarray:
    """(H, W, 3) uint8 picture of where a render changed its template outside the face ellipse: the template in
    grey, CIE76 difference > 12 in red (in the collateral region) or orange (on skin-coloured pixels outside the
    ellipse, which the figure does not count), the ellipse left dark."""
    t_lab = to_lab(template)
    delta = np.linalg.norm(to_lab(output) - t_lab, axis=2)
    region = collateral_region(template, box, t_lab)
    x, y, bw, bh = box
    ellipse = np.zeros(template.shape[:2], np.uint8)
    cv2.ellipse(ellipse, (int(round(x + bw / 2)), int(round(y + bh / 2))),
                (max(1, int(round(0.55 * bw))), max(1, int(round(0.6 * bh)))), 0, 0, 360, 1, -1)
    grey = cv2.cvtColor(cv2.cvtColor(template, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    out = (grey * 0.6).astype(np.uint8)
    out[ellipse > 0] //= 3
    changed = delta > COLLATERAL_DELTA_E
    out[changed & region] = (255, 40, 40)
    out[changed & ~region & (ellipse == 0)] = (255, 170, 0)
    return out


def measure_portrait(analyzer: FaceAnalyzer, output: np.ndarray, template: np.ndarray, template_face: FaceRecord,
                     person_reference: np.ndarray, ita_person: float, blend_mask: np.ndarray | None) -> PortraitFigures:
    """All five figures of one output. `template_face` must carry its embedding and (ideally) mesh;
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
        collateral=collateral_change(output, template, template_face.box),
    )
