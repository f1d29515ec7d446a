"""Recording and reading a person's consent at the site: purposes checked against the consent policy by name,
receipts signed by the site and every step audited (by `shared.consent.ConsentLedger`)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from megaportrait.shared.consent import ConsentInvalid

from .site import Site

_SAFE_REF = "letters, digits, '.', '_' and '-' (a pseudonymous reference, never a name)"


def check_person_ref(person_ref: str) -> str:
    """`person_ref`, or ConsentInvalid when it cannot name a folder (1-128 of [A-Za-z0-9._-], not starting '.')."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", person_ref or ""):
        raise ConsentInvalid(f"person ref {person_ref!r} is not valid: use {_SAFE_REF}")
    return person_ref


def check_purposes(site: Site, purposes: list[str]) -> list[str]:
    """The purposes, each known to the consent policy; ConsentInvalid naming the valid ones otherwise."""
    known = list(site.ledger.policy.purposes)
    wanted = [p.strip() for item in purposes for p in item.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in known]
    if not wanted or unknown:
        what = f"unknown purpose(s) {', '.join(unknown)}" if unknown else "no purpose given"
        raise ConsentInvalid(f"{what}; the consent policy {site.ledger.policy.path} allows: {', '.join(known)}")
    return wanted


def grant_consent(site: Site, person_ref: str, purposes: list[str], *, granted_by: str = "subject",
                  expires_at: datetime | None = None, actor: str = "operator:cli"):
    """Record a signed consent receipt for `purposes` (checked against the policy); returns the receipt."""
    check_person_ref(person_ref)
    return site.ledger.grant(person_ref, check_purposes(site, purposes), granted_by=granted_by, actor=actor,
                             expires_at=expires_at)


@dataclass(frozen=True)
class ConsentLine:
    """One receipt as staff see it: its purposes, who granted it, until when, and its state now."""

    receipt_id: str
    purposes: tuple[str, ...]
    granted_by: str
    granted_at: datetime
    expires_at: datetime
    state: str  # active | expired | revoked
    revoked_at: datetime | None


def consent_of(site: Site, person_ref: str, now: datetime | None = None) -> list[ConsentLine]:
    """Every receipt of the person (signature-checked), oldest first, with its state at `now`."""
    now = now or datetime.now(timezone.utc)
    out = []
    for r, revoked in site.ledger.receipts(person_ref):
        state = "revoked" if revoked and revoked <= now else "expired" if now >= r.expires_at else "active"
        out.append(ConsentLine(r.receipt_id, tuple(r.purposes), r.granted_by, r.granted_at, r.expires_at, state,
                               revoked))
    return out


def active_purposes(site: Site, person_ref: str, now: datetime | None = None) -> list[str]:
    """The purposes the person's active receipts cover now."""
    return sorted({p for line in consent_of(site, person_ref, now) if line.state == "active" for p in line.purposes})
