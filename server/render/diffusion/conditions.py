"""Control images for the ControlNets, extracted from a face crop by non-learned methods.

No network runs here: geometry comes from the 478-point mediapipe mesh (landmark sketch; depth and normals by
rasterising the mesh's triangles with a z-buffer), edges from XDoG or Canny, colour from a coarse mosaic.
Every function takes an (S, S, 3) uint8 RGB crop and/or the mesh in that crop's pixels ((478, 3) float32: x, y in
pixels, z in pixels with negative = towards the camera, as mediapipe gives it) and returns an (S, S, 3) uint8 RGB
control image in the convention of the public ControlNet of that name (white-on-black edges, near = bright depth,
normals as (n + 1) / 2 with x right, y up, z towards the viewer).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import cv2
import numpy as np

from megaportrait.shared.face_analysis import (MESH_FACE_OVAL, MESH_LEFT_BROW, MESH_LEFT_EYE, MESH_LIPS_OUTER,
                                               MESH_RIGHT_BROW, MESH_RIGHT_EYE)

MESH_POINTS = 478


class MeshRequired(ValueError):
    """A geometric condition was asked for without a face mesh."""


@lru_cache(maxsize=1)
def mesh_triangles() -> np.ndarray:
    """(T, 3) int32 vertex indices of the face mesh's triangles (mediapipe's tesselation; the 3-cliques of its edges)."""
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_TESSELATION

    edges = {tuple(sorted(e)) for e in FACEMESH_TESSELATION}
    neighbours: dict[int, set[int]] = {}
    for a, b in edges:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    tris = {tuple(sorted((a, b, c))) for a, b in edges for c in neighbours[a] & neighbours[b]}
    return np.array(sorted(tris), dtype=np.int32)


def _need_mesh(mesh: np.ndarray | None, what: str) -> np.ndarray:
    if mesh is None or mesh.shape[0] < 468:
        raise MeshRequired(f"the {what} condition needs the face's 478-point mesh, and none was fitted")
    return np.asarray(mesh, np.float32)


def rasterise_mesh(mesh: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Z-buffer the mesh triangles into an (S, S) image.

    Returns (depth, normals): depth (S, S) float32, the mesh z of the nearest surface (NaN where no triangle
    covers the pixel); normals (S, S, 3) float32 unit vectors in a y-up, z-towards-viewer frame (0 off the mesh).
    """
    mesh = _need_mesh(mesh, "depth/normals")
    tris = mesh_triangles()
    # Camera frame: x right, y up, z towards the viewer.
    cam = np.stack([mesh[:, 0], -mesh[:, 1], -mesh[:, 2]], axis=1).astype(np.float64)
    face_n = np.cross(cam[tris[:, 1]] - cam[tris[:, 0]], cam[tris[:, 2]] - cam[tris[:, 0]])
    face_n *= np.where(face_n[:, 2:3] < 0, -1.0, 1.0)  # orient every triangle towards the viewer
    vert_n = np.zeros_like(cam)
    for k in range(3):
        np.add.at(vert_n, tris[:, k], face_n)
    vert_n /= np.linalg.norm(vert_n, axis=1, keepdims=True) + 1e-12

    depth = np.full((size, size), np.inf)
    normals = np.zeros((size, size, 3))
    xy = mesh[:, :2].astype(np.float64)
    z = mesh[:, 2].astype(np.float64)
    for tri in tris:
        p = xy[tri]
        x0, y0 = np.floor(p.min(axis=0)).astype(int)
        x1, y1 = np.ceil(p.max(axis=0)).astype(int)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size - 1), min(y1, size - 1)
        if x1 < x0 or y1 < y0:
            continue
        gx, gy = np.meshgrid(np.arange(x0, x1 + 1) + 0.5, np.arange(y0, y1 + 1) + 0.5)
        (ax, ay), (bx, by), (cx, cy) = p
        det = (by - cy) * (ax - cx) + (cx - bx) * (ay - cy)
        if abs(det) < 1e-9:
            continue
        w0 = ((by - cy) * (gx - cx) + (cx - bx) * (gy - cy)) / det
        w1 = ((cy - ay) * (gx - cx) + (ax - cx) * (gy - cy)) / det
        w2 = 1.0 - w0 - w1
        inside = (w0 >= -1e-6) & (w1 >= -1e-6) & (w2 >= -1e-6)
        if not inside.any():
            continue
        zi = w0 * z[tri[0]] + w1 * z[tri[1]] + w2 * z[tri[2]]
        region = depth[y0:y1 + 1, x0:x1 + 1]
        nearer = inside & (zi < region)  # mediapipe z: smaller is nearer
        if not nearer.any():
            continue
        region[nearer] = zi[nearer]
        n = w0[..., None] * vert_n[tri[0]] + w1[..., None] * vert_n[tri[1]] + w2[..., None] * vert_n[tri[2]]
        normals[y0:y1 + 1, x0:x1 + 1][nearer] = n[nearer]
    covered = np.isfinite(depth)
    normals[covered] /= np.linalg.norm(normals[covered], axis=1, keepdims=True) + 1e-12
    depth[~covered] = np.nan
    return depth.astype(np.float32), normals.astype(np.float32)


