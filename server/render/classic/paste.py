"""Identity stage of the classic backend: put the person's face where the template's face is.

The person's crop is moved into the template frame by one global similarity (rotation, uniform scale, shift) fitted
to stable inner-face landmarks, so the person keeps their own facial geometry: nothing is warped onto the template's
face shape. The face region is the person's face oval (from their mesh), moved along, its forehead cut at their own
hairline (`hairline_face_region`), so their hair and their photo's background are never carried in; the backend
cuts it again to the template's region found the same way, so the template's hair and headwear are kept.

Images are (H, W, 3) uint8 RGB; points are (x, y) float32 pixels; masks are (H, W) uint8 {0, 255}.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from megaportrait.shared.face_analysis import MESH_FACE_OVAL, face_oval_mask, skin_mask
from megaportrait.shared.records import FaceCrop, FaceRecord

from .harmonize import skin_weight, to_lab

# mediapipe mesh points whose placement depends little on expression or face outline: eye corners, irises, brow
# heads, nose bridge and tip, nostril wings, mouth corners. The jaw and face outline are left out on purpose.
ALIGN_MESH_POINTS = (33, 133, 362, 263, 468, 473, 107, 336, 168, 6, 197, 195, 5, 4, 1, 98, 327, 61, 291)


@dataclass(frozen=True)
class PastedFace:
    """The person's face moved into the template frame.

    layer: (H, W, 3) uint8 RGB, template size: the person's crop warped by `matrix` (edges replicated).
    face: the person's face record in template coordinates (landmarks, mesh and box moved).
    oval: (H, W) uint8 {0, 255}: the person's face oval in the template frame, limited to where the crop had pixels.
    matrix: (2, 3) float32 similarity mapping crop pixels to template pixels.
    """

    layer: np.ndarray
    face: FaceRecord
    oval: np.ndarray
    matrix: np.ndarray


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(2, 3) float32 least-squares similarity (no reflection) taking points src (N, 2) onto dst (N, 2)."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.shape[0] < 2:
        raise ValueError(f"need matching point sets of at least 2 points, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = float((s ** 2).sum())
    if var_s < 1e-9:
        raise ValueError("source points are degenerate (all in one place)")
    u, sig, vt = np.linalg.svd(d.T @ s)
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rot = u @ sign @ vt
    scale = float((sig * np.diag(sign)).sum()) / var_s
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rot
    matrix[:, 2] = mu_d - matrix[:, :2] @ mu_s
    return matrix.astype(np.float32)


def alignment_points(person: FaceRecord, template: FaceRecord) -> tuple[np.ndarray, np.ndarray, bool]:
    """Corresponding points (N, 2) of person and template to fit the similarity; True if the mesh was used."""
    if person.mesh is not None and template.mesh is not None:
        idx = list(ALIGN_MESH_POINTS)
        return person.mesh[idx, :2], template.mesh[idx, :2], True
    return person.landmarks5, template.landmarks5, False


def transform_face(face: FaceRecord, matrix: np.ndarray) -> FaceRecord:
    """The face record with its box, landmarks and mesh moved by a (2, 3) similarity."""
    a, t = matrix[:, :2].astype(np.float32), matrix[:, 2].astype(np.float32)
    scale = float(np.sqrt(abs(np.linalg.det(a))))

    def move(points: np.ndarray) -> np.ndarray:
        return (points[:, :2] @ a.T + t).astype(np.float32)

    mesh = None
    if face.mesh is not None:
        mesh = np.concatenate([move(face.mesh), face.mesh[:, 2:3] * scale], axis=1).astype(np.float32)
    x, y, w, h = face.box
    corners = move(np.array([[x, y], [x + w, y], [x, y + h], [x + w, y + h]], np.float32))
    lo, hi = corners.min(0), corners.max(0)
    box = (float(lo[0]), float(lo[1]), float(hi[0] - lo[0]), float(hi[1] - lo[1]))
    return replace(face, box=box, landmarks5=move(face.landmarks5), mesh=mesh)


def face_region_mask(face: FaceRecord, shape: tuple[int, int], forehead: float = 0.0, grow: float = 0.0) -> np.ndarray:
    """(H, W) uint8 {0, 255}: the face oval, its upper half stretched up by `forehead` x the oval's height.

    The mesh oval stops mid-forehead; the hairline and upper forehead carry much of a person's look, so the paste
    may reach up to them. Without a mesh, the 5-point ellipse (not stretched)."""
    if face.mesh is None or (forehead <= 0 and grow <= 0):
        return face_oval_mask(face, shape)
    pts = face.mesh[list(MESH_FACE_OVAL), :2].astype(np.float64)
    lm = face.landmarks5.astype(np.float64)
    eyes, mouth = (lm[0] + lm[1]) / 2, (lm[3] + lm[4]) / 2
    up = (eyes - mouth) / (np.linalg.norm(eyes - mouth) + 1e-9)
    centre = pts.mean(0)
    pts = centre + (pts - centre) * (1.0 + grow)
    height = float(np.ptp(pts @ up))
    lift = np.clip((pts - centre) @ up, 0.0, None) / max(height / 2, 1e-9)
    pts = pts + np.outer(forehead * height * lift ** 2, up)
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 255)
    return mask


BROW_LINE = 0.5
"""Above this height over the eyes (in eye-to-mouth distances, about the top of the brows) the face region keeps only
skin-coloured pixels: the hairline, fringe or headwear there is not face."""


def hairline_face_region(pixels: np.ndarray, face: FaceRecord, forehead: float = 0.0, grow: float = 0.0,
                         limit: np.ndarray | None = None) -> np.ndarray:
    """(H, W) uint8 {0, 255}: `face_region_mask` cut at the face's own hairline, so no hair or headwear is in it.

    Below the brows the whole region counts (eyes, glasses, beard belong to the face); above them only pixels whose
    colour matches the face's own skin (`harmonize.skin_weight`, a model of the mesh skin's chroma), small gaps
    (wrinkles, highlights) closed and enclosed holes filled, and only the part joined to the face. `limit` (uint8)
    bounds the region first (e.g. where a warped crop had pixels). Without a mesh, the 5-point ellipse (no forehead to cut)."""
    shape = pixels.shape[:2]
    region = face_region_mask(face, shape, forehead, grow)
    if limit is not None:
        region &= limit
    if face.mesh is None or not region.any():
        return region
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    lm = face.landmarks5.astype(np.float64)
    eyes, mouth = (lm[0] + lm[1]) / 2, (lm[3] + lm[4]) / 2
    span = float(np.linalg.norm(eyes - mouth)) + 1e-9
    up = (eyes - mouth) / span
    gy, gx = np.mgrid[y0:y1, x0:x1]
    above = ((gx - eyes[0]) * up[0] + (gy - eyes[1]) * up[1]) > BROW_LINE * span
    sub = (slice(y0, y1), slice(x0, x1))
    try:
        skin = skin_weight(to_lab(pixels[sub]), skin_mask(face, shape)[sub], np.ones((y1 - y0, x1 - x0), np.float32),
                           smooth=1.0) > 0.5
    except ValueError:
        return region
    r = max(1, int(round(0.02 * float(face.box[2]))))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    skin = cv2.morphologyEx(skin.astype(np.uint8), cv2.MORPH_CLOSE, kernel) > 0
    keep = (region[sub] > 0) & (~above | skin)
    count, labels = cv2.connectedComponents(keep.astype(np.uint8), connectivity=4)
    if count > 2:
        centre = np.round((eyes + mouth) / 2 - [x0, y0]).astype(int)
        cy, cx = np.clip(centre[1], 0, y1 - y0 - 1), np.clip(centre[0], 0, x1 - x0 - 1)
        label = labels[cy, cx] or np.bincount(labels[labels > 0]).argmax()
        keep = labels == label
    # Holes inside the face (a shiny forehead, a mole, glasses' frames above the brows) belong to it; hair never
    # forms a hole, it reaches the region's edge.
    outside = np.pad(~keep, 1, constant_values=True).astype(np.uint8)
    cv2.floodFill(outside, None, (0, 0), 2)
    keep |= outside[1:-1, 1:-1] == 1
    out = np.zeros(shape, np.uint8)
    out[sub] = np.where(keep, 255, 0).astype(np.uint8)
    return out


def warp_downsampling_aware(pixels: np.ndarray, matrix: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8: `pixels` warped by the (2, 3) similarity `matrix` into an (H, W) frame.

    When the similarity shrinks, the image is first area-resampled to the target scale so fine detail does not
    alias (bilinear warping alone samples a shrinking image without low-pass filtering)."""
    h, w = shape
    a = matrix[:, :2].astype(np.float64)
    scale = float(np.sqrt(abs(np.linalg.det(a))))
    if scale < 0.9:
        small = cv2.resize(pixels, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        sy, sx = small.shape[0] / pixels.shape[0], small.shape[1] / pixels.shape[1]
        # crop coordinate c = (c' + 0.5) / s - 0.5 for a resized coordinate c'.
        a2 = a @ np.diag([1 / sx, 1 / sy])
        t2 = matrix[:, 2] + a @ np.array([0.5 / sx - 0.5, 0.5 / sy - 0.5])
        matrix = np.concatenate([a2, t2[:, None]], axis=1).astype(np.float32)
        pixels = small
    return cv2.warpAffine(pixels, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def paste_face(crop: FaceCrop, template_face: FaceRecord, template_shape: tuple[int, int],
               forehead: float = 0.0, grow: float = 0.0) -> tuple[PastedFace, list[str]]:
    """Move the person's crop onto the template face; returns the pasted face and the fallbacks taken.

    template_shape: (H, W) of the template image; forehead, grow: see `face_region_mask`; the region is cut at the
    person's own hairline (`hairline_face_region`), so their hair and background stay behind. Fallback
    "paste:5point_alignment" is named when either face lacks
    its mesh (alignment then uses the 5 landmarks), "paste:ellipse_oval" when the person lacks one (the face region
    is then an ellipse drawn from the 5 landmarks).
    """
    fallbacks: list[str] = []
    src, dst, used_mesh = alignment_points(crop.face, template_face)
    if not used_mesh:
        fallbacks.append("paste:5point_alignment")
    if crop.face.mesh is None:
        fallbacks.append("paste:ellipse_oval")
    matrix = similarity_transform(src, dst)
    h, w = template_shape
    layer = warp_downsampling_aware(crop.pixels, matrix, (h, w))
    inside = cv2.warpAffine(np.full(crop.pixels.shape[:2], 255, np.uint8), matrix, (w, h), flags=cv2.INTER_NEAREST,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    face = transform_face(crop.face, matrix)
    oval = hairline_face_region(layer, face, forehead, grow, inside)
    return PastedFace(layer=layer, face=face, oval=oval, matrix=matrix), fallbacks
