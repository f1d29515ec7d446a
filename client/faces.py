"""Source-photo intake at the customer site: load, quality-check, and cut face-centred aligned crops.

Each photo is accepted (with any warning flags) or rejected with one reason; a batch goes on with the good ones.
Rejection reasons, checked in this order:
  not_a_file, too_large           - the file, before it is read (shared.imaging.load_image)
  unreadable, decompression_bomb  - the file (shared.imaging.load_image)
  no_face                         - no face above the detector's score threshold
  several_faces                   - another face at least `competing_face_ratio` the size of the largest
  face_cut_off                    - the face runs off the frame
  face_too_small                  - sqrt(box area) below `min_face_px`
  too_dark, too_bright            - mean L* of the face outside [min_brightness, max_brightness]
  blurred                         - Laplacian variance (at a 256-px face) below `min_sharpness`
  intake_failed                   - anything else the photo raised (logged with its traceback); the batch goes on
Flags (accepted, but said): low_resolution (face below `low_resolution_face_px`, the crop is upsampled),
background_faces (smaller faces ignored).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
from rich.progress import Progress

from megaportrait.shared.config import FaceSettings
from megaportrait.shared.errors import PhotoRejected
from megaportrait.shared.face_analysis import ALIGN_TEMPLATE_112, FaceAnalyzer, mean_embedding
from megaportrait.shared.imaging import load_image
from megaportrait.shared.records import FaceCrop, FaceCropSet, FaceRecord, SourceImage

log = logging.getLogger("megaportrait.client.faces")

REJECTION_REASONS = ("not_a_file", "too_large", "unreadable", "decompression_bomb", "no_face", "several_faces",
                     "face_cut_off", "face_too_small", "too_dark", "too_bright", "blurred", "intake_failed")
FLAGS = ("low_resolution", "background_faces")
CROP_FACE_FRACTION = 0.75
"""Width of the 5-point template inside a crop, as a fraction of the crop: leaves hair, ears and chin in view."""


@dataclass(frozen=True)
class AcceptedPhoto:
    """A photo that passed intake: its face (with mesh and embedding), its aligned crop and any flags."""

    image_sha256: str
    origin: str
    face: FaceRecord
    crop: FaceCrop
    flags: tuple[str, ...] = ()


@dataclass
class IntakeReport:
    """What intake made of a batch: accepted photos in input order, and one PhotoRejected per refused file."""

    accepted: list[AcceptedPhoto] = field(default_factory=list)
    rejected: list[PhotoRejected] = field(default_factory=list)

    @property
    def crops(self) -> list[FaceCrop]:
        return [a.crop for a in self.accepted]

    def reasons(self) -> dict[str, str]:
        """origin -> rejection reason."""
        return {r.origin: r.reason for r in self.rejected}


def check_face(image: SourceImage, faces: list[FaceRecord], settings: FaceSettings) -> tuple[FaceRecord, tuple[str, ...]]:
    """Pick the photo's one usable face or raise PhotoRejected; returns (face, flags). `faces`: largest first."""
    if not faces:
        raise PhotoRejected(image.origin, "no_face", "no face found (detector score threshold "
                            f"{settings.min_detector_score})")
    main, others = faces[0], faces[1:]
    competing = [f for f in others if f.quality.face_px >= settings.competing_face_ratio * main.quality.face_px]
    if competing:
        raise PhotoRejected(image.origin, "several_faces", f"{1 + len(competing)} faces of similar size; "
                            "use a photo of the person alone")
    q = main.quality
    if not q.fully_visible:
        raise PhotoRejected(image.origin, "face_cut_off", "the face runs off the edge of the photo")
    if q.face_px < settings.min_face_px:
        raise PhotoRejected(image.origin, "face_too_small", f"face is {q.face_px:.0f} px, need at least {settings.min_face_px}")
    if q.brightness < settings.min_brightness:
        raise PhotoRejected(image.origin, "too_dark", f"face brightness L*={q.brightness:.0f}, need at least {settings.min_brightness:.0f}")
    if q.brightness > settings.max_brightness:
        raise PhotoRejected(image.origin, "too_bright", f"face brightness L*={q.brightness:.0f}, at most {settings.max_brightness:.0f}")
    if q.sharpness < settings.min_sharpness:
        raise PhotoRejected(image.origin, "blurred", f"face sharpness {q.sharpness:.0f}, need at least {settings.min_sharpness:.0f}")
    flags = []
    if q.face_px < settings.low_resolution_face_px:
        flags.append("low_resolution")
    if others:
        flags.append("background_faces")
    return main, tuple(flags)


