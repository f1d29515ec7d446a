"""Seal an identity payload for a render node: HPKE to the node's key, signed with the site's Ed25519 key.

The site sends only what the chosen backend needs: a LoRA adapter for `diffusion`, aligned face crops and their
landmarks for `classic` (and crops only under consent for `CLASSIC_CROP_PURPOSE`). The format is described in
`megaportrait.shared.payload_format`.

`seal_face_crops` and `seal_adapter` are the site's entry points: each checks the person's consent in the site's
`ConsentLedger` first (purpose `classic_face_crop_payload` or `render`) and binds the receipt's id into the signed
header as `consent_ref`. The `*_unchecked` variants and `seal_payload` take a consent reference as given: for
tests and for callers that ran the check themselves.
"""
from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from megaportrait.shared.consent import RENDER_PURPOSE, ConsentExpired, ConsentLedger, ConsentReceipt
from megaportrait.shared.crypto import HPKE_SUITE_NAME, HpkePublicKey, ed25519_fingerprint, hpke_seal, sign
from megaportrait.shared.logs import short_hash
from megaportrait.shared.payload_format import (
    CLASSIC_CROP_PURPOSE,
    FORMAT_VERSION,
    KIND_FACE_CROPS,
    KIND_LORA_ADAPTER,
    SIGNATURE_DOMAIN,
    ConsentScopeRefused,
    Envelope,
    PayloadHeader,
    face_crops_to_bytes,
)
from megaportrait.shared.records import FaceCropSet, IdentityAdapter, sha256_hex

log = logging.getLogger("megaportrait.client.payload")

DEFAULT_TTL_S = 3600


def seal_face_crops(
    crop_set: FaceCropSet,
    *,
    ledger: ConsentLedger,
    job_id: str,
    recipient: HpkePublicKey,
    site_id: str,
    site_key: Ed25519PrivateKey,
    backend: str = "classic",
    ttl_s: int = DEFAULT_TTL_S,
    now: float | None = None,
    actor: str = "site",
) -> bytes:
    """Seal a person's face crops for the classic backend, after checking their consent.

    `ledger.require(person_ref, "classic_face_crop_payload")` must pass (that purpose needs `render` too): it
    raises ConsentMissing / ConsentExpired / ConsentRevoked, audited by the ledger. The receipt's id becomes the
    payload's `consent_ref`, and the payload expires no later than the receipt.
    """
    receipt = _require(ledger, crop_set.person_ref, CLASSIC_CROP_PURPOSE, now, actor)
    return seal_face_crops_unchecked(
        crop_set, job_id=job_id, consent_ref=receipt.receipt_id, consent_scope=CLASSIC_CROP_PURPOSE, recipient=recipient,
        site_id=site_id, site_key=site_key, backend=backend, ttl_s=_ttl_within(receipt, ttl_s, now), now=now,
    )


def seal_adapter(
    adapter: IdentityAdapter,
    *,
    ledger: ConsentLedger,
    job_id: str,
    recipient: HpkePublicKey,
    site_id: str,
    site_key: Ed25519PrivateKey,
    backend: str = "diffusion",
    ttl_s: int = DEFAULT_TTL_S,
    now: float | None = None,
    actor: str = "site",
) -> bytes:
    """Seal a person's Identity Net LoRA adapter for the diffusion backend, after checking their `render` consent.

    As `seal_face_crops`: the receipt's id becomes `consent_ref` and the payload expires no later than the receipt.
    """
    receipt = _require(ledger, adapter.person_ref, RENDER_PURPOSE, now, actor)
    return seal_adapter_unchecked(
        adapter, job_id=job_id, consent_ref=receipt.receipt_id, consent_scope=RENDER_PURPOSE, recipient=recipient,
        site_id=site_id, site_key=site_key, backend=backend, ttl_s=_ttl_within(receipt, ttl_s, now), now=now,
    )


def _require(ledger: ConsentLedger, person_ref: str, purpose: str, now: float | None, actor: str) -> ConsentReceipt:
    """The receipt allowing `purpose` at the sealing time; never earlier than the real time, so a `now` in the past
    cannot reach back before a revocation or expiry."""
    at = datetime.fromtimestamp(max(time.time(), now or 0.0), timezone.utc)
    return ledger.require(person_ref, purpose, at, actor=actor)


