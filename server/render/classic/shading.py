"""Shading stage of the classic backend: relight the pasted face with the template's light and photographic style.

Two steps, both in log-luminance so colour (chromaticity) and the person's own skin tone are kept:
1. Relighting. A face image is (albedo x shading); at a coarse scale the shading dominates. Each face's shading
   field is the skin-masked low-pass of its linear luminance (the mask says how much eyes, brows and lips count
   as shadow; the backend's `feature_weight`), divided by its mean over an anchor: the central cheek/nose skin
   where skin tone is read. The person's field is divided out and the template's multiplied in: the person keeps
   the level and colour of that skin, the template's light direction and falloff replace theirs. Outside the
   person's face oval (what the paste carries along: their ears, hair, the photo's background) both fields are
   plain low-passes at a finer scale (`periphery`, `periphery_sigma`), so the template's light and dark areas
   there come through at the person's tone level. A final shift keeps the median luminance of the person's
   cheek/nose skin exactly (`relight`), so the measured skin tone stays the person's. Optionally (`sh_light`) the
   light is instead a first-order spherical-harmonics fit on normals derived from each face's mesh, applied on the
   person's normals. The scale of the fields can be searched per render (`search_shading_sigma`, driven by the
   backend's preview).
2. Style (off by default, see `ShadingParams`). As in multi-scale local-statistics transfer for headshots, each band of a Laplacian stack of the person's
   log-luminance is scaled by sqrt(local energy of the template's band / local energy of the person's band), so
   contrast and sharpness at each scale follow the template's photograph (gains clamped to stay stable).

Arrays: (H, W, 3) uint8 RGB in and out; masks (H, W) float32 in [0, 1]; all of one region of interest, in the
template frame, with the person's face already aligned onto the template's.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import cv2
import numpy as np

_EPS = 1e-4


@dataclass(frozen=True)
class ShadingParams:
    """Tunables of the Shading stage (defaults chosen on the 20 acceptance pairs; see the backend's notes).

    shading_sigma: scale of the transferred lighting, as a fraction of the face width (smaller = finer shading and
        lighting closer to the template's, but more of the template's face comes through and identity drops).
        With `lighting_target` > 0 this is the coarsest scale tried (see `search_shading_sigma`).
    periphery: 0..1, how much the region carried along with the paste outside the person's face oval (their ears,
        hair, the photo's background) takes the template's brightness pattern there (unmasked low-pass) instead
        of the light extrapolated from the face skin. At 1 the template's light and dark areas around the face
        (hair, shadowed neck, background) come through at the person's tone level.
    detail: with `sh_light`, the share of finer ratio shading added on top of the SH light.
    max_gain: clamp of the relighting gain (a factor; 0 = no clamp).
    sh_light: relight with a first-order spherical-harmonics light fitted on mesh normals (keeps the person's
        shape exactly) instead of the ratio shading alone. Measured worse on identity here, so off by default.
    style_levels, gain_min, gain_max: multi-scale local-contrast transfer (bands and gain clamp); 0 levels = off,
        as it lowered identity and skin-tone margins on the acceptance pairs.
    periphery_sigma: scale of the periphery's field relative to `shading_sigma` (the periphery carries no identity,
        so it can follow the template more closely than the face).
    lighting_target: 0..1; when > 0, the backend searches the shading scale between `shading_sigma` (coarsest) and
        `min_sigma` (finest) for the coarsest one whose preview reaches this lighting correlation with the template
        (issue 10's criterion (c), `portrait_metrics.lighting_correlation`); 0 = always `shading_sigma`.
    min_sigma: the finest shading scale the search may go to.
    """

    shading_sigma: float = 0.24
    periphery: float = 1.0
    detail: float = 0.5
    max_gain: float = 0.0
    sh_light: bool = False
    style_levels: int = 0
    gain_min: float = 0.5
    gain_max: float = 2.5
    periphery_sigma: float = 0.4
    lighting_target: float = 0.92
    min_sigma: float = 0.06


def srgb_to_linear(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 linear RGB in [0, 1] of an (H, W, 3) uint8 sRGB image."""
    x = rgb.astype(np.float32) / 255.0
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(lin: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 sRGB of (H, W, 3) float linear RGB (clipped to [0, 1])."""
    x = np.clip(lin, 0.0, 1.0)
    y = np.where(x <= 0.0031308, x * 12.92, 1.055 * np.power(x, 1 / 2.4) - 0.055)
    return np.clip(y * 255.0 + 0.5, 0, 255).astype(np.uint8)


def luminance(lin: np.ndarray) -> np.ndarray:
    """(H, W) float32 relative luminance Y of linear RGB (Rec. 709 weights)."""
    return (lin @ np.array([0.2126, 0.7152, 0.0722], np.float32)).astype(np.float32)


BLUR_DIRECT_MAX_SIGMA = 6.0
"""Gaussian blurs wider than this (in pixels) are run on a shrunk copy (see `wide_blur`)."""


def wide_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a 2D float32 image, fast for wide kernels: above BLUR_DIRECT_MAX_SIGMA the image is
    area-shrunk so the kernel is about 5 px there, blurred, and bilinearly enlarged back (the blur the shrink and
    the enlargement add is taken off the kernel). The cost no longer grows with sigma; the result is smooth at
    the scale of sigma either way (away from the borders, differences from the direct blur stay within about 1% of
    the image's range while sigma is below a tenth of the image size)."""
    if sigma <= BLUR_DIRECT_MAX_SIGMA:
        return cv2.GaussianBlur(image, (0, 0), sigma)
    h, w = image.shape[:2]
    factor = sigma / 5.0
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    fx, fy = w / size[0], h / size[1]
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    # Area shrinking adds a box of one small pixel (variance 1/12), bilinear enlarging a tent (variance 1/6).
    sx = float(np.sqrt(max((sigma / fx) ** 2 - 0.25, 0.25)))
    sy = float(np.sqrt(max((sigma / fy) ** 2 - 0.25, 0.25)))
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=sx, sigmaY=sy)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def masked_lowpass(values: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W) float32 Gaussian low-pass of `values` counting only where `weight` > 0 (normalised convolution)."""
    num = wide_blur(values * weight, sigma)
    den = wide_blur(weight, sigma)
    fallback = wide_blur(values, 2 * sigma)
    # Far from any weighted pixel the ratio is noise; lean on a plain wider blur there.
    trust = np.clip(den / 0.05, 0.0, 1.0)
    return (trust * num / np.maximum(den, 1e-6) + (1 - trust) * fallback).astype(np.float32)


def log_shading(log_y: np.ndarray, skin: np.ndarray, region: np.ndarray, sigma: float,
                outside: np.ndarray | None = None, anchor: np.ndarray | None = None,
                outside_sigma: float | None = None) -> np.ndarray:
    """(H, W) float32 log shading field: skin-weighted low-pass of log luminance, zero mean over skin in `region`
    (or over `anchor` (H, W) when given: the skin whose level must stay put, e.g. the cheek/nose tone site).

    outside: (H, W) float32 in [0, 1], where the field should be the plain (unmasked) low-pass instead, so that
    around the face (hair, background carried along with the paste) the brightness pattern follows as well, at
    `outside_sigma` (default `sigma`)."""
    field = masked_lowpass(log_y, skin, sigma)
    if outside is not None:
        field = field + outside * (wide_blur(log_y, outside_sigma or sigma) - field)
    # Zero mean over the fully weighted skin only: partly trusted pixels help shape the field, not set its level.
    w = region.astype(np.float32) * (skin >= 0.999) if anchor is None else anchor.astype(np.float32)
    return field - float((field * w).sum() / max(w.sum(), 1.0))


def mesh_normal_map(mesh: np.ndarray, shape: tuple[int, int], smooth: float) -> np.ndarray:
    """(H, W, 3) float32 unit surface normals of a face mesh (x right, y down, z toward the camera), zero outside it.

    mesh: (N, 3) float32 points in the image frame (mediapipe: z grows away from the camera). The mesh is
    triangulated in 2D (Delaunay), each triangle filled with its flat normal, then smoothed by `smooth` pixels."""
    from scipy.spatial import Delaunay

    pts = mesh[:, :3].astype(np.float64)
    tri = Delaunay(pts[:, :2]).simplices
    a, b, c = pts[tri[:, 0]], pts[tri[:, 1]], pts[tri[:, 2]]
    normals = np.cross(b - a, c - a)
    normals[:, 2] *= -1.0  # flip z to point toward the camera
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-9
    normals *= np.sign(normals[:, 2:3] + 1e-9)  # every visible facet faces the camera
    out = np.zeros((*shape, 3), np.float32)
    cover = np.zeros(shape, np.float32)
    for k, t in enumerate(tri):
        poly = np.round(pts[t, :2]).astype(np.int32)
        cv2.fillConvexPoly(out, poly, tuple(float(v) for v in normals[k]))
        cv2.fillConvexPoly(cover, poly, 1.0)
    if smooth > 0:
        out = cv2.GaussianBlur(out, (0, 0), smooth) / np.maximum(cv2.GaussianBlur(cover, (0, 0), smooth), 1e-6)[..., None]
    out *= cover[..., None]
    return (out / (np.linalg.norm(out, axis=2, keepdims=True) + 1e-9)).astype(np.float32)


def sh_basis(normals: np.ndarray, order: int = 1) -> np.ndarray:
    """(..., 4) first-order or (..., 9) second-order spherical-harmonics basis (constants dropped) of unit normals
    (..., 3). First order (ambient + one directional light) is the default: it is what a skin region with unknown
    albedo can support without over-fitting."""
    x, y, z = normals[..., 0], normals[..., 1], normals[..., 2]
    if order == 1:
        return np.stack([np.ones_like(x), x, y, z], axis=-1)
    return np.stack([np.ones_like(x), x, y, z, x * y, x * z, y * z, x * x - y * y, 3 * z * z - 1], axis=-1)


def fit_sh_shading(lum: np.ndarray, normals: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """(H, W) float32 shading B(n) . c, with c the weighted least-squares SH fit of `lum` over `weight` > 0.5,
    normalised to mean 1 over those pixels (albedo is taken as constant over the skin)."""
    sel = (weight > 0.5) & (np.abs(normals).sum(axis=2) > 0)
    basis = sh_basis(normals)
    coeffs, *_ = np.linalg.lstsq(basis[sel].astype(np.float64), lum[sel].astype(np.float64), rcond=None)
    shading = (basis @ coeffs.astype(np.float32)).astype(np.float32)
    return shading / max(float(shading[sel].mean()), 1e-6)


def _band_stack(log_y: np.ndarray, sigmas: list[float]) -> list[np.ndarray]:
    """Laplacian stack: differences of successive Gaussian blurs (finest first); the residual is not returned."""
    blurred = [log_y] + [cv2.GaussianBlur(log_y, (0, 0), s) for s in sigmas]
    return [blurred[i] - blurred[i + 1] for i in range(len(sigmas))]


def match_local_contrast(person: np.ndarray, template: np.ndarray, region: np.ndarray, face_px: float,
                         levels: int, gain_min: float, gain_max: float) -> np.ndarray:
    """Person's face (uint8 RGB) with each band's local contrast scaled toward the template's.

    Bands are Laplacian-stack levels at sigmas face_px/128 * 2**k; local energy is the band's square smoothed at
    four times the band's scale. Only luminance changes; the change is applied as a ratio to linear RGB.
    """
    p_lin, t_lin = srgb_to_linear(person), srgb_to_linear(template)
    p_log = np.log(luminance(p_lin) + _EPS)
    t_log = np.log(luminance(t_lin) + _EPS)
    base = max(face_px / 128.0, 0.7)
    sigmas = [base * 2 ** k for k in range(levels)]
    w = region.astype(np.float32)
    delta = np.zeros_like(p_log)
    for sigma, pb, tb in zip(sigmas, _band_stack(p_log, sigmas), _band_stack(t_log, sigmas)):
        smooth = max(4 * sigma, face_px / 24.0)
        e_p = masked_lowpass(pb * pb, w, smooth)
        e_t = masked_lowpass(tb * tb, w, smooth)
        gain = np.clip(np.sqrt((e_t + 1e-6) / (e_p + 1e-6)), gain_min, gain_max)
        delta += (gain - 1.0) * pb
    return linear_to_srgb(p_lin * np.exp(delta * w)[..., None])


def sh_relight_gain(person: np.ndarray, template: np.ndarray, person_skin: np.ndarray, template_skin: np.ndarray,
                    person_normals: np.ndarray, template_normals: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W) float32 log gain that takes the person's SH-fitted lighting to the template's, on the person's own
    surface normals (so the person's face shape is kept, only the light changes). Extrapolated off the mesh."""
    y_p = luminance(srgb_to_linear(person))
    y_t = luminance(srgb_to_linear(template))
    own = fit_sh_shading(y_p, person_normals, person_skin)
    sel = (template_skin > 0.5) & (np.abs(template_normals).sum(axis=2) > 0)
    basis_t = sh_basis(template_normals)
    coeffs, *_ = np.linalg.lstsq(basis_t[sel].astype(np.float64), y_t[sel].astype(np.float64), rcond=None)
    theirs = (sh_basis(person_normals) @ coeffs.astype(np.float32)).astype(np.float32)
    on_p = (person_skin > 0.5) & (np.abs(person_normals).sum(axis=2) > 0)
    theirs /= max(float(theirs[on_p].mean()), 1e-6)
    gain = np.log(np.clip(theirs, 0.2, 5.0)) - np.log(np.clip(own, 0.2, 5.0))
    cover = (np.abs(person_normals).sum(axis=2) > 0).astype(np.float32)
    return masked_lowpass(gain * cover, cover, max(sigma / 4, 1.0))


WORK_FACE_PX = 160.0
"""Face width at which the (smooth) shading fields are estimated; larger faces are shrunk for it, then the gain is
scaled back up: a field blurred by ~0.1 face widths loses nothing at that size, and it keeps 1024-px renders fast."""


def _ratio_gain(person: np.ndarray, template: np.ndarray, person_skin: np.ndarray, template_skin: np.ndarray,
                region: np.ndarray, face_px: float, params: ShadingParams, face_core: np.ndarray | None,
                person_anchor: np.ndarray | None, template_anchor: np.ndarray | None) -> np.ndarray:
    """(H, W) float32 log gain: template's log shading minus the person's, estimated at WORK_FACE_PX."""
    h, w = person.shape[:2]
    scale = min(1.0, WORK_FACE_PX / max(face_px, 1.0))
    size = (max(8, round(w * scale)), max(8, round(h * scale)))

    def small(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None or scale == 1.0 else cv2.resize(a, size, interpolation=cv2.INTER_AREA)

    if scale < 1.0:
        person, template = small(person), small(template)
        person_skin, template_skin, region = small(person_skin), small(template_skin), small(region)
        face_core, person_anchor, template_anchor = small(face_core), small(person_anchor), small(template_anchor)
    sigma = params.shading_sigma * face_px * scale
    outside = None if face_core is None or params.periphery <= 0 else params.periphery * (1.0 - face_core)
    p_log = np.log(luminance(srgb_to_linear(person)) + _EPS)
    t_log = np.log(luminance(srgb_to_linear(template)) + _EPS)
    outside_sigma = max(0.5, params.periphery_sigma * sigma)
    gain = (log_shading(t_log, template_skin, region, sigma, outside, template_anchor, outside_sigma)
            - log_shading(p_log, person_skin, region, sigma, outside, person_anchor, outside_sigma))
    return gain if scale == 1.0 else cv2.resize(gain, (w, h), interpolation=cv2.INTER_LINEAR)


def shade_face(person: np.ndarray, template: np.ndarray, person_skin: np.ndarray, template_skin: np.ndarray,
               region: np.ndarray, face_px: float, params: ShadingParams, face_core: np.ndarray | None = None,
               person_normals: np.ndarray | None = None, template_normals: np.ndarray | None = None,
               person_anchor: np.ndarray | None = None, template_anchor: np.ndarray | None = None) -> np.ndarray:
    """The Shading stage: relight, then match local contrast. All inputs share one (H, W) region of interest.

    person, template: (H, W, 3) uint8 RGB; person_skin, template_skin, region: (H, W) float32 in [0, 1] (region is
    the face area being shaded); face_px: the face width in pixels; face_core: the person's face oval (soft), used
    with `params.periphery`; person_normals, template_normals: (H, W, 3) from `mesh_normal_map`, or None;
    person_anchor, template_anchor: (H, W) float32, the skin whose brightness the relighting keeps (the person's
    central cheeks and nose, where skin tone is read), or None for all the skin.

    With normals, the light is an SH fit transferred on the person's own normals, plus `params.detail` of the
    finer skin-masked ratio shading on top; without them, the ratio shading alone. Returns (H, W, 3) uint8 RGB.
    """
    p_lin = srgb_to_linear(person)
    ratio_gain = _ratio_gain(person, template, person_skin, template_skin, region, face_px, params, face_core,
                             person_anchor, template_anchor)
    sigma = params.shading_sigma * face_px
    if params.max_gain > 0:
        ratio_gain = np.clip(ratio_gain, -np.log(params.max_gain), np.log(params.max_gain))
    if not params.sh_light or person_normals is None or template_normals is None:
        gain = ratio_gain
    else:
        sh_gain = sh_relight_gain(person, template, person_skin, template_skin, person_normals, template_normals, sigma)
        residual = ratio_gain - cv2.GaussianBlur(sh_gain, (0, 0), sigma)
        gain = sh_gain + params.detail * residual
    relit = relight(p_lin, gain, person_anchor)
    if params.style_levels <= 0:
        return relit
    return match_local_contrast(relit, template, region, face_px, params.style_levels, params.gain_min, params.gain_max)


def relight(p_lin: np.ndarray, gain: np.ndarray, anchor: np.ndarray | None) -> np.ndarray:
    """(H, W, 3) uint8 sRGB: linear RGB `p_lin` times exp(`gain`) (H, W), with the gain shifted so that the median
    luminance over `anchor` (> 0.5; the person's central cheek/nose skin, where skin tone is read) is unchanged.

    Both shading fields are zero-mean over their own face's anchor, but the template's field is not zero-mean over
    the person's anchor (the faces only roughly coincide) and a mean in log space is not a median: without the
    lock, relighting moved the measured skin tone (ITA) by up to 15 degrees on the acceptance pairs."""
    if anchor is not None:
        sel = anchor > 0.5
        if sel.any():
            y = luminance(p_lin[sel])
            gain = gain + float(np.log(np.median(y) + _EPS) - np.log(np.median(y * np.exp(gain[sel])) + _EPS))
    return linear_to_srgb(p_lin * np.exp(gain)[..., None])


def preview_gain(person: np.ndarray, template: np.ndarray, person_skin: np.ndarray, template_skin: np.ndarray,
                 region: np.ndarray, face_px: float, params: ShadingParams, face_core: np.ndarray | None = None,
                 person_anchor: np.ndarray | None = None, template_anchor: np.ndarray | None = None) -> np.ndarray:
    """(H, W) float32 log gain of the ratio relighting (what `shade_face` applies without `sh_light` and style),
    for inputs already shrunk to a preview size (`face_px` is the face width at that size)."""
    gain = _ratio_gain(person, template, person_skin, template_skin, region, face_px, params, face_core,
                       person_anchor, template_anchor)
    if params.max_gain > 0:
        gain = np.clip(gain, -np.log(params.max_gain), np.log(params.max_gain))
    return gain


def search_shading_sigma(fidelity: Callable[[float], float], params: ShadingParams,
                         steps: int = 3) -> tuple[float, float]:
    """(sigma, fidelity) with the coarsest shading scale in [params.min_sigma, params.shading_sigma] whose
    `fidelity(sigma)` (a preview's lighting correlation with the template) reaches params.lighting_target.

    Coarser shading keeps more of the person's own facial structure (identity); finer shading follows the
    template's light more closely. Fidelity falls as sigma grows, so: try the coarsest; if short, the finest (if
    even that is short, it is the best there is); then `steps` bisections in log sigma. At most steps + 2 calls."""
    hi, lo = params.shading_sigma, min(params.min_sigma, params.shading_sigma)
    f_hi = fidelity(hi)
    if f_hi >= params.lighting_target or lo >= hi:
        return hi, f_hi
    f_lo = fidelity(lo)
    if f_lo < params.lighting_target:
        return (lo, f_lo) if f_lo >= f_hi else (hi, f_hi)
    for _ in range(steps):
        mid = float(np.sqrt(lo * hi))
        f_mid = fidelity(mid)
        if f_mid >= params.lighting_target:
            lo, f_lo = mid, f_mid
        else:
            hi = mid
    return lo, f_lo


def with_sigma(params: ShadingParams, sigma: float) -> ShadingParams:
    """The params with another shading scale (the one a search settled on)."""
    return replace(params, shading_sigma=float(sigma))
