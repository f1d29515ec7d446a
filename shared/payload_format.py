"""The sealed identity payload: envelope layout, signed header, plaintext encodings and the refusal types.

Envelope (all integers big-endian)::

    b"MPSP" | u32 header_len | header (canonical JSON) | u16 sig_len | Ed25519 signature | HPKE enc || ciphertext

The header names everything the payload is bound to (job id, consent reference and scope, person reference, backend,
payload kind, site and its key, recipient node key, issue and expiry times, a random nonce) and the sha256 of the
HPKE output. The site signs ``"megaportrait/render-payload/v1" NUL header``. The HPKE `info` is the same domain
string, NUL, and the header *without* `ciphertext_sha256` (the binding), so a ciphertext opens only in the context
it was sealed for.

Plaintexts hold the minimum for the backend: `lora_adapter` is `shared.adapters.adapter_to_bytes(IdentityAdapter)`;
`face_crops` is an ``.npz`` (no pickle) of the crop arrays plus a JSON member `meta.json` (see `face_crops_to_bytes`).
"""
from __future__ import annotations

import io
import json
import re
import struct
import zipfile
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import numpy as np

from .crypto import canonical_json
from .errors import MegaPortraitError
from .records import FaceCrop, FaceCropSet, FaceQuality, FaceRecord

MAGIC = b"MPSP"
FORMAT_VERSION = 1
SIGNATURE_DOMAIN = "megaportrait/render-payload/v1"
KIND_FACE_CROPS = "face_crops"
KIND_LORA_ADAPTER = "lora_adapter"
PAYLOAD_KINDS = (KIND_FACE_CROPS, KIND_LORA_ADAPTER)
CLASSIC_CROP_PURPOSE = "classic_face_crop_payload"
"""The consent purpose a person must have granted before their face crops may leave the site (classic backend)."""

MAX_HEADER_BYTES = 16 * 1024
_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


# ------------------------------------------------------------------------------------------------- refusals


class PayloadError(MegaPortraitError):
    """A sealed payload was refused. `reason` is the machine-readable code sent back to the caller."""

    reason = "payload_refused"


class PayloadMalformed(PayloadError):
    """The bytes are not a well-formed sealed payload (layout, header JSON, field types, plaintext encoding)."""

    reason = "payload_malformed"


class PayloadTampered(PayloadError):
    """The signature does not verify, the ciphertext does not match the signed hash, or decryption failed."""

    reason = "payload_tampered"


class PayloadBindingMismatch(PayloadTampered):
    """The payload was sealed for another job id, consent reference or backend than the request names."""

    reason = "payload_binding_mismatch"


class PayloadReplayed(PayloadError):
    """This payload's nonce was already consumed by an earlier job."""

    reason = "payload_replayed"


class PayloadExpired(PayloadError):
    """The payload's expiry time has passed (or its issue time lies in the future)."""

    reason = "payload_expired"


class WrongRecipientKey(PayloadError):
    """The payload was sealed to another render node key; reseal it to this node's public key."""

    reason = "wrong_recipient_key"


class UnknownSite(PayloadError):
    """The signing site, or this key of that site, is not in the node's trusted-site list."""

    reason = "unknown_site"


class ConsentScopeRefused(PayloadError):
    """The consent scope given does not allow this payload kind to leave the site."""

    reason = "consent_scope_refused"


# --------------------------------------------------------------------------------------------------- header