def _ttl_within(receipt: ConsentReceipt, ttl_s: int, now: float | None) -> int:
    """`ttl_s`, shortened so that the payload does not outlive the consent it was sealed under."""
    issued = int(time.time() if now is None else now)
    left = int(receipt.expires_at.timestamp()) - issued  # whole seconds, rounded down
    if left < 1:
        at = datetime.fromtimestamp(issued, timezone.utc)
        raise ConsentExpired(receipt.person_ref, ",".join(receipt.purposes), at, receipt.expires_at)
    if ttl_s > left:
        log.info("payload lifetime shortened from %d s to %d s: the consent receipt expires then", ttl_s, left)
    return min(ttl_s, left)


def seal_face_crops_unchecked(
    crop_set: FaceCropSet,
    *,
    job_id: str,
    consent_ref: str,
    consent_scope: str,
    recipient: HpkePublicKey,
    site_id: str,
    site_key: Ed25519PrivateKey,
    backend: str = "classic",
    ttl_s: int = DEFAULT_TTL_S,
    now: float | None = None,
) -> bytes:
    """Low level (tests, and callers that checked consent themselves): seal crops under the consent reference given.

    Still refuses (ConsentScopeRefused) unless `consent_scope` is `CLASSIC_CROP_PURPOSE`: crops are the person's face
    itself, so they leave the site only with consent for exactly that purpose.
    """
    if consent_scope != CLASSIC_CROP_PURPOSE:
        raise ConsentScopeRefused(
            f"face crops may leave the site only under consent scope {CLASSIC_CROP_PURPOSE!r}; got {consent_scope!r}. "
            "Record that consent for the person, or use the diffusion backend with an adapter."
        )
    if not crop_set.crops:
        raise ValueError("the crop set holds no crops")
    return seal_payload(
        face_crops_to_bytes(crop_set),
        kind=KIND_FACE_CROPS,
        person_ref=crop_set.person_ref,
        job_id=job_id,
        consent_ref=consent_ref,
        consent_scope=consent_scope,
        recipient=recipient,
        site_id=site_id,
        site_key=site_key,
        backend=backend,
        ttl_s=ttl_s,
        now=now,
    )


def seal_adapter_unchecked(
    adapter: IdentityAdapter,
    *,
    job_id: str,
    consent_ref: str,
    consent_scope: str,
    recipient: HpkePublicKey,
    site_id: str,
    site_key: Ed25519PrivateKey,
    backend: str = "diffusion",
    ttl_s: int = DEFAULT_TTL_S,
    now: float | None = None,
) -> bytes:
    """Low level (tests, and callers that checked consent themselves): seal an adapter under the consent reference given."""
    from megaportrait.shared.adapters import adapter_to_bytes

    return seal_payload(
        adapter_to_bytes(adapter),
        kind=KIND_LORA_ADAPTER,
        person_ref=adapter.person_ref,
        job_id=job_id,
        consent_ref=consent_ref,
        consent_scope=consent_scope,
        recipient=recipient,
        site_id=site_id,
        site_key=site_key,
        backend=backend,
        ttl_s=ttl_s,
        now=now,
    )


def seal_payload(
    plaintext: bytes,
    *,
    kind: str,
    person_ref: str,
    job_id: str,
    consent_ref: str,
    consent_scope: str,
    recipient: HpkePublicKey,
    site_id: str,
    site_key: Ed25519PrivateKey,
    backend: str,
    ttl_s: int = DEFAULT_TTL_S,
    now: float | None = None,
) -> bytes:
    """Seal already-encoded plaintext of `kind`; returns the envelope bytes. Prefer `seal_face_crops`/`seal_adapter`."""
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    issued = int(time.time() if now is None else now)
    header = PayloadHeader(
        version=FORMAT_VERSION,
        suite=HPKE_SUITE_NAME,
        kind=kind,
        backend=backend,
        job_id=job_id,
        consent_ref=consent_ref,
        consent_scope=consent_scope,
        person_ref=person_ref,
        site_id=site_id,
        site_key=ed25519_fingerprint(site_key),
        recipient=recipient.fingerprint(),
        issued_at=issued,
        expires_at=issued + int(ttl_s),
        nonce=os.urandom(16).hex(),
    )
    header.validate()
    ciphertext = hpke_seal(plaintext, recipient, header.binding_bytes())
    header = PayloadHeader(**{**header.__dict__, "ciphertext_sha256": sha256_hex(ciphertext)})
    header_bytes = header.to_bytes()
    envelope = Envelope(header=header, header_bytes=header_bytes, signature=sign(site_key, SIGNATURE_DOMAIN, header_bytes), ciphertext=ciphertext)
    sealed = envelope.to_bytes()
    log.info("sealed %s payload for job %s (person %s, %d bytes)", kind, short_hash(job_id), short_hash(person_ref), len(sealed))
    return sealed
