"""Consent: signed receipts held at the site, checked by every job and training round, and revocation end to end.

A `ConsentReceipt` says which purposes (from policies/consent.yaml) a person granted, who granted them, and until
when; the site signs it with its Ed25519 key. The `ConsentLedger` (SQLite at the site) grants, revokes and checks
receipts; `require` raises `ConsentMissing`, `ConsentExpired` or `ConsentRevoked` and audits every answer.

`revoke_person` is the revocation flow: revoke the receipts (the person drops out of the next round), delete the
person's data at the site through the registered stores and check it is gone, ask the render node to delete its
payloads and outputs (it destroys their per-job keys) and verify the node's signed deletion statement
(`shared.deletion`, the one format node and site share).

Jobs: the site's sealing functions (`client.payload.seal_face_crops` / `seal_adapter`) call
`require(person_ref, purpose)` and name the receipt in the payload's signed header (`consent_ref = receipt.receipt_id`);
`client.identity.train_identity_adapter` requires `personal_adapter`. The purposes the code checks are the
`*_PURPOSE` constants below; `check_policy_purposes` refuses a consent policy that lacks one. The render node never
sees the ledger: it checks the payload's consent scope, and refuses payloads of a person sealed before that person's
data was deleted there. Where a receipt itself is handed over (`ConsentReceipt.to_token()`), `check_receipt`
verifies it with the site's public key alone.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Protocol, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .audit import AuditLog, canonical_json, key_id, load_public_key
from .deletion import DELETION_DOMAIN, DeletionConfirmation, DeletionSignatureInvalid
from .errors import MegaPortraitError
from .payload_format import CLASSIC_CROP_PURPOSE  # face crops themselves may leave the site only under this purpose
from .policy import ConsentPolicy, PolicyError

RENDER_PURPOSE = "render"
"""Consent purpose checked before a payload is sealed for the render node (and the node's scope for adapters)."""
PERSONAL_ADAPTER_PURPOSE = "personal_adapter"
"""Consent purpose checked before a per-person Identity Net adapter is trained."""
FEDERATED_TRAINING_PURPOSE = "federated_training"
"""Consent purpose checked before a person's photos take part in a federated round."""
CODE_PURPOSES = (PERSONAL_ADAPTER_PURPOSE, FEDERATED_TRAINING_PURPOSE, RENDER_PURPOSE, CLASSIC_CROP_PURPOSE)
"""The purposes the code checks; `check_policy_purposes` refuses a consent policy that lacks one."""

_RECEIPT_DOMAIN = b"megaportrait-consent-receipt-v1\n"
CLOCK_SKEW = timedelta(minutes=5)
"""How far a render node's clock may lag the site's when it dates a deletion statement (dated to the second)."""


# --- errors -------------------------------------------------------------------------------------------------------


class ConsentError(MegaPortraitError):
    """Base of every consent refusal; `person`, `purpose` and `at` say which check failed."""

    reason = "consent"

    def __init__(self, person: str, purpose: str, at: datetime, message: str) -> None:
        super().__init__(f"person {person}: {purpose}: {message}")
        self.person, self.purpose, self.at = person, purpose, at


class ConsentMissing(ConsentError):
    reason = "consent_missing"

    def __init__(self, person: str, purpose: str, at: datetime) -> None:
        super().__init__(person, purpose, at, f"no consent on record at {at.isoformat()}; record a signed grant first")


class ConsentExpired(ConsentError):
    reason = "consent_expired"

    def __init__(self, person: str, purpose: str, at: datetime, expired_at: datetime | None = None) -> None:
        when = f" (expired {expired_at.isoformat()})" if expired_at else ""
        super().__init__(person, purpose, at, f"consent had expired at {at.isoformat()}{when}; ask the person to renew it")
        self.expired_at = expired_at


class ConsentRevoked(ConsentError):
    reason = "consent_revoked"

    def __init__(self, person: str, purpose: str, at: datetime, revoked_at: datetime | None = None) -> None:
        when = f" at {revoked_at.isoformat()}" if revoked_at else ""
        super().__init__(person, purpose, at, f"consent was revoked{when}; nothing may be done with this person's data")
        self.revoked_at = revoked_at


class ConsentInvalid(MegaPortraitError):
    """A grant request breaks the policy, or a stored receipt / confirmation fails its signature check."""

    reason = "consent_invalid"


class RevocationIncomplete(MegaPortraitError):
    """Revocation could not finish; `pending` names the steps still owed (retry with `retry_pending_revocations`)."""

    reason = "revocation_incomplete"

    def __init__(self, person: str, pending: Sequence[str], result: "RevocationResult") -> None:
        super().__init__(f"person {person}: revocation incomplete, still pending: {', '.join(pending)}")
        self.person, self.pending, self.result = person, tuple(pending), result


def check_policy_purposes(policy: ConsentPolicy, purposes: Iterable[str] = CODE_PURPOSES) -> None:
    """Raise PolicyError (naming the policy file) when it does not define every purpose the code checks."""
    missing = [p for p in purposes if p not in policy.purposes]
    if missing:
        raise PolicyError(policy.path, None, f"purposes {', '.join(missing)} are checked by the code but not defined in this policy")


# --- records ------------------------------------------------------------------------------------------------------


def _utc(t: datetime | None) -> datetime:
    if t is None:
        return datetime.now(timezone.utc)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class ConsentReceipt:
    """A site-signed record that `person_ref` granted `purposes` (by `granted_by`) from `granted_at` to `expires_at`.

    `policy_hash` is the consent policy version it was granted under; `site` and `key_id` name the signer.
    """

    receipt_id: str
    person_ref: str
    purposes: tuple[str, ...]
    granted_by: str
    granted_at: datetime
    expires_at: datetime
    policy_hash: str
    site: str
    key_id: str
    signature: str = ""

    def _body(self) -> dict:
        return {
            "receipt_id": self.receipt_id, "person_ref": self.person_ref, "purposes": sorted(self.purposes),
            "granted_by": self.granted_by, "granted_at": self.granted_at.isoformat(),
            "expires_at": self.expires_at.isoformat(), "policy_hash": self.policy_hash, "site": self.site,
            "key_id": self.key_id,
        }  # fmt: skip

    def signed_bytes(self) -> bytes:
        return _RECEIPT_DOMAIN + canonical_json(self._body())

    def signed(self, key: Ed25519PrivateKey) -> "ConsentReceipt":
        return replace(self, signature=key.sign(self.signed_bytes()).hex())

    def signature_valid(self, public_key: Ed25519PublicKey) -> bool:
        try:
            public_key.verify(bytes.fromhex(self.signature), self.signed_bytes())
            return True
        except (InvalidSignature, ValueError):
            return False

    def to_json(self) -> dict:
        return {**self._body(), "signature": self.signature}

    def to_token(self) -> str:
        """The receipt as one JSON string, e.g. a `RenderJob.consent_ref`."""
        return canonical_json(self.to_json()).decode()

    @classmethod
    def from_json(cls, obj: dict | str) -> "ConsentReceipt":
        if isinstance(obj, str):
            obj = json.loads(obj)
        return cls(
            receipt_id=obj["receipt_id"], person_ref=obj["person_ref"], purposes=tuple(obj["purposes"]),
            granted_by=obj["granted_by"], granted_at=datetime.fromisoformat(obj["granted_at"]),
            expires_at=datetime.fromisoformat(obj["expires_at"]), policy_hash=obj["policy_hash"], site=obj["site"],
            key_id=obj["key_id"], signature=obj.get("signature", ""),
        )  # fmt: skip

    def covers(self, purpose: str) -> bool:
        return purpose in self.purposes


def check_receipt(
    receipt: ConsentReceipt,
    purpose: str,
    site_public_key: Ed25519PublicKey | str,
    *,
    at: datetime | None = None,
    revoked_persons: Iterable[str] = (),
) -> None:
    """The render node's check of a receipt it was handed: signature, purpose, validity window, known revocations."""
    at = _utc(at)
    if not receipt.signature_valid(load_public_key(site_public_key)):
        raise ConsentInvalid(f"receipt {receipt.receipt_id}: signature does not verify with the site's public key")
    if receipt.person_ref in set(revoked_persons):
        raise ConsentRevoked(receipt.person_ref, purpose, at)
    if not receipt.covers(purpose) or at < receipt.granted_at:
        raise ConsentMissing(receipt.person_ref, purpose, at)
    if at >= receipt.expires_at:
        raise ConsentExpired(receipt.person_ref, purpose, at, receipt.expires_at)


RENDER_DELETION_DOMAIN = DELETION_DOMAIN
"""Kept for callers of the old name: the one domain lives in `shared.deletion`."""


def verify_deletion_confirmation(
    raw: object, node_public_key: Ed25519PublicKey | str | Path, *, person_ref: str, not_before: datetime
) -> DeletionConfirmation:
    """Check a render node's deletion statement and return it; raise ConsentInvalid if it proves nothing.

    `raw` is the node's `DeletionConfirmation`, its gRPC message, or a stored `to_json()` dict. It must be signed by
    the node's key (domain-separated), be about `person_ref`, be dated no earlier than the request (less
    `CLOCK_SKEW`), and say every job's data key was destroyed.
    """
    pub = load_public_key(node_public_key)
    try:
        conf = DeletionConfirmation.from_raw(raw, pub)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConsentInvalid(f"render node deletion statement is unreadable: {exc}") from None
    try:
        conf.verify(pub)
    except DeletionSignatureInvalid:
        raise ConsentInvalid("render node deletion statement: signature does not verify with the node's key") from None
    except ValueError as exc:
        raise ConsentInvalid(f"render node deletion statement is malformed: {exc}") from None
    try:
        about, at, all_gone, node = conf.person_ref, conf.at, conf.all_gone, conf.node
        conf.deleted  # noqa: B018 - reads every job's hashes: a malformed job entry is refused here
    except (ValueError, KeyError, TypeError) as exc:
        raise ConsentInvalid(f"render node deletion statement is malformed: {exc}") from None
    if about != person_ref:
        raise ConsentInvalid(f"deletion statement is for person {about}, not {person_ref}")
    if at < not_before - CLOCK_SKEW:
        raise ConsentInvalid(f"deletion statement dated {at.isoformat()} predates the request: replayed?")
    if not all_gone:
        raise ConsentInvalid(f"render node {node} did not destroy every data key of person {person_ref}")
    return conf


class RenderNodeDeleter(Protocol):
    """What the site needs from the render node (`RenderNode` or its gRPC client): delete one person's data and
    return the node's signed statement (anything with `statement` and `signature` bytes)."""

    def delete_person(self, person_ref: str) -> object: ...


class PersonDataStore(Protocol):
    """A site store holding per-person data (photos, crops, adapters). `name` is its data kind."""

    name: str

    def delete_person(self, person_ref: str) -> list[str]:
        """Delete everything for the person; return hashes of what was deleted."""
        ...

    def find_person(self, person_ref: str) -> list[str]:
        """Hashes of anything still readable for the person (empty when all gone)."""
        ...


# --- the ledger ---------------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    receipt_id TEXT PRIMARY KEY, person_ref TEXT NOT NULL, granted_at TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS receipts_person ON receipts(person_ref);
CREATE TABLE IF NOT EXISTS revocations (
    receipt_id TEXT PRIMARY KEY REFERENCES receipts(receipt_id), revoked_at TEXT NOT NULL, revoked_by TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS render_deletions (
    person_ref TEXT PRIMARY KEY, requested_at TEXT NOT NULL, confirmed_at TEXT, confirmation TEXT);
"""


class ConsentLedger:
    """The site's consent registry: signed receipts in SQLite, every decision audited.

    `site` names this site (it goes into receipts); `key` is the site's Ed25519 key; `policy` the loaded consent
    policy; `audit` the site's audit log.
    """

    def __init__(self, path: str | Path, *, site: str, key: Ed25519PrivateKey, policy: ConsentPolicy, audit: AuditLog) -> None:
        self.path = Path(path)
        self.site, self.policy, self.audit = site, policy, audit
        self._key = key
        self.public_key = key.public_key()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # one connection, shared by the component's threads
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _db_exec(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # grants ----------------------------------------------------------------------------------------------------

    def grant(
        self,
        person_ref: str,
        purposes: Sequence[str],
        *,
        granted_by: str,
        actor: str,
        at: datetime | None = None,
        expires_at: datetime | None = None,
    ) -> ConsentReceipt:
        """Record a grant; refused (ConsentInvalid, audited) if the policy does not allow it as asked.

        `expires_at` defaults to the shortest `max_validity` among the purposes; a later date is refused.
        """
        at = _utc(at)
        purposes = tuple(sorted(set(purposes)))
        try:
            if not purposes:
                raise ConsentInvalid("a grant needs at least one purpose")
            rules = {p: self.policy.purpose(p) for p in purposes}
            for p, rule in rules.items():
                if granted_by not in rule.granted_by:
                    raise ConsentInvalid(f"purpose {p!r} may be granted by {', '.join(rule.granted_by)}, not {granted_by!r}")
                missing = [r for r in rule.requires if r not in purposes]
                if missing:
                    raise ConsentInvalid(f"purpose {p!r} also needs consent to {', '.join(missing)} in the same grant")
            longest = at + min(rule.max_validity for rule in rules.values())
            expires = _utc(expires_at) if expires_at else longest
            if expires > longest:
                raise ConsentInvalid(f"expiry {expires.isoformat()} is beyond the policy's limit {longest.isoformat()}")
            if expires <= at:
                raise ConsentInvalid("expiry must be after the grant time")
        except MegaPortraitError as exc:
            self.audit.append("consent.grant", actor=actor, outcome="refused", person=person_ref,
                              policy=self.policy.version_hash, detail={"purposes": list(purposes), "reason": str(exc)})  # fmt: skip
            raise
        receipt = ConsentReceipt(
            receipt_id=uuid.uuid4().hex, person_ref=person_ref, purposes=purposes, granted_by=granted_by, granted_at=at,
            expires_at=expires, policy_hash=self.policy.version_hash, site=self.site, key_id=key_id(self._key),
        ).signed(self._key)  # fmt: skip
        self._db_exec(
            "INSERT INTO receipts (receipt_id, person_ref, granted_at, body) VALUES (?, ?, ?, ?)",
            (receipt.receipt_id, person_ref, at.isoformat(), json.dumps(receipt.to_json())),
        )
        self.audit.append("consent.grant", actor=actor, person=person_ref, data=[receipt.receipt_id], policy=self.policy.version_hash,
                          detail={"purposes": list(purposes), "granted_by": granted_by, "expires_at": expires.isoformat()})  # fmt: skip
        return receipt

    def receipts(self, person_ref: str) -> list[tuple[ConsentReceipt, datetime | None]]:
        """All of a person's receipts (signature-checked, oldest first) with their revocation time or None."""
        rows = self._db_exec(
            "SELECT r.body, v.revoked_at FROM receipts r LEFT JOIN revocations v USING (receipt_id) "
            "WHERE r.person_ref = ? ORDER BY r.granted_at", (person_ref,))  # fmt: skip
        out = []
        for body, revoked_at in rows:
            receipt = ConsentReceipt.from_json(body)
            if not receipt.signature_valid(self.public_key) or receipt.person_ref != person_ref:
                raise ConsentInvalid(f"stored receipt {receipt.receipt_id} fails its signature check: the ledger was edited")
            out.append((receipt, datetime.fromisoformat(revoked_at) if revoked_at else None))
        return out

    # checks ----------------------------------------------------------------------------------------------------

    def _decide(self, person_ref: str, purpose: str, at: datetime) -> ConsentReceipt:
        self.policy.purpose(purpose)
        covering = [(r, rev) for r, rev in self.receipts(person_ref) if r.covers(purpose) and r.granted_at <= at]
        for r, rev in reversed(covering):
            if (rev is None or rev > at) and at < r.expires_at:
                return r
        if not covering:
            raise ConsentMissing(person_ref, purpose, at)
        latest, revoked_at = covering[-1]
        if revoked_at is not None and revoked_at <= at:
            raise ConsentRevoked(person_ref, purpose, at, revoked_at)
        raise ConsentExpired(person_ref, purpose, at, latest.expires_at)

    def require(self, person_ref: str, purpose: str, at: datetime | None = None, *, actor: str = "system") -> ConsentReceipt:
        """The receipt that allows `purpose` for the person at `at` (and every purpose it requires), or raise.

        Raises ConsentMissing / ConsentExpired / ConsentRevoked; audits the answer either way.
        """
        at = _utc(at)
        try:
            receipt = self._decide(person_ref, purpose, at)
            for needed in self.policy.purpose(purpose).requires:
                self._decide(person_ref, needed, at)
        except (ConsentError, ConsentInvalid) as exc:
            self.audit.append("consent.check", actor=actor, outcome="refused", person=person_ref, policy=self.policy.version_hash,
                              detail={"purpose": purpose, "at": at.isoformat(), "reason": exc.reason})  # fmt: skip
            raise
        self.audit.append("consent.check", actor=actor, person=person_ref, data=[receipt.receipt_id], policy=self.policy.version_hash,
                          detail={"purpose": purpose, "at": at.isoformat()})  # fmt: skip
        return receipt

    def eligible(self, person_refs: Iterable[str], purpose: str, at: datetime | None = None, *, actor: str = "system") -> list[str]:
        """The persons who may take part in `purpose` now (e.g. a training round); the rest are audited as refused."""
        out = []
        for ref in person_refs:
            try:
                self.require(ref, purpose, at, actor=actor)
                out.append(ref)
            except ConsentError:
                continue
        return out

    # revocation ------------------------------------------------------------------------------------------------

    def revoke(self, person_ref: str, *, by: str, at: datetime | None = None) -> list[ConsentReceipt]:
        """Revoke every active receipt of the person (all purposes); returns those revoked."""
        at = _utc(at)
        revoked = []
        for receipt, revoked_at in self.receipts(person_ref):
            if revoked_at is None:
                self._db_exec("INSERT INTO revocations (receipt_id, revoked_at, revoked_by) VALUES (?, ?, ?)",
                                 (receipt.receipt_id, at.isoformat(), by))  # fmt: skip
                revoked.append(receipt)
        self.audit.append("consent.revoke", actor=by, person=person_ref, data=[r.receipt_id for r in revoked],
                          policy=self.policy.version_hash, detail={"receipts": len(revoked)})  # fmt: skip
        return revoked

    def receipt_ends(self) -> list[tuple[str, str, datetime]]:
        """(receipt_id, person_ref, end) of every receipt; end: its expiry, or its revocation when that came first."""
        rows = self._db_exec("SELECT r.receipt_id, r.person_ref, r.body, v.revoked_at FROM receipts r LEFT JOIN revocations v USING (receipt_id)")
        out = []
        for receipt_id, person_ref, body, revoked_at in rows:
            ended = ConsentReceipt.from_json(body).expires_at
            if revoked_at:
                ended = min(ended, datetime.fromisoformat(revoked_at))
            out.append((receipt_id, person_ref, ended))
        return out

    def delete_receipt(self, receipt_id: str) -> None:
        """Delete one receipt and its revocation, in one transaction; not audited (the caller audits it)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute("DELETE FROM revocations WHERE receipt_id = ?", (receipt_id,))
                self._conn.execute("DELETE FROM receipts WHERE receipt_id = ?", (receipt_id,))
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def has_receipt(self, receipt_id: str) -> bool:
        """True while the ledger still holds the receipt (or its revocation)."""
        return bool(self._db_exec("SELECT 1 FROM receipts WHERE receipt_id = ? UNION ALL "
                                  "SELECT 1 FROM revocations WHERE receipt_id = ?", (receipt_id, receipt_id)))

    def purge_receipts(self, now: datetime | None = None, *, actor: str = "retention") -> list[str]:
        """Delete receipts that ended (expired or revoked) longer ago than `site_retention_of_receipts`; audited.
        (The site's retention sweeper, `client.retention`, deletes them through `receipt_ends`/`delete_receipt`.)"""
        now = _utc(now)
        keep = self.policy.rules.site_retention_of_receipts
        gone = []
        for receipt_id, person_ref, ended in self.receipt_ends():
            if now - ended >= keep:
                self.delete_receipt(receipt_id)
                self.audit.append("retention.delete", actor=actor, person=person_ref, data=[receipt_id], policy=self.policy.version_hash,
                                  detail={"kind": "consent_receipt", "ended": ended.isoformat()})  # fmt: skip
                gone.append(receipt_id)
        return gone

    def is_revoked(self, person_ref: str) -> bool:
        """True when the person has receipts and none of them is unrevoked."""
        rows = self.receipts(person_ref)
        return bool(rows) and all(rev is not None for _, rev in rows)

    def _render_requested(self, person_ref: str, at: datetime) -> None:
        self._db_exec(
            "INSERT INTO render_deletions (person_ref, requested_at) VALUES (?, ?) "
            "ON CONFLICT(person_ref) DO UPDATE SET requested_at = excluded.requested_at, confirmed_at = NULL, confirmation = NULL",
            (person_ref, at.isoformat()))  # fmt: skip

    def _render_confirmed(self, conf: DeletionConfirmation) -> None:
        self._db_exec("UPDATE render_deletions SET confirmed_at = ?, confirmation = ? WHERE person_ref = ?",
                         (conf.at.isoformat(), json.dumps(conf.to_json()), conf.person_ref))  # fmt: skip

    def pending_render_deletions(self) -> list[tuple[str, datetime]]:
        """Persons whose render-node deletion has been asked for but not yet confirmed."""
        rows = self._db_exec("SELECT person_ref, requested_at FROM render_deletions WHERE confirmed_at IS NULL")
        return [(p, datetime.fromisoformat(t)) for p, t in rows]

    def render_confirmation(self, person_ref: str, node_public_key: Ed25519PublicKey | str | Path) -> DeletionConfirmation | None:
        """The stored, re-verified render-node statement for the person, or None if none was received."""
        rows = self._db_exec("SELECT requested_at, confirmation FROM render_deletions WHERE person_ref = ?", (person_ref,))
        row = rows[0] if rows else None
        if not row or not row[1]:
            return None
        return verify_deletion_confirmation(row[1], node_public_key, person_ref=person_ref, not_before=datetime.fromisoformat(row[0]))


@dataclass(frozen=True)
class RevocationResult:
    """What revocation did: receipts revoked, site data deleted per store, and the render node's confirmation."""

    person_ref: str
    receipts_revoked: tuple[str, ...]
    site_deleted: dict[str, tuple[str, ...]] = field(default_factory=dict)
    render_confirmation: DeletionConfirmation | None = None
    pending: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.pending and self.render_confirmation is not None


def _confirm_render_deletion(
    ledger: ConsentLedger, person_ref: str, render_node: RenderNodeDeleter, node_key: Ed25519PublicKey | str | Path,
    requested_at: datetime, by: str,
) -> DeletionConfirmation:  # fmt: skip
    audit, policy = ledger.audit, ledger.policy.version_hash
    try:
        conf = verify_deletion_confirmation(render_node.delete_person(person_ref), node_key, person_ref=person_ref, not_before=requested_at)
    except Exception as exc:
        audit.append("revocation.render_delete", actor=by, outcome="failed", person=person_ref, policy=policy,
                     detail={"error": type(exc).__name__, "reason": str(exc)[:200]})  # fmt: skip
        raise
    ledger._render_confirmed(conf)
    audit.append("revocation.render_delete", actor=by, person=person_ref, data=list(conf.deleted), policy=policy,
                 detail={"node": conf.node, "jobs": len(conf.job_ids), "keys_destroyed": conf.keys_destroyed,
                         "confirmed_at": conf.at.isoformat()})  # fmt: skip
    return conf


def revoke_person(
    person_ref: str,
    *,
    ledger: ConsentLedger,
    by: str,
    site_stores: Sequence[PersonDataStore] = (),
    render_node: RenderNodeDeleter | None = None,
    render_node_key: Ed25519PublicKey | str | Path | None = None,
    at: datetime | None = None,
) -> RevocationResult:
    """Withdraw a person's consent everywhere.

    1. revoke their receipts (every later `require` and training round refuses them);
    2. delete their data in each site store and check that nothing can be read back;
    3. ask the render node to delete (crypto-shred) their payloads and outputs and verify its signed confirmation.

    Every step is audited. Raises RevocationIncomplete (after doing every step it can) when site data is still
    readable or the render node did not confirm; `retry_pending_revocations` finishes the render-node part later.
    """
    at = _utc(at)
    audit, policy = ledger.audit, ledger.policy.version_hash
    revoked = tuple(r.receipt_id for r in ledger.revoke(person_ref, by=by, at=at))
    pending: list[str] = []
    site_deleted: dict[str, tuple[str, ...]] = {}
    for store in site_stores:
        try:
            deleted = tuple(store.delete_person(person_ref))
            left = store.find_person(person_ref)
        except Exception as exc:
            audit.append("revocation.site_delete", actor=by, outcome="failed", person=person_ref, policy=policy,
                         detail={"store": store.name, "error": type(exc).__name__})  # fmt: skip
            pending.append(f"site store {store.name}")
            continue
        site_deleted[store.name] = deleted
        audit.append("revocation.site_delete", actor=by, outcome="failed" if left else "ok", person=person_ref,
                     data=list(deleted), policy=policy, detail={"store": store.name, "still_readable": len(left)})  # fmt: skip
        if left:
            pending.append(f"site store {store.name} ({len(left)} items still readable)")
    conf = None
    if render_node is not None:
        if render_node_key is None:
            raise ValueError("render_node_key is needed to verify the render node's confirmation")
        ledger._render_requested(person_ref, at)
        try:
            conf = _confirm_render_deletion(ledger, person_ref, render_node, render_node_key, at, by)
        except Exception:  # noqa: BLE001 - audited in _confirm_render_deletion; owed step is recorded in the ledger
            pending.append("render node confirmation")
    result = RevocationResult(person_ref, revoked, site_deleted, conf, tuple(pending))
    if pending:
        raise RevocationIncomplete(person_ref, pending, result)
    return result


def retry_pending_revocations(
    ledger: ConsentLedger, render_node: RenderNodeDeleter, render_node_key: Ed25519PublicKey | str | Path, *, by: str = "system"
) -> dict[str, DeletionConfirmation | Exception]:
    """Ask the render node again for every unconfirmed deletion; returns each person's confirmation or error."""
    out: dict[str, DeletionConfirmation | Exception] = {}
    for person_ref, requested_at in ledger.pending_render_deletions():
        try:
            out[person_ref] = _confirm_render_deletion(ledger, person_ref, render_node, render_node_key, requested_at, by)
        except Exception as exc:  # noqa: BLE001 - reported per person, audited
            out[person_ref] = exc
    return out
