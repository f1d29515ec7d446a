"""Where the diffusion stages work: a square crop around the template's face, and the masks that bound each stage.

Masks live in template pixels, so "outside the face mask" means the same pixels for every stage and every crop
resolution; a stage's result is pasted back with an alpha that is exactly 0 wherever its mask is 0, which keeps
those template pixels bit-identical.
Arrays: images (H, W, 3) uint8 RGB; masks (H, W) uint8 {0, 255}; alphas (H, W) float32 in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from megaportrait.shared.face_analysis import face_oval_mask
from megaportrait.shared.records import FaceRecord


@dataclass(frozen=True)
class FaceFrame:
    """A square window around one face, resampled to `size` x `size`.

    to_crop: (2, 3) float32 affine from template pixels to crop pixels (uniform scale + shift).
    image_shape: (H, W) of the template.
    """

    to_crop: np.ndarray
    size: int
    image_shape: tuple[int, int]

    @classmethod
    def around(cls, face: FaceRecord, image_shape: tuple[int, int], size: int, scale: float) -> "FaceFrame":
        """The window of side `scale` x the face box's longest side, centred on the box."""
        x, y, w, h = face.box
        side = max(scale * max(w, h), 8.0)
        s = size / side
        cx, cy = x + w / 2.0, y + h / 2.0
        m = np.array([[s, 0.0, size / 2.0 - s * cx], [0.0, s, size / 2.0 - s * cy]], dtype=np.float32)
        return cls(to_crop=m, size=int(size), image_shape=(int(image_shape[0]), int(image_shape[1])))

    @property
    def scale(self) -> float:
        """Crop pixels per template pixel."""
        return float(self.to_crop[0, 0])

    def crop(self, pixels: np.ndarray) -> np.ndarray:
        """(S, S, 3) uint8 crop of an (H, W, 3) image; outside the frame is mirrored."""
        flags = cv2.INTER_AREA if self.scale < 1 else cv2.INTER_CUBIC
        return cv2.warpAffine(pixels, self.to_crop, (self.size, self.size), flags=flags, borderMode=cv2.BORDER_REFLECT)

    def crop_mask(self, mask: np.ndarray) -> np.ndarray:
        """(S, S) uint8 {0, 255} crop of an (H, W) mask."""
        out = cv2.warpAffine(mask, self.to_crop, (self.size, self.size), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        return np.where(out >= 128, 255, 0).astype(np.uint8)

    def mesh_to_crop(self, mesh: np.ndarray) -> np.ndarray:
        """(N, 3) mesh in template pixels -> crop pixels (z scaled like x and y)."""
        out = np.asarray(mesh, np.float32).copy()
        out[:, :2] = out[:, :2] @ self.to_crop[:, :2].T + self.to_crop[:, 2]
        out[:, 2] *= self.scale
        return out

    def paste(self, crop: np.ndarray, onto: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        """Blend an (S, S, 3) crop back into an (H, W, 3) image with a template-sized alpha.

        Pixels where alpha == 0 are returned bit-identical to `onto`.
        """
        h, w = self.image_shape
        flags = (cv2.INTER_CUBIC if self.scale < 1 else cv2.INTER_AREA) | cv2.WARP_INVERSE_MAP
        back = cv2.warpAffine(crop, self.to_crop, (w, h), flags=flags, borderMode=cv2.BORDER_REPLICATE)
        a = alpha[..., None].astype(np.float32)
        mixed = np.round(onto.astype(np.float32) * (1.0 - a) + back.astype(np.float32) * a).clip(0, 255).astype(np.uint8)
        return np.where(alpha[..., None] > 0, mixed, onto)


def face_size(face: FaceRecord) -> float:
    """The face box's longest side in template pixels: the unit of every mask width."""
    return float(max(face.box[2], face.box[3]))


def _disk(radius: float) -> np.ndarray:
    r = max(int(round(radius)), 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def face_region(face: FaceRecord, shape: tuple[int, int], grow: float) -> np.ndarray:
    """(H, W) uint8 {0, 255}: the face oval (mesh, else 5-point ellipse) grown by `grow` x face size."""
    mask = face_oval_mask(face, shape)
    if grow > 0:
        mask = cv2.dilate(mask, _disk(grow * face_size(face)))
    return mask


def inner_feather(mask: np.ndarray, width_px: float) -> np.ndarray:
    """(H, W) float32 alpha: 1 deep inside `mask`, easing to 0 over `width_px` at its edge, exactly 0 outside."""
    inside = (mask > 0).astype(np.uint8)
    if width_px <= 0:
        return inside.astype(np.float32)
    dist = cv2.distanceTransform(inside, cv2.DIST_L2, 5)
    t = np.clip(dist / width_px, 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)  # smoothstep


def seam_band(mask: np.ndarray, half_width_px: float) -> np.ndarray:
    """(H, W) uint8 {0, 255}: the band of `half_width_px` either side of the mask's edge."""
    k = _disk(half_width_px)
    return cv2.subtract(cv2.dilate(mask, k), cv2.erode(mask, k))


def band_feather(band: np.ndarray, half_width_px: float) -> np.ndarray:
    """(H, W) float32 alpha over a seam band: 1 on the seam's centre line, 0 at and beyond the band's edges."""
    return inner_feather(band, max(half_width_px, 1.0))


@dataclass
class FaceWork:
    """One portrait in flight through the stages: the template, its face, and the canvas each stage rewrites.

    canvas: (H, W, 3) uint8, starts as the template's pixels. face_mask: (H, W) uint8 {0, 255}, template frame.
    face_mesh: the mesh of the face now on the canvas (template pixels); the template's until a stage replaces it.
    fallbacks: what was substituted and why, for the output metadata.
    """

    job_id: str
    template: np.ndarray
    template_sha256: str
    face: FaceRecord
    frame: FaceFrame
    face_mask: np.ndarray
    seed: int
    canvas: np.ndarray
    face_mesh: np.ndarray | None
    fallbacks: list[str]
