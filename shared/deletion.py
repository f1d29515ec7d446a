"""The render node's signed deletion statement: one format, written by the node and checked by the site.

The node signs ``DELETION_DOMAIN NUL statement`` (Ed25519, `shared.crypto.sign`) where the statement is canonical
JSON::

    {"type": DELETION_DOMAIN, "node_id": ..., "deleted_at": ISO-8601 UTC, "reason": ..., "person_ref": ... | null,
     "jobs": [{"job_id", "payload_sha256", "result_sha256", "data_key_destroyed"}, ...]}

`DeletionConfirmation` carries the signed bytes (what travels over gRPC and is stored by the site) and reads the
statement's fields on demand. Whether a confirmation is acceptable for a revocation (right person, fresh, every key
destroyed) is the site's decision: `shared.consent.verify_deletion_confirmation`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from typing import Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .crypto import canonical_json, ed25519_fingerprint, sign, verify
from .errors import MegaPortraitError

DELETION_DOMAIN = "megaportrait/render-deletion/v1"
"""Signature domain and statement `type` of render-node deletion statements."""


class DeletionSignatureInvalid(MegaPortraitError):
    """A deletion statement's signature does not verify with the node key it is checked against."""

    reason = "deletion_signature_invalid"


@dataclass(frozen=True)
class DeletionConfirmation:
    """A node-signed statement that these jobs' data keys and data were destroyed.

    `statement` is the canonical JSON that was signed, `signature` the raw Ed25519 signature. The other properties
    are read from the statement (they are only meaningful once `verify` passed).
    """

    statement: bytes
    signature: bytes
    signer_fingerprint: str = ""
    job_ids: tuple[str, ...] = ()

    @cached_property
    def body(self) -> dict:
        body = json.loads(self.statement)
        if not isinstance(body, dict):
            raise ValueError("deletion statement is not a JSON object")
        return body

    @property
    def node(self) -> str:
        return str(self.body["node_id"])

    @property
    def person_ref(self) -> str | None:
        return self.body.get("person_ref")

    @property
    def reason(self) -> str:
        return str(self.body.get("reason", ""))

    @property
    def at(self) -> datetime:
        t = datetime.fromisoformat(self.body["deleted_at"])
        return t if t.tzinfo else t.replace(tzinfo=timezone.utc)

    @property
    def jobs(self) -> list[dict]:
        return list(self.body["jobs"])

    @property
    def deleted(self) -> tuple[str, ...]:
        """Payload and result hashes of the destroyed jobs, sorted."""
        return tuple(sorted(h for j in self.jobs for h in (j["payload_sha256"], j["result_sha256"]) if h))

    @property
    def keys_destroyed(self) -> int:
        return sum(bool(j["data_key_destroyed"]) for j in self.jobs)

    @property
    def all_gone(self) -> bool:
        return all(bool(j["data_key_destroyed"]) for j in self.jobs)

    def verify(self, node_signing_key: Ed25519PublicKey) -> dict:
        """The statement as a dict when the node's signature verifies over it; DeletionSignatureInvalid otherwise."""
        if not verify(node_signing_key, DELETION_DOMAIN, self.statement, self.signature):
            raise DeletionSignatureInvalid("deletion confirmation signature does not verify with this node key")
        if self.body.get("type") != DELETION_DOMAIN:
            raise DeletionSignatureInvalid(f"signed statement has type {self.body.get('type')!r}, not {DELETION_DOMAIN!r}")
        return self.body

    def to_json(self) -> dict:
        """What the site stores: the signed bytes, re-checkable later with the node's public key alone."""
        return {"statement": self.statement.decode(), "signature": self.signature.hex()}

    @classmethod
    def from_raw(cls, raw: object, node_signing_key: Ed25519PublicKey | None = None) -> "DeletionConfirmation":
        """From a gRPC message, a stored dict/JSON text (`to_json`), or anything with `statement` and `signature`.

        `job_ids` are read from the statement; `signer_fingerprint` is that of `node_signing_key` when given.
        """
        if isinstance(raw, (str, bytes)):
            raw = json.loads(raw)
        if isinstance(raw, dict):
            statement, signature = raw["statement"], raw["signature"]
        else:
            statement, signature = raw.statement, raw.signature  # type: ignore[attr-defined]
        statement = statement.encode() if isinstance(statement, str) else bytes(statement)
        signature = bytes.fromhex(signature) if isinstance(signature, str) else bytes(signature)
        conf = cls(statement, signature)
        try:
            job_ids = tuple(str(j["job_id"]) for j in conf.jobs)
        except (ValueError, KeyError, TypeError):
            job_ids = ()  # malformed: `verify` or the site's checks say so
        fp = ed25519_fingerprint(node_signing_key) if node_signing_key is not None else ""
        return cls(statement, signature, fp, job_ids)


def sign_deletion(
    key: Ed25519PrivateKey, *, node_id: str, reason: str, person_ref: str | None, jobs: Iterable[dict], at: datetime | None = None
) -> DeletionConfirmation:
    """The node's signed statement about `jobs` (dicts with job_id, payload_sha256, result_sha256, data_key_destroyed)."""
    jobs = [
        {"job_id": j["job_id"], "payload_sha256": j["payload_sha256"], "result_sha256": j["result_sha256"],
         "data_key_destroyed": bool(j["data_key_destroyed"])}
        for j in jobs
    ]  # fmt: skip
    statement = canonical_json({
        "type": DELETION_DOMAIN, "node_id": node_id,
        "deleted_at": (at or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
        "reason": reason, "person_ref": person_ref, "jobs": jobs,
    })  # fmt: skip
    return DeletionConfirmation(
        statement=statement, signature=sign(key, DELETION_DOMAIN, statement), signer_fingerprint=ed25519_fingerprint(key),
        job_ids=tuple(j["job_id"] for j in jobs),
    )


def verify_deletion(confirmation: DeletionConfirmation, node_signing_key: Ed25519PublicKey) -> dict:
    """The statement as a dict when the node's signature verifies over it; raises DeletionSignatureInvalid otherwise."""
    return confirmation.verify(node_signing_key)
