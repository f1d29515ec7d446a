"""Harmonization stage of the classic backend: fuse the shaded face with the template body without a visible seam.

1. Mask refinement: the person's face region, limited to the template's face region below its hairline
   (`cut_to_template`), is pulled in a little and feathered; the pyramid blend's change is kept inside the
   template's region so no halo reaches its hair or background.
2. Tone: the template's visible skin (neck, ears, forehead, hands; found by a colour model of its face skin inside the
   person segmentation) is brought to the *person's* skin tone, never the face to the template's. Lightness is
   scaled (keeping the template's shading), a* and b* are shifted.
3. Grain: when the template is noisier than the pasted face, seeded luminance noise makes up the difference.
4. Blend: Laplacian-pyramid blending of face over body along the feathered mask.

Arrays: (H, W, 3) uint8 RGB; masks (H, W) uint8 {0, 255} or float32 in [0, 1] as stated.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class HarmonizeParams:
    """erode, feather: mask pull-in and Gaussian feather, as fractions of the face width. pyramid_levels: blend
    levels (fewer at small images). tone_transfer, grain: switch those steps. cut_to_template: limit the face to
    the template's face region up to its hairline (the template's hair, headwear and background are kept; the
    person's face outline, where wider, is lost, which costs identity)."""

    erode: float = 0.02
    feather: float = 0.015
    pyramid_levels: int = 5
    tone_transfer: bool = True
    grain: bool = True
    cut_to_template: bool = True


def _largest_part(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected piece of a uint8 mask: two cut regions, or an erosion, can leave slivers beside the
    face; only the face itself is pasted."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    if count <= 2:
        return mask
    return np.where(labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])), 255, 0).astype(np.uint8)


