"""Enrolling a person's photos at the site: each upload goes through intake (`client.faces`); accepted photos go
into the site's photo store (`<data-dir>/<person_ref>/`, what the federation and renders read) with their aligned
crop, refused ones are not kept and come back with their reason. Nothing is stored for a person without an active
consent for at least one purpose. Every photo is audited by hash."""
from __future__ import annotations

import io
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from megaportrait.shared.consent import ConsentMissing
from megaportrait.shared.records import sha256_hex

from .consent_capture import active_purposes, check_person_ref
from .site import Site

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class Refusal:
    """An upload intake refused: the file's name as given, the reason code and its detail."""

    file: str
    reason: str
    detail: str


@dataclass
class Enrolment:
    """What one enrolment did. accepted: `client.faces.AcceptedPhoto` (origin: the stored file) in upload order;
    accepted_files: the uploads' names, same order; already_enrolled: uploads the site held already."""

    person_ref: str
    accepted: list = field(default_factory=list)
    accepted_files: list[str] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    already_enrolled: list[str] = field(default_factory=list)


def photo_files(paths: Iterable[Path]) -> list[Path]:
    """The photo files named: files as given, folders expanded to their photos (sorted); a missing path raises."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in PHOTO_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such photo or folder")
    return out


def _png(pixels) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def enrol_photos(site: Site, person_ref: str, uploads: Iterable[tuple[str, bytes]], analyzer, face_settings, *,
                 actor: str = "operator:cli", advance: Callable[[], None] | None = None) -> Enrolment:
    """Intake each (file name, bytes) upload for `person_ref`; store the accepted ones and their crops.

    Raises ConsentMissing (audited) before reading anything when the person has no active consent at all.
    """
    from megaportrait.client.faces import intake_photo
    from megaportrait.shared.errors import PhotoRejected
    from megaportrait.shared.imaging import load_image

    check_person_ref(person_ref)
    if not active_purposes(site, person_ref):
        site.audit.append("photo.intake", actor=actor, outcome="refused", person=person_ref,
                          detail={"reason": "consent_missing"})
        raise ConsentMissing(person_ref, "any purpose", _now())
    out = Enrolment(person_ref=person_ref)
    held = set(site.photos.find_person(person_ref))
    n = len(held)
    for name, data in uploads:
        digest = sha256_hex(data)
        if digest in held:
            out.already_enrolled.append(name)
            if advance:
                advance()
            continue
        try:
            image = load_image(data, origin=name, max_pixels=face_settings.max_image_pixels)
            accepted = intake_photo(image, analyzer, face_settings)
        except PhotoRejected as exc:
            out.refused.append(Refusal(name, exc.reason, exc.detail))
            site.audit.append("photo.intake", actor=actor, outcome="refused", person=person_ref, data=[digest],
                              detail={"reason": exc.reason})
            if advance:
                advance()
            continue
        suffix = Path(name).suffix.lower() if Path(name).suffix.lower() in PHOTO_SUFFIXES else ".img"
        stored_name = f"{n:03d}-{digest[:12]}{suffix}"
        item = site.photos.put(person_ref, stored_name, data)
        crop = site.crops.put(person_ref, f"{n:03d}-{digest[:12]}-crop.png", _png(accepted.crop.pixels))
        n += 1
        held.add(digest)
        out.accepted.append(replace(accepted, origin=str(site.photos.root / item.item_id)))
        out.accepted_files.append(name)
        site.audit.append("photo.intake", actor=actor, person=person_ref, data=[item.digest, crop.digest],
                          detail={"flags": list(accepted.flags)})
        if advance:
            advance()
    return out


def enrolled_photos(site: Site, person_ref: str, analyzer, face_settings) -> list:
    """The person's stored photos through intake again, in enrolment order (`AcceptedPhoto`; origin: the file)."""
    from megaportrait.client.faces import intake_photo
    from megaportrait.shared.errors import PhotoRejected

    folder = site.photos.root / check_person_ref(person_ref)
    out = []
    for path in sorted(folder.glob("*")) if folder.is_dir() else []:
        try:
            out.append(intake_photo(path, analyzer, face_settings))
        except PhotoRejected:
            continue  # stored before a stricter intake setting; it is not used
    return out


def _now():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)
