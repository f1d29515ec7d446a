"""What a render sends, built from the site's stores: the person's face crops (classic backend) or their personal
adapter (diffusion backend), and the held-out photos the site scores the portrait against. Also the template check:
a template must show one face the site's analyzer can find."""
from __future__ import annotations

from typing import Any

from .render_requests import RenderRefused
from .site import Site


def check_template(data: bytes, name: str, face_settings: Any):
    """The site's face analyzer, after checking that the template shows a face (RenderRefused otherwise)."""
    from megaportrait.shared.errors import PhotoRejected
    from megaportrait.shared.face_analysis import FaceAnalyzer
    from megaportrait.shared.imaging import load_image

    analyzer = FaceAnalyzer(face_settings)
    try:
        image = load_image(data, origin=name, max_pixels=face_settings.max_image_pixels)
    except PhotoRejected as exc:
        raise RenderRefused(f"template {name}: {exc.reason}: {exc.detail}; give a PNG or JPEG portrait",
                            reason="invalid_template") from None
    if not analyzer.detect(image, min_score=face_settings.min_detector_score):
        raise RenderRefused(f"template {name} has no face the site can find: choose a portrait template with one "
                            "clear, front-facing face", reason="template_no_face")
    return analyzer


def person_photos(site: Site, person_ref: str, analyzer: Any, face_settings: Any) -> list:
    """The person's enrolled photos through intake (`AcceptedPhoto`), or RenderRefused naming the fix."""
    from .enrolment import enrolled_photos

    photos = enrolled_photos(site, person_ref, analyzer, face_settings)
    if not photos:
        raise RenderRefused(f"{person_ref} has no usable enrolled photo at this site: enrol some first "
                            f"(`megaportrait client enrol {person_ref} PHOTO...`)", reason="no_photos")
    return photos


def classic_payload(person_ref: str, photos: list):
    """The classic backend's payload: the first usable photo's crop and embedding (the rest stay held out)."""
    from megaportrait.shared.face_analysis import mean_embedding
    from megaportrait.shared.records import FaceCropSet

    first = photos[0]
    return FaceCropSet(person_ref=person_ref, crops=(first.crop,), mean_embedding=mean_embedding([first.face.embedding]),
                       embedder=first.face.embedder)


def latest_adapter(site: Site, person_ref: str):
    """The person's newest personal adapter from the site's adapter store (one format, `shared.adapters`)."""
    from megaportrait.shared.adapters import AdapterError, adapter_from_bytes

    items = sorted((i for i in site.adapters.list("personal_adapters") if i.person_ref == person_ref),
                   key=lambda i: i.created_at)
    if not items:
        raise RenderRefused(f"{person_ref} has no personal adapter at this site: the diffusion backend needs one "
                            "(`megaportrait client personalise`)", reason="no_adapter")
    try:
        return adapter_from_bytes(site.adapters.read(items[-1]))
    except AdapterError as exc:
        raise RenderRefused(f"{person_ref}'s adapter {items[-1].item_id}: {exc}; personalise again",
                            reason="adapter_unreadable") from None


def payload_and_held_out(site: Site, person_ref: str, backend: str, photos: list) -> tuple[Any, list]:
    """(what to seal for `backend`, embeddings of photos the payload does not carry)."""
    if backend == "classic":
        return classic_payload(person_ref, photos), [p.face.embedding for p in photos[1:]]
    adapter = latest_adapter(site, person_ref)
    used = set(adapter.photo_sha256)
    return adapter, [p.face.embedding for p in photos if p.image_sha256 not in used]
