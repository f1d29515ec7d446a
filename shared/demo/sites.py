"""The simulated customer sites: keys, audit log, consent ledger, per-person stores, and photo intake.

Each site has its own Ed25519 key (signs consent receipts, sealed payloads and its audit log), its own consent
ledger and audit log, and file stores per data kind (`shared.retention.FileStore`, person folders named by the
pseudonymous person_ref): uploaded photos, face crops, personal adapters, collected portraits, plus the two derived
stores the federation reads (the consented photos it trains on, and Flower's crop cache). Revocation deletes through
all of them.
"""
from __future__ import annotations

import hashlib
import io
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from megaportrait.shared.retention import FileStore

from .roster import PHOTO_SUFFIXES, PersonPlan, Roster
from .settings import DemoError

log = logging.getLogger("megaportrait.demo")

ACTOR = "operator:demo"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Rejection:
    """An upload intake refused: the file's name as uploaded, the reason code and the detail."""

    file: str
    reason: str
    detail: str
    note: str = ""


@dataclass
class PersonState:
    """A person at a site after intake. accepted: `client.faces.AcceptedPhoto` in upload order (crops 256 px)."""

    plan: PersonPlan
    ref: str
    accepted: list = field(default_factory=list)
    accepted_files: list[str] = field(default_factory=list)
    flags: dict[str, list[str]] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)
    receipt_id: str = ""

    @property
    def name(self) -> str:
        return self.plan.name

    def may(self, purpose: str) -> bool:
        return purpose in self.plan.purposes


class NamedFileStore(FileStore):
    """A FileStore reported under its own name, for a second store of one data kind (revocation keys by name)."""

    def __init__(self, root: Path, kind: str, name: str) -> None:
        super().__init__(root, kind)
        self.name = name


class CropCacheStore:
    """The federation's crop cache (`client.federation.load_site_crops` writes crops-*.npz per site): one file for
    all people of a site, so deleting a person deletes the whole cache file (the next round rebuilds it from the
    photos still consented)."""

    name = "federation_crop_cache"

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)

    def _holding(self, person_ref: str) -> list[Path]:
        out = []
        for path in sorted(self.state_dir.glob("crops-*.npz")):
            with np.load(path) as z:
                if person_ref in set(z["person"].tolist()):
                    out.append(path)
        return out

    def delete_person(self, person_ref: str) -> list[str]:
        gone = []
        for path in self._holding(person_ref):
            gone.append(hashlib.sha256(path.read_bytes()).hexdigest())
            path.unlink()
        return gone

    def find_person(self, person_ref: str) -> list[str]:
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in self._holding(person_ref)]


@dataclass
class Site:
    """One customer site and everything it holds."""

    site_id: str
    root: Path
    key: object  # Ed25519PrivateKey
    audit: object  # AuditLog
    ledger: object  # ConsentLedger
    photos: FileStore
    crops: FileStore
    adapters: FileStore
    outputs: FileStore
    federation_inputs: NamedFileStore
    crop_cache: CropCacheStore
    people: list[PersonState] = field(default_factory=list)

    @property
    def key_path(self) -> Path:
        return self.root / "keys" / "site.key"

    @property
    def stores(self) -> list:
        return [self.photos, self.crops, self.adapters, self.outputs, self.federation_inputs, self.crop_cache]

    def person(self, name: str) -> PersonState:
        for p in self.people:
            if p.name == name:
                return p
        raise KeyError(name)


def consent_policy_path() -> Path:
    """policies/consent.yaml of this checkout."""
    path = REPO_ROOT / "policies" / "consent.yaml"
    if not path.is_file():
        raise DemoError(f"consent policy {path} not found: run the demo from a source checkout")
    return path


def consent_policy():
    """The project's consent policy (policies/consent.yaml in the repository)."""
    from megaportrait.shared.policy import load_consent_policy

    return load_consent_policy(consent_policy_path())


