"""The simulated customer sites: each is a `client.site.Site` (key, audit log, consent ledger, per-person stores)
laid out under the run's folder, and its people are enrolled through the site's own consent capture and intake
(`client.consent_capture`, `client.enrolment`). The demo adds one store, the consented photos staged for the
federation's simulated clients; revocation deletes through it with the site's own stores.
"""
from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .roster import PersonPlan, Roster
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


@dataclass
class Site:
    """One simulated customer site: the site itself (`client.site.Site`, its stores, ledger and log) and the demo's
    people there."""

    site: object  # client.site.Site
    people: list[PersonState] = field(default_factory=list)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["site"], name)

    @property
    def federation_inputs(self):
        """The demo's staging store of consented photos for the simulated Flower clients."""
        return self.site.extra[0]

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


def make_site(site_id: str, root: Path, federation_inputs: Path, federation_state: Path) -> Site:
    """A fresh site under `root` (`client.site.open_site_at`): signing key, audit log, consent ledger and empty
    stores under `root/stores/`; its crop cache is the federation's state folder for the site."""
    from megaportrait.client.site import SiteLayout, open_site_at

    stores = root / "stores"
    layout = SiteLayout(root=root, photos=stores / "photos", crops=stores / "crops", adapters=stores / "adapters",
                        portraits=stores / "outputs", payloads=stores / "payloads",
                        crop_cache=federation_state / site_id, jobs=root / "render_jobs.sqlite",
                        key=root / "keys" / "site.key", audit_log=root / "audit.jsonl", ledger=root / "consent.sqlite",
                        consent_policy=consent_policy_path(),
                        extra_stores=(("federation_inputs", federation_inputs / site_id, "source_photos"),))
    return Site(open_site_at(site_id, layout, create_key=True))


def enrol(site: Site, plan: PersonPlan, analyzer, face_settings) -> PersonState:
    """Record the person's consent and enrol their uploads (`client.consent_capture`, `client.enrolment`): accepted
    photos with their crops, refusals with their reasons. Every step is in the site's audit log."""
    from megaportrait.client.consent_capture import grant_consent
    from megaportrait.client.enrolment import enrol_photos

    person = PersonState(plan=plan, ref=f"p-{secrets.token_hex(8)}")
    receipt = grant_consent(site.site, person.ref, list(plan.purposes), granted_by="subject", actor=ACTOR)
    person.receipt_id = receipt.receipt_id
    notes = {u.path.name: u.note for u in plan.uploads}
    done = enrol_photos(site.site, person.ref, [(u.path.name, u.path.read_bytes()) for u in plan.uploads],
                        analyzer, face_settings, actor=ACTOR)
    person.accepted, person.accepted_files = done.accepted, done.accepted_files
    person.flags = {f: list(a.flags) for f, a in zip(done.accepted_files, done.accepted) if a.flags}
    person.rejected = [Rejection(r.file, r.reason, r.detail, notes.get(r.file, "")) for r in done.refused]
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