@dataclass(frozen=True)
class PayloadHeader:
    """The signed, bound facts about one payload. Times are integer seconds since the Unix epoch (UTC)."""

    version: int
    suite: str
    kind: str
    backend: str
    job_id: str
    consent_ref: str
    consent_scope: str
    person_ref: str
    site_id: str
    site_key: str  # Ed25519 fingerprint of the signing key
    recipient: str  # HPKE fingerprint of the node key sealed to
    issued_at: int
    expires_at: int
    nonce: str  # 32 hex chars, random per payload
    ciphertext_sha256: str = ""

    _STR_FIELDS: ClassVar[tuple[str, ...]] = (
        "suite", "kind", "backend", "job_id", "consent_ref", "consent_scope", "person_ref", "site_id", "site_key",
        "recipient", "nonce", "ciphertext_sha256",
    )

    def binding_bytes(self) -> bytes:
        """HPKE `info`: domain, NUL, the canonical header without the ciphertext hash."""
        doc = asdict(self)
        doc.pop("ciphertext_sha256")
        return SIGNATURE_DOMAIN.encode() + b"\0" + canonical_json(doc)

    def to_bytes(self) -> bytes:
        return canonical_json(asdict(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> "PayloadHeader":
        """Parse and validate; refuses anything that is not exactly the canonical encoding of a valid header."""
        try:
            doc = json.loads(data.decode("ascii"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise PayloadMalformed(f"payload header is not ASCII JSON ({exc})") from exc
        if not isinstance(doc, dict):
            raise PayloadMalformed("payload header is not a JSON object")
        names = {f.name for f in fields(cls)}
        if set(doc) != names:
            missing, extra = sorted(names - set(doc)), sorted(set(doc) - names)
            raise PayloadMalformed(f"payload header fields differ: missing {missing}, unexpected {extra}")
        for name in cls._STR_FIELDS:
            if not isinstance(doc[name], str):
                raise PayloadMalformed(f"payload header field {name!r} must be a string")
        for name in ("version", "issued_at", "expires_at"):
            if not isinstance(doc[name], int) or isinstance(doc[name], bool):
                raise PayloadMalformed(f"payload header field {name!r} must be an integer")
        header = cls(**doc)
        if header.to_bytes() != data:
            raise PayloadMalformed("payload header is not in canonical JSON form")
        header.validate()
        return header

    def validate(self) -> None:
        """Field-level checks shared by sealer and opener."""
        if self.version != FORMAT_VERSION:
            raise PayloadMalformed(f"payload format version {self.version} is not supported (this node reads {FORMAT_VERSION})")
        if self.kind not in PAYLOAD_KINDS:
            raise PayloadMalformed(f"payload kind {self.kind!r} is not one of {PAYLOAD_KINDS}")
        for name in ("job_id", "consent_ref", "person_ref", "site_id", "backend"):
            if not _ID_RE.match(getattr(self, name)):
                raise PayloadMalformed(f"payload header field {name!r} must be 1-128 chars of [A-Za-z0-9._:-]")
        if not self.consent_scope:
            raise PayloadMalformed("payload header has an empty consent_scope")
        if not re.fullmatch(r"[0-9a-f]{32}", self.nonce):
            raise PayloadMalformed("payload nonce must be 32 lowercase hex characters")
        if self.expires_at <= self.issued_at:
            raise PayloadMalformed("payload expires_at must be later than issued_at")


def valid_id(text: str) -> bool:
    """True for 1-128 chars of [A-Za-z0-9._:-] (job ids, references, backend names)."""
    return bool(_ID_RE.match(text))


# ------------------------------------------------------------------------------------------------- envelope


@dataclass(frozen=True)
class Envelope:
    """A parsed sealed payload. `header_bytes` are the exact signed bytes."""

    header: PayloadHeader
    header_bytes: bytes
    signature: bytes
    ciphertext: bytes

    def to_bytes(self) -> bytes:
        return (
            MAGIC + struct.pack(">I", len(self.header_bytes)) + self.header_bytes
            + struct.pack(">H", len(self.signature)) + self.signature + self.ciphertext
        )

    @classmethod
    def parse(cls, data: bytes) -> "Envelope":
        data = bytes(data)
        if len(data) < 10 or data[:4] != MAGIC:
            raise PayloadMalformed("not a MegaPortrait sealed payload (bad magic bytes)")
        (hlen,) = struct.unpack(">I", data[4:8])
        if hlen > MAX_HEADER_BYTES or 8 + hlen + 2 > len(data):
            raise PayloadMalformed(f"payload header length {hlen} is out of range for a {len(data)}-byte payload")
        header_bytes = data[8 : 8 + hlen]
        (slen,) = struct.unpack(">H", data[8 + hlen : 10 + hlen])
        sig_start = 10 + hlen
        if slen != 64 or sig_start + slen >= len(data):
            raise PayloadMalformed(f"payload signature must be 64 bytes followed by ciphertext (got length {slen})")
        return cls(
            header=PayloadHeader.from_bytes(header_bytes),
            header_bytes=header_bytes,
            signature=data[sig_start : sig_start + slen],
            ciphertext=data[sig_start + slen :],
        )


# --------------------------------------------------------------------------------------- face-crop plaintext


def face_crops_to_bytes(crop_set: FaceCropSet) -> bytes:
    """Encode a `FaceCropSet` as an uncompressed .npz with no object arrays.

    Members: ``crop{i}_pixels`` (S, S, 3) uint8, ``crop{i}_source_to_crop`` (2, 3) float32, ``crop{i}_landmarks5``
    (5, 2) float32, optional ``crop{i}_mesh`` (478, 3) float32 and ``crop{i}_embedding`` (D,) float32,
    ``mean_embedding`` (D,) float32, and ``meta`` (uint8 bytes of canonical JSON: person_ref, embedder, and per crop
    the source/image hashes, box, quality and embedder).
    """
    arrays: dict[str, np.ndarray] = {"mean_embedding": np.asarray(crop_set.mean_embedding, dtype=np.float32)}
    crops_meta = []
    for i, crop in enumerate(crop_set.crops):
        face = crop.face
        pixels = np.asarray(crop.pixels)
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f"crop {i}: expected (S, S, 3) uint8 pixels, got {pixels.shape} {pixels.dtype}")
        arrays[f"crop{i}_pixels"] = pixels
        arrays[f"crop{i}_source_to_crop"] = np.asarray(crop.source_to_crop, dtype=np.float32).reshape(2, 3)
        arrays[f"crop{i}_landmarks5"] = np.asarray(face.landmarks5, dtype=np.float32).reshape(5, 2)
        if face.mesh is not None:
            arrays[f"crop{i}_mesh"] = np.asarray(face.mesh, dtype=np.float32)
        if face.embedding is not None:
            arrays[f"crop{i}_embedding"] = np.asarray(face.embedding, dtype=np.float32)
        crops_meta.append(
            {
                "source_sha256": crop.source_sha256,
                "image_sha256": face.image_sha256,
                "box": [float(v) for v in face.box],
                "quality": {k: (bool(v) if isinstance(v, (bool, np.bool_)) else float(v)) for k, v in asdict(face.quality).items()},
                "embedder": face.embedder,
            }
        )
    meta = {"format": "megaportrait-face-crops/v1", "person_ref": crop_set.person_ref, "embedder": crop_set.embedder, "crops": crops_meta}
    arrays["meta"] = np.frombuffer(canonical_json(meta), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def face_crops_from_bytes(data: bytes) -> FaceCropSet:
    """Decode `face_crops_to_bytes` output (pickle disabled). Raises PayloadMalformed on any inconsistency."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise PayloadMalformed(f"face-crop payload is not a pickle-free .npz ({exc})") from exc
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode("ascii"))
        if meta.get("format") != "megaportrait-face-crops/v1":
            raise ValueError(f"unknown format {meta.get('format')!r}")
        crops = []
        for i, cm in enumerate(meta["crops"]):
            pixels = arrays[f"crop{i}_pixels"]
            if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
                raise ValueError(f"crop {i} pixels are {pixels.shape} {pixels.dtype}, expected (S, S, 3) uint8")
            face = FaceRecord(
                image_sha256=str(cm["image_sha256"]),
                box=tuple(float(v) for v in cm["box"]),
                landmarks5=arrays[f"crop{i}_landmarks5"].astype(np.float32).reshape(5, 2),
                quality=FaceQuality(**cm["quality"]),
                mesh=arrays.get(f"crop{i}_mesh"),
                embedding=arrays.get(f"crop{i}_embedding"),
                embedder=str(cm["embedder"]),
            )
            crops.append(
                FaceCrop(
                    pixels=pixels,
                    source_to_crop=arrays[f"crop{i}_source_to_crop"].astype(np.float32).reshape(2, 3),
                    face=face,
                    source_sha256=str(cm["source_sha256"]),
                )
            )
        if not crops:
            raise ValueError("it holds no crops")
        return FaceCropSet(
            person_ref=str(meta["person_ref"]),
            crops=tuple(crops),
            mean_embedding=arrays["mean_embedding"].astype(np.float32),
            embedder=str(meta["embedder"]),
        )
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise PayloadMalformed(f"face-crop payload is inconsistent: {exc}") from exc