def _store_name(index: int, path: Path, data: bytes) -> str:
    suffix = path.suffix.lower() if path.suffix.lower() in PHOTO_SUFFIXES else ".bin"
    return f"{index:02d}-{hashlib.sha256(data).hexdigest()[:12]}{suffix}"


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def make_site(site_id: str, root: Path, federation_inputs: Path, federation_state: Path) -> Site:
    """A fresh site under `root`: signing key, audit log, consent ledger and empty stores."""
    from megaportrait.shared.audit import AuditLog, generate_signing_key
    from megaportrait.shared.consent import ConsentLedger

    root.mkdir(parents=True, exist_ok=True)
    key = generate_signing_key(root / "keys" / "site.key")
    audit = AuditLog(root / "audit.jsonl", key, component=f"site:{site_id}", checkpoint_every=100)
    ledger = ConsentLedger(root / "consent.sqlite", site=site_id, key=key, policy=consent_policy(), audit=audit)
    return Site(site_id=site_id, root=root, key=key, audit=audit, ledger=ledger,
                photos=FileStore(root / "stores" / "photos", "source_photos"),
                crops=FileStore(root / "stores" / "crops", "face_crops"),
                adapters=FileStore(root / "stores" / "adapters", "personal_adapters"),
                outputs=FileStore(root / "stores" / "outputs", "outputs"),
                federation_inputs=NamedFileStore(federation_inputs / site_id, "source_photos", "federation_inputs"),
                crop_cache=CropCacheStore(federation_state / site_id))


def enrol(site: Site, plan: PersonPlan, analyzer, face_settings) -> PersonState:
    """Record the person's consent, store their uploads, and run intake: accepted photos (with crops, kept in the
    crop store) and refusals with their reasons. Every step is in the site's audit log."""
    from megaportrait.client.faces import intake_photo
    from megaportrait.shared.errors import PhotoRejected

    person = PersonState(plan=plan, ref=f"p-{secrets.token_hex(8)}")
    receipt = site.ledger.grant(person.ref, plan.purposes, granted_by="subject", actor=ACTOR)
    person.receipt_id = receipt.receipt_id
    for i, upload in enumerate(plan.uploads):
        data = upload.path.read_bytes()
        item = site.photos.put(person.ref, _store_name(i, upload.path, data), data)
        stored = site.photos.root / item.item_id
        try:
            accepted = intake_photo(stored, analyzer, face_settings)
        except PhotoRejected as exc:
            person.rejected.append(Rejection(upload.path.name, exc.reason, exc.detail, upload.note))
            site.audit.append("photo.intake", actor=ACTOR, outcome="refused", person=person.ref, data=[item.digest],
                              detail={"reason": exc.reason})
            continue
        person.accepted.append(accepted)
        person.accepted_files.append(upload.path.name)
        if accepted.flags:
            person.flags[upload.path.name] = list(accepted.flags)
        crop = site.crops.put(person.ref, f"{i:02d}-crop.png", _png(accepted.crop.pixels))
        site.audit.append("photo.intake", actor=ACTOR, person=person.ref, data=[item.digest, crop.digest],
                          detail={"flags": list(accepted.flags)})
    return person


def prepare_sites(roster: Roster, work: Path, analyzer, *, advance: Callable[[int], None] | None = None) -> list[Site]:
    """Every site of the roster, its people enrolled (consent, uploads, intake). `advance(n)`: n uploads done."""
    from megaportrait.shared.config import FaceSettings

    face_settings = FaceSettings()
    sites = []
    for site_id in roster.sites:
        site = make_site(site_id, work / "sites" / site_id, work / "federation" / "inputs",
                         work / "federation" / "site-state")
        for plan in roster.at(site_id):
            site.people.append(enrol(site, plan, analyzer, face_settings))
            if advance:
                advance(len(plan.uploads))
        sites.append(site)
    return sites


def stage_federation_inputs(site: Site) -> list[PersonState]:
    """Copy the accepted photos of the people whose consent covers federated training (checked now, audited) into
    the folder the site's Flower client reads; returns those people."""
    eligible = set(site.ledger.eligible([p.ref for p in site.people], "federated_training", actor=ACTOR))
    staged = []
    for person in site.people:
        if person.ref not in eligible or not person.accepted:
            continue
        for i, accepted in enumerate(person.accepted):
            src = Path(accepted.origin)
            site.federation_inputs.put(person.ref, f"{i:02d}{src.suffix.lower()}", src.read_bytes())
        staged.append(person)
    return staged