def crop_face(image: SourceImage, face: FaceRecord, size: int = 256) -> FaceCrop:
    """A (size, size) crop aligned by the 5 landmarks (eyes level, face centred), with landmarks and mesh moved along."""
    dst = (ALIGN_TEMPLATE_112 - 56.0) * (size * CROP_FACE_FRACTION / 112.0) + size / 2.0
    matrix, _ = cv2.estimateAffinePartial2D(face.landmarks5.astype(np.float32), dst.astype(np.float32), method=cv2.LMEDS)
    if matrix is None:
        raise PhotoRejected(image.origin, "no_face", "landmarks are degenerate; cannot align the face")
    matrix = matrix.astype(np.float32)
    pixels = cv2.warpAffine(image.pixels, matrix, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))

    def move(points: np.ndarray) -> np.ndarray:
        return (points[:, :2] @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)

    mesh = None
    if face.mesh is not None:
        mesh = np.concatenate([move(face.mesh), face.mesh[:, 2:3] * scale], axis=1).astype(np.float32)
    corners = move(np.array([[face.box[0], face.box[1]], [face.box[0] + face.box[2], face.box[1] + face.box[3]]]))
    box = (float(corners[0, 0]), float(corners[0, 1]), float(corners[1, 0] - corners[0, 0]), float(corners[1, 1] - corners[0, 1]))
    moved = replace(face, box=box, landmarks5=move(face.landmarks5), mesh=mesh)
    return FaceCrop(pixels=pixels, source_to_crop=matrix, face=moved, source_sha256=image.sha256)


def intake_photo(source: str | Path | bytes | SourceImage, analyzer: FaceAnalyzer, settings: FaceSettings) -> AcceptedPhoto:
    """Load and check one photo; raise PhotoRejected with its reason, or return it accepted with its crop."""
    image = source if isinstance(source, SourceImage) else load_image(
        source, max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes)
    faces = analyzer.detect(image, min_score=settings.min_detector_score)
    if faces:
        faces[0] = analyzer.fit_mesh(image, faces[0])
    face, flags = check_face(image, faces, settings)
    face = analyzer.embed(image, face)
    crop = crop_face(image, face, settings.crop_size)
    log.info("accepted photo %s%s", image.sha256[:12], f" flags={','.join(flags)}" if flags else "")
    return AcceptedPhoto(image_sha256=image.sha256, origin=image.origin, face=face, crop=crop, flags=flags)


def intake_photos(sources: Iterable[str | Path | bytes | SourceImage], settings: FaceSettings | None = None,
                  analyzer: FaceAnalyzer | None = None, *, show_progress: bool = True) -> IntakeReport:
    """Check a batch of source photos; the batch goes on past bad ones, each refused with its reason."""
    settings = settings or FaceSettings()
    analyzer = analyzer or FaceAnalyzer(settings)
    sources = list(sources)
    report = IntakeReport()
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task("checking photos", total=len(sources))
        for src in sources:
            try:
                report.accepted.append(intake_photo(src, analyzer, settings))
            except PhotoRejected as exc:
                log.warning("rejected photo: %s", exc.reason)
                report.rejected.append(exc)
            except Exception as exc:  # noqa: BLE001 - one photo (MemoryError, a decoder bug) never ends the batch
                log.exception("photo %d of the batch failed intake", len(report.accepted) + len(report.rejected) + 1)
                report.rejected.append(PhotoRejected(_origin(src), "intake_failed", f"{type(exc).__name__}: {str(exc)[:200]}"))
            progress.advance(task)
    return report


def _origin(src: str | Path | bytes | SourceImage) -> str:
    if isinstance(src, SourceImage):
        return src.origin
    return "<bytes>" if isinstance(src, (bytes, bytearray)) else str(src)


def face_crop_set(person_ref: str, report: IntakeReport) -> FaceCropSet:
    """The classic backend's payload content for one person: the accepted crops and their mean embedding."""
    if not report.accepted:
        raise PhotoRejected(person_ref, "no_face", "no usable photo of this person")
    embeddings = [a.face.embedding for a in report.accepted if a.face.embedding is not None]
    embedder = report.accepted[0].face.embedder
    return FaceCropSet(person_ref=person_ref, crops=tuple(report.crops), mean_embedding=mean_embedding(embeddings), embedder=embedder)
