"""Skin tone measured as the Individual Typology Angle (ITA), used to check that a render keeps *the person's* tone.

ITA = atan2(L* - 50, b*) in degrees, from the median L* and b* (CIELAB, D65) of the central cheek/nose skin.
Bands follow Chardon et al. (1991): very light > 55 > light > 41 > intermediate > 28 > tan > 10 > brown > -30 > dark.
"""
from __future__ import annotations

import numpy as np
from skimage.color import rgb2lab

from .face_analysis import cheek_nose_mask
from .records import FaceRecord

ITA_BANDS = ((55.0, "very light"), (41.0, "light"), (28.0, "intermediate"), (10.0, "tan"), (-30.0, "brown"))


def ita_degrees(pixels: np.ndarray, mask: np.ndarray) -> float:
    """ITA in degrees of the masked pixels. pixels: (H, W, 3) uint8 RGB; mask: (H, W), nonzero = sample."""
    sel = mask > 0
    if not sel.any():
        raise ValueError("skin mask is empty: no pixels to measure skin tone on")
    lab = rgb2lab(pixels[sel].reshape(-1, 1, 3)).reshape(-1, 3)
    lightness, b = float(np.median(lab[:, 0])), float(np.median(lab[:, 2]))
    return float(np.degrees(np.arctan2(lightness - 50.0, b)))


def face_ita(pixels: np.ndarray, face: FaceRecord) -> float:
    """ITA of one face's central cheek and nose skin."""
    return ita_degrees(pixels, cheek_nose_mask(face, pixels.shape[:2]))


def box_ita(pixels: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """ITA of the central face box (issue 10 (b)): median L* and b* over 25-75 % of the face box's (YuNet's, x, y,
    w, h) width and 25-60 % of its height; needs no mesh."""
    x, y, w, h = (float(v) for v in box)
    mask = np.zeros(pixels.shape[:2], np.uint8)
    x0, x1 = max(int(round(x + 0.25 * w)), 0), min(int(round(x + 0.75 * w)), pixels.shape[1])
    y0, y1 = max(int(round(y + 0.25 * h)), 0), min(int(round(y + 0.60 * h)), pixels.shape[0])
    mask[y0:y1, x0:x1] = 1
    return ita_degrees(pixels, mask)


def ita_band(ita: float) -> str:
    """The skin-tone band name of an ITA angle."""
    for lower, name in ITA_BANDS:
        if ita > lower:
            return name
    return "dark"