def refine_mask(person_oval: np.ndarray, template_oval: np.ndarray, face_px: float, params: HarmonizeParams) -> np.ndarray:
    """(H, W) float32 blend mask in [0, 1]: person region AND template region (`cut_to_template`), its largest
    piece, eroded and feathered (both uint8 in)."""
    both = cv2.bitwise_and(person_oval, template_oval) if params.cut_to_template else person_oval
    r = max(1, int(round(params.erode * face_px)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    core = _largest_part(cv2.erode(_largest_part(both), kernel)).astype(np.float32) / 255.0
    sigma = max(0.5, params.feather * face_px)
    return np.clip(cv2.GaussianBlur(core, (0, 0), sigma), 0.0, 1.0)


def to_lab(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 CIELAB (L* 0-100) of uint8 RGB."""
    return cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def from_lab(lab: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB of float32 CIELAB."""
    rgb = cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def skin_tone(lab: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(3,) float32 median L*, a*, b* of the masked pixels (mask nonzero = skin)."""
    sel = lab[mask > 0]
    if sel.size == 0:
        raise ValueError("skin mask is empty: no pixels to take a skin tone from")
    return np.median(sel.reshape(-1, 3), axis=0).astype(np.float32)


def skin_weight(lab: np.ndarray, skin: np.ndarray, search: np.ndarray, smooth: float = 1.5) -> np.ndarray:
    """(H, W) float32 in [0, 1]: how much each pixel looks like the face skin in `skin` (uint8), within `search`
    (float32 in [0, 1]), smoothed by `smooth` pixels. A robust Gaussian model of skin chroma (a*, b*): 1 within 2
    Mahalanobis units, 0 beyond 3 (blonde or grey hair differs from skin mostly in a*); L* only has to lie in a broad band around the skin's,
    so shaded neck skin still counts."""
    samples = lab[skin > 0].reshape(-1, 3).astype(np.float64)
    if samples.shape[0] < 10:
        raise ValueError("too few skin pixels to model skin colour")
    centre = np.median(samples, axis=0)
    ab = samples[:, 1:] - centre[1:]
    spread = np.cov(ab.T) + np.eye(2) * 0.5
    core = np.einsum("ni,ij,nj->n", ab, np.linalg.inv(spread), ab) < 4.0  # drop stray hair/eye pixels, refit
    spread = np.cov(ab[core].T) + np.eye(2) * 0.5
    inv = np.linalg.inv(spread).astype(np.float32)
    d = lab[..., 1:] - centre[1:].astype(np.float32)
    dist = np.sqrt(np.maximum(np.einsum("hwi,ij,hwj->hw", d, inv, d), 0.0))
    weight = np.clip(3.0 - dist, 0.0, 1.0)
    lightness = lab[..., 0]
    weight *= (lightness > centre[0] - 40) & (lightness < centre[0] + 20)
    return cv2.GaussianBlur(weight.astype(np.float32), (0, 0), smooth) * search


@dataclass(frozen=True)
class ChromaModel:
    """A Gaussian model of (a*, b*): mean (2,), inverse covariance (2, 2) and log-determinant of the covariance."""

    mean: np.ndarray
    inv_cov: np.ndarray
    logdet: float

    @classmethod
    def fit(cls, lab: np.ndarray, mask: np.ndarray, min_samples: int = 50) -> "ChromaModel | None":
        """The model of the masked pixels' chroma, or None with fewer than `min_samples` of them."""
        ab = lab[mask > 0][:, 1:].astype(np.float64)
        if ab.shape[0] < min_samples:
            return None
        cov = np.cov(ab.T) + np.eye(2) * 0.5
        return cls(ab.mean(0).astype(np.float32), np.linalg.inv(cov).astype(np.float32),
                   float(np.linalg.slogdet(cov)[1]))

    def log_likelihood(self, lab: np.ndarray) -> np.ndarray:
        """(H, W) float32 Gaussian log-likelihood (up to a shared constant) of each pixel's chroma."""
        d = lab[..., 1:] - self.mean
        return -0.5 * (np.einsum("hwi,ij,hwj->hw", d, self.inv_cov, d) + self.logdet)


def not_hair(lab: np.ndarray, skin: ChromaModel, hair: ChromaModel | None) -> np.ndarray | float:
    """(H, W) float32 in [0, 1]: how much more each pixel's chroma looks like skin than like the template's own hair
    (logistic of the log-likelihood ratio), or 1.0 without a hair model. Blonde, red or grey hair can lie inside the
    skin's chroma spread; this keeps recolouring off it."""
    if hair is None:
        return 1.0
    ratio = skin.log_likelihood(lab) - hair.log_likelihood(lab)
    return (1.0 / (1.0 + np.exp(-np.clip(ratio, -30, 30)))).astype(np.float32)


def skin_search_region(face_oval: np.ndarray, landmarks5: np.ndarray, face_px: float,
                       person: np.ndarray | None) -> np.ndarray:
    """(H, W) float32 in [0, 1]: where the template's visible skin may be: anywhere on the person (segmentation
    `person`, or everywhere when None) below the mouth line (neck, hands), and above it only close to the face oval
    (ears, hairline), since hair is what lies further out up there."""
    h, w = face_oval.shape
    mouth_y = float(landmarks5[3:5, 1].mean())
    ring = max(3, int(round(0.2 * face_px)))
    near = cv2.dilate(face_oval, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * ring + 1, 2 * ring + 1)))
    region = (near > 0).astype(np.float32)
    region[int(np.clip(mouth_y, 0, h)):, :] = 1.0
    region = cv2.GaussianBlur(region, (0, 0), max(1.0, 0.03 * face_px))
    return region if person is None else region * person


def recolor_skin(rgb: np.ndarray, weight: np.ndarray, from_tone: np.ndarray, to_tone: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: pixels moved from one skin tone to another in proportion to `weight` (H, W) in [0, 1].

    L* is scaled by to/from (shading and texture kept), a* and b* are shifted."""
    lab = to_lab(rgb)
    moved = lab.copy()
    moved[..., 0] *= float(to_tone[0]) / max(float(from_tone[0]), 1.0)
    moved[..., 1] += float(to_tone[1] - from_tone[1])
    moved[..., 2] += float(to_tone[2] - from_tone[2])
    w = weight[..., None]
    # Untouched pixels are copied, not round-tripped through float Lab (which could move them by one level).
    return np.where(w > 0, from_lab(lab * (1 - w) + moved * w), rgb)


def noise_level(rgb: np.ndarray, mask: np.ndarray) -> float:
    """Robust standard deviation (MAD x 1.4826) of the finest detail of L* inside `mask` (nonzero)."""
    lum = to_lab(rgb)[..., 0]
    detail = lum - cv2.GaussianBlur(lum, (0, 0), 1.0)
    sel = detail[mask > 0]
    if sel.size == 0:
        return 0.0
    return float(np.median(np.abs(sel - np.median(sel))) * 1.4826)


def match_grain(rgb: np.ndarray, target_sigma: float, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8: luminance noise added inside `mask` (float32 [0, 1]) until its grain reaches target_sigma."""
    own = noise_level(rgb, mask > 0.5)
    if target_sigma <= own:
        return rgb
    # noise_level sees white noise through a 1 - Gaussian(sigma 1) high-pass, which keeps 0.872 of its deviation.
    add = float(np.sqrt(target_sigma ** 2 - own ** 2)) / 0.872
    lab = to_lab(rgb)
    lab[..., 0] += rng.standard_normal(lab.shape[:2]).astype(np.float32) * add * mask
    return np.where(mask[..., None] > 0, from_lab(lab), rgb)


def laplacian_blend(fg: np.ndarray, bg: np.ndarray, mask: np.ndarray, levels: int) -> np.ndarray:
    """(H, W, 3) uint8: fg over bg (both uint8 RGB) by Laplacian pyramids, mask (H, W) float32 in [0, 1]."""
    levels = int(max(1, min(levels, np.floor(np.log2(max(min(mask.shape[:2]), 2) / 8.0)))))
    a, b, m = fg.astype(np.float32), bg.astype(np.float32), mask.astype(np.float32)
    ga, gb, gm = [a], [b], [m]
    for _ in range(levels):
        ga.append(cv2.pyrDown(ga[-1]))
        gb.append(cv2.pyrDown(gb[-1]))
        gm.append(cv2.pyrDown(gm[-1]))
    out = ga[-1] * gm[-1][..., None] + gb[-1] * (1 - gm[-1][..., None])
    for k in range(levels - 1, -1, -1):
        size = (ga[k].shape[1], ga[k].shape[0])
        la = ga[k] - cv2.pyrUp(ga[k + 1], dstsize=size)
        lb = gb[k] - cv2.pyrUp(gb[k + 1], dstsize=size)
        mk = gm[k][..., None]
        out = cv2.pyrUp(out, dstsize=size) + la * mk + lb * (1 - mk)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


class PersonSegmenter:
    """Person (selfie) segmentation with mediapipe's bundled model; loads lazily, once; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._model = None

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W) float32 in [0, 1]: probability that each pixel belongs to a person."""
        with self._lock:
            if self._model is None:
                import mediapipe as mp

                self._model = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
            result = self._model.process(np.ascontiguousarray(rgb))
        if result.segmentation_mask is None:
            raise RuntimeError("person segmentation returned no mask")
        return np.clip(result.segmentation_mask.astype(np.float32), 0.0, 1.0)
