"""Typed records that flow one way through the system.

photo (`SourceImage`) -> face (`FaceRecord`, `FaceCrop`) -> `IdentityAdapter` -> sealed payload -> `RenderJob`
-> `Portrait`. A stage takes records and returns new ones; records never hold a service handle.

Array conventions (as in scikit-image): images are (H, W, 3) uint8 RGB unless a field says otherwise; points are
float32 pixel coordinates (x, y) in the image they belong to.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

import numpy as np

Backend = Literal["classic", "diffusion"]
STAGES = ("identity", "shading", "harmonize")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class SourceImage:
    """A decoded, validated photo.

    pixels: (H, W, 3) uint8 RGB, EXIF orientation applied.
    sha256: hash of the original file bytes (or of the pixels for in-memory images); names the photo everywhere.
    origin: where it came from (a path or label); stays on the machine that loaded it.
    """

    pixels: np.ndarray
    sha256: str
    origin: str

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @classmethod
    def from_array(cls, pixels: np.ndarray, origin: str = "<array>") -> "SourceImage":
        """Wrap an in-memory (H, W, 3) uint8 RGB array; the hash is taken over its bytes and shape."""
        pixels = np.ascontiguousarray(pixels)
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f"expected (H, W, 3) uint8 RGB, got {pixels.shape} {pixels.dtype}")
        digest = sha256_hex(repr(pixels.shape).encode() + pixels.tobytes())
        return cls(pixels=pixels, sha256=digest, origin=origin)


@dataclass(frozen=True)
class FaceQuality:
    """Measured quality of one detected face; thresholds live in `client.faces.QualityThresholds`."""

    face_px: float  # inter-ocular-independent size: sqrt(box area) in source pixels
    brightness: float  # mean L* (0-100) over the face box
    sharpness: float  # variance of the Laplacian on the face, normalised to a 256-px face
    detector_score: float
    fully_visible: bool  # the box lies inside the frame


@dataclass(frozen=True)
class FaceRecord:
    """One detected face in one image.

    box: (x, y, w, h) in source pixels.
    landmarks5: (5, 2) float32; right eye, left eye, nose tip, right mouth corner, left mouth corner (YuNet order,
        "right" meaning the subject's right, i.e. image left).
    mesh: (478, 3) float32 dense landmarks (x, y in pixels, z in pixels relative to the face centre) when the mesh
        model ran; None otherwise.
    embedding: (128,) float32, L2-normalised identity embedding (SFace by default); None until computed.
    embedder: the model that produced `embedding` (cosines are only comparable within one embedder).
    """

    image_sha256: str
    box: tuple[float, float, float, float]
    landmarks5: np.ndarray
    quality: FaceQuality
    mesh: np.ndarray | None = None
    embedding: np.ndarray | None = None
    embedder: str = ""


@dataclass(frozen=True)
class FaceCrop:
    """A face-centred, aligned crop cut from a source photo for training or for a classic payload.

    pixels: (S, S, 3) uint8 RGB.
    source_to_crop: (2, 3) float32 affine that maps source pixel coordinates into the crop.
    face: the face record in *crop* coordinates (landmarks and mesh transformed).
    """

    pixels: np.ndarray
    source_to_crop: np.ndarray
    face: FaceRecord
    source_sha256: str


@dataclass(frozen=True)
class BaseModelRef:
    """Which base diffusion model an adapter belongs to. `kind` is "tiny-embedded" for the in-code test model."""

    name: str
    sha256: str
    kind: Literal["tiny-embedded", "diffusers-dir", "single-file"]


@dataclass(frozen=True)
class PrivacyReport:
    """Differential-privacy figures of one training run, as reported by the Opacus accountant (never by hand).

    epsilon is None when training ran without DP (then the adapter is not private and says so).
    """

    epsilon: float | None
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    steps: int
    sample_rate: float
    accountant: str


@dataclass(frozen=True)
class IdentityAdapter:
    """A person's Identity Net LoRA: the weights in diffusers/peft layout plus what is needed to audit them.

    lora_state: tensor name -> tensor, named as `pipe.load_lora_weights` expects (``unet.<module>.lora_A.weight``...).
    person_ref: a pseudonymous reference to the person (hash), never a name.
    photo_sha256: hashes of the photos it was trained on (not the photos).
    """

    person_ref: str
    token: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    lora_state: dict
    base_model: BaseModelRef
    privacy: PrivacyReport
    photo_sha256: tuple[str, ...]
    created_at: datetime = field(default_factory=utc_now)


@dataclass(frozen=True)
class StageSwitches:
    """Which MegaPortrait stages run; an ablation is a stage switched off."""

    identity: bool = True
    shading: bool = True
    harmonize: bool = True

    def enabled(self) -> tuple[str, ...]:
        return tuple(s for s in STAGES if getattr(self, s))


@dataclass(frozen=True)
class RenderJob:
    """A request to the render node: a sealed identity payload to put onto a template portrait."""

    job_id: str
    backend: Backend
    template: SourceImage
    sealed_payload: bytes
    consent_ref: str
    stages: StageSwitches = field(default_factory=StageSwitches)
    seed: int = 0
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Portrait:
    """A finished render. pixels: (H, W, 3) uint8 RGB, the template's size.

    metadata: backend, stages run, parameters, identity and skin-tone scores, fallbacks taken, and the
    AI-generated provenance label; it is embedded in the output file.
    """

    job_id: str
    pixels: np.ndarray
    metadata: dict


@dataclass(frozen=True)
class FaceCropSet:
    """The classic backend's identity payload: a person's aligned face crops and their mean identity embedding.

    Sent only under consent for the "classic face-crop payload" purpose; the diffusion backend gets an
    `IdentityAdapter` instead.
    """

    person_ref: str
    crops: tuple[FaceCrop, ...]
    mean_embedding: np.ndarray
    embedder: str


IdentityPayload = IdentityAdapter | FaceCropSet