def depth_map(pixels: np.ndarray | None, mesh: np.ndarray | None) -> np.ndarray:
    """Depth control image: the face mesh's depth, nearest point white, farthest face point 25 % grey, background black."""
    size = _size(pixels)
    depth, _ = rasterise_mesh(_need_mesh(mesh, "depth"), size)
    covered = np.isfinite(depth)
    out = np.zeros((size, size), np.float32)
    if covered.any():
        near, far = float(np.nanmin(depth)), float(np.nanmax(depth))
        out[covered] = 0.25 + 0.75 * (far - depth[covered]) / max(far - near, 1e-6)
    return np.repeat(np.round(out * 255).astype(np.uint8)[..., None], 3, axis=2)


def normal_map(pixels: np.ndarray | None, mesh: np.ndarray | None) -> np.ndarray:
    """Normal control image: RGB = (n + 1) / 2 over the face, black background."""
    size = _size(pixels)
    _, normals = rasterise_mesh(_need_mesh(mesh, "normals"), size)
    covered = np.linalg.norm(normals, axis=2) > 0
    out = np.zeros((size, size, 3), np.uint8)
    out[covered] = np.round((normals[covered] + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    return out


_SKETCH_REGIONS: tuple[tuple[tuple[int, ...], tuple[int, int, int]], ...] = (
    (MESH_FACE_OVAL, (255, 255, 255)),
    (MESH_RIGHT_BROW, (255, 96, 32)), (MESH_LEFT_BROW, (32, 96, 255)),
    (MESH_RIGHT_EYE, (255, 48, 48)), (MESH_LEFT_EYE, (48, 255, 48)),
    (MESH_LIPS_OUTER, (255, 64, 255)),
)
# Nose line, bridge to tip to base (mediapipe indices).
_NOSE_LINE = (168, 6, 197, 195, 5, 4, 1, 19, 94, 2)
_IRIS_CENTRES = ((468, (255, 48, 48)), (473, (48, 255, 48)))


def landmark_sketch(pixels: np.ndarray | None, mesh: np.ndarray | None) -> np.ndarray:
    """Landmark/pose control image: the mesh's oval, brows, eyes, lips and nose line drawn in fixed colours on black
    (the layout of the public mediapipe-face ControlNets), irises as dots."""
    mesh = _need_mesh(mesh, "landmarks")
    size = _size(pixels)
    out = np.zeros((size, size, 3), np.uint8)
    thick = max(1, size // 256)
    for region, colour in _SKETCH_REGIONS:
        pts = np.round(mesh[list(region), :2]).astype(np.int32)
        cv2.polylines(out, [pts], isClosed=True, color=colour, thickness=thick, lineType=cv2.LINE_AA)
    nose = np.round(mesh[list(_NOSE_LINE), :2]).astype(np.int32)
    cv2.polylines(out, [nose], isClosed=False, color=(255, 255, 64), thickness=thick, lineType=cv2.LINE_AA)
    if mesh.shape[0] >= MESH_POINTS:
        for idx, colour in _IRIS_CENTRES:
            x, y = np.round(mesh[idx, :2]).astype(int)
            cv2.circle(out, (int(x), int(y)), max(1, size // 128), colour, -1, lineType=cv2.LINE_AA)
    return out


def lineart_xdog(pixels: np.ndarray, mesh: np.ndarray | None = None, *, sigma: float | None = None,
                 k: float = 1.6, tau: float = 0.98, eps: float = -0.02, phi: float = 60.0) -> np.ndarray:
    """Line-art control image by extended difference of Gaussians (XDoG): white lines on black.

    sigma defaults to 0.6 px per 256 px of crop side so the line weight follows the crop's scale.
    """
    gray = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    sigma = sigma or max(0.5, 0.6 * pixels.shape[0] / 256.0)
    g1 = cv2.GaussianBlur(gray, (0, 0), sigma)
    g2 = cv2.GaussianBlur(gray, (0, 0), sigma * k)
    d = g1 - tau * g2
    soft = np.where(d >= eps, 1.0, 1.0 + np.tanh(phi * (d - eps)))
    lines = np.round((1.0 - soft) * 255).clip(0, 255).astype(np.uint8)
    return np.repeat(lines[..., None], 3, axis=2)


def canny_edges(pixels: np.ndarray, mesh: np.ndarray | None = None) -> np.ndarray:
    """Canny control image, thresholds at 0.66x and 1.33x the crop's median grey level: white edges on black."""
    gray = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    med = float(np.median(gray))
    edges = cv2.Canny(cv2.GaussianBlur(gray, (3, 3), 0), max(0.0, 0.66 * med), min(255.0, 1.33 * med))
    return np.repeat(edges[..., None], 3, axis=2)


def colour_hint(pixels: np.ndarray, mesh: np.ndarray | None = None, cells: int = 8) -> np.ndarray:
    """Colour control image: the crop's mean colour in a `cells` x `cells` mosaic (palette without detail)."""
    size = pixels.shape[0]
    small = cv2.resize(pixels, (cells, cells), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_NEAREST)


def tile_hint(pixels: np.ndarray, mesh: np.ndarray | None = None, factor: int = 4) -> np.ndarray:
    """Tile control image: the crop blurred by down- and up-sampling by `factor` (what tile ControlNets expect)."""
    size = pixels.shape[0]
    small = cv2.resize(pixels, (max(size // factor, 1), max(size // factor, 1)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def _size(pixels: np.ndarray | None) -> int:
    if pixels is None:
        raise ValueError("the crop is needed to know the control image's size")
    return int(pixels.shape[0])


ConditionFn = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]
CONDITIONS: dict[str, ConditionFn] = {
    "landmarks": landmark_sketch,
    "depth": depth_map,
    "normals": normal_map,
    "lineart": lineart_xdog,
    "canny": canny_edges,
    "color": colour_hint,
    "tile": tile_hint,
}
GEOMETRIC = frozenset({"landmarks", "depth", "normals"})
"""Conditions drawn from the face mesh (the others are read off pixels)."""


def control_image(name: str, pixels: np.ndarray, mesh: np.ndarray | None) -> np.ndarray:
    """The (S, S, 3) uint8 control image `name` for an (S, S, 3) uint8 crop and its mesh (crop pixels)."""
    if name not in CONDITIONS:
        raise KeyError(f"unknown condition {name!r}; known: {', '.join(CONDITIONS)}")
    return CONDITIONS[name](pixels, mesh)
