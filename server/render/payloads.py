"""Check and open sealed identity payloads on the render node, in memory only.

`verify_envelope` runs every check that needs no decryption, in an order that gives the most precise refusal:
layout -> trusted site -> signature -> recipient key -> expiry -> binding to the request -> consent scope (face
crops only under `classic_face_crop_payload`, adapters only under `render`) -> ciphertext hash.
`open_identity` then decrypts with the node's HPKE key and decodes the plaintext into a record. Nothing here
writes to disk. Replay is the job store's check (it needs the consumed-nonce table).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from megaportrait.shared.consent import RENDER_PURPOSE
from megaportrait.shared.crypto import (
    HPKE_SUITE_NAME,
    DecryptionFailed,
    HpkePrivateKey,
    KeyFileError,
    ed25519_fingerprint,
    ed25519_public_pem,
    hpke_open,
    load_ed25519_public,
    verify,
)
from megaportrait.shared.logs import short_hash
from megaportrait.shared.payload_format import (
    CLASSIC_CROP_PURPOSE,
    KIND_FACE_CROPS,
    KIND_LORA_ADAPTER,
    SIGNATURE_DOMAIN,
    ConsentScopeRefused,
    Envelope,
    PayloadBindingMismatch,
    PayloadExpired,
    PayloadMalformed,
    PayloadTampered,
    UnknownSite,
    WrongRecipientKey,
    face_crops_from_bytes,
    valid_id,
)
from megaportrait.shared.records import IdentityPayload, sha256_hex

log = logging.getLogger("megaportrait.render.payloads")

CLOCK_SKEW_S = 300
"""How far in the future a payload's issue time may lie (site and node clocks differ a little)."""


@dataclass
class TrustedSites:
    """site id -> the Ed25519 public keys the node accepts payload signatures from.

    On disk: ``<dir>/<site_id>/<key fingerprint>.pem``, written by `add` (`megaportrait render-node trust-site`).
    """

    keys: dict[str, dict[str, Ed25519PublicKey]] = field(default_factory=dict)

    def add(self, site_id: str, key: Ed25519PublicKey, directory: str | Path | None = None) -> str:
        """Trust `key` for `site_id` (and persist it under `directory` when given); returns its fingerprint."""
        if not valid_id(site_id):
            raise ValueError(f"site id {site_id!r} must be 1-128 chars of [A-Za-z0-9._:-]")
        fp = ed25519_fingerprint(key)
        self.keys.setdefault(site_id, {})[fp] = key
        if directory is not None:
            path = Path(directory) / site_id / f"{fp}.pem"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{fp}.pem.tmp")  # a running node never sees a half-written key (it reads *.pem)
            tmp.write_bytes(ed25519_public_pem(key))
            os.replace(tmp, path)
        return fp

    def lookup(self, site_id: str, fingerprint: str) -> Ed25519PublicKey:
        """The trusted key, or UnknownSite naming whether the site or only this key is unknown."""
        site = self.keys.get(site_id)
        if site is None:
            raise UnknownSite(f"site {site_id!r} is not trusted by this node; register its key with `render-node trust-site`")
        key = site.get(fingerprint)
        if key is None:
            raise UnknownSite(
                f"site {site_id!r} signed with key {fingerprint[:16]}..., which is not among its {len(site)} trusted key(s)",
                reason="unknown_site_key",
            )
        return key

    @classmethod
    def load(cls, directory: str | Path) -> "TrustedSites":
        sites = cls()
        directory = Path(directory)
        if not directory.is_dir():
            return sites
        for site_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
            for pem in sorted(site_dir.glob("*.pem")):
                key = load_ed25519_public(pem)
                if ed25519_fingerprint(key) != pem.stem:
                    raise KeyFileError(f"{pem}: file name is not the fingerprint of the key it holds")
                sites.keys.setdefault(site_dir.name, {})[pem.stem] = key
        return sites


@dataclass(frozen=True)
class Expectation:
    """What the submit request says the payload is for; the sealed header must agree."""

    job_id: str
    consent_ref: str
    backend: str
    payload_kind: str | None = None


def verify_envelope(
    sealed: bytes,
    *,
    node_key_fingerprint: str,
    trusted: TrustedSites,
    expect: Expectation,
    now: float | None = None,
) -> Envelope:
    """Parse `sealed` and run every check short of decryption; returns the envelope or raises the precise refusal."""
    env = Envelope.parse(sealed)
    h = env.header
    if h.suite != HPKE_SUITE_NAME:
        raise PayloadMalformed(f"payload suite {h.suite!r} is not supported (this node uses {HPKE_SUITE_NAME})")
    site_key = trusted.lookup(h.site_id, h.site_key)
    if not verify(site_key, SIGNATURE_DOMAIN, env.header_bytes, env.signature):
        raise PayloadTampered(
            f"signature of site {h.site_id!r} does not verify over the payload header: the header was modified",
            reason="header_signature_invalid",
        )
    if h.recipient != node_key_fingerprint:
        raise WrongRecipientKey(
            f"payload is sealed to node key {h.recipient[:16]}..., this node's key is {node_key_fingerprint[:16]}...; "
            "reseal it to this node's public key (GetNodeInfo / node_public.json)"
        )
    now = time.time() if now is None else now
    if now >= h.expires_at:
        raise PayloadExpired(f"payload expired {int(now - h.expires_at)} s ago (expires_at {h.expires_at}); seal a new one")
    if h.issued_at > now + CLOCK_SKEW_S:
        raise PayloadExpired(f"payload issued {int(h.issued_at - now)} s in the future; check the site's clock", reason="payload_not_yet_valid")
    for name, want in (("job_id", expect.job_id), ("consent_ref", expect.consent_ref), ("backend", expect.backend)):
        got = getattr(h, name)
        if got != want:
            raise PayloadBindingMismatch(f"payload is sealed for {name} {got!r} but the request names {want!r}")
    if expect.payload_kind is not None and h.kind != expect.payload_kind:
        raise PayloadBindingMismatch(f"backend {expect.backend!r} takes {expect.payload_kind!r} payloads, this one is {h.kind!r}")
    if h.kind == KIND_FACE_CROPS and h.consent_scope != CLASSIC_CROP_PURPOSE:
        raise ConsentScopeRefused(
            f"face crops arrived under consent scope {h.consent_scope!r}; the node accepts them only under {CLASSIC_CROP_PURPOSE!r}"
        )
    if h.kind == KIND_LORA_ADAPTER and h.consent_scope != RENDER_PURPOSE:
        raise ConsentScopeRefused(
            f"an adapter arrived under consent scope {h.consent_scope!r}; the node accepts adapters only under {RENDER_PURPOSE!r}"
        )
    if sha256_hex(env.ciphertext) != h.ciphertext_sha256:
        raise PayloadTampered("ciphertext does not match the signed hash: it was modified", reason="ciphertext_modified")
    return env


def open_identity(env: Envelope, node_key: HpkePrivateKey) -> IdentityPayload:
    """Decrypt a verified envelope in memory and decode its record (`FaceCropSet` or `IdentityAdapter`)."""
    try:
        plaintext = hpke_open(env.ciphertext, node_key, env.header.binding_bytes())
    except DecryptionFailed as exc:
        raise PayloadTampered(
            "HPKE decryption failed although signature and hash verify: the site sealed with a context this node "
            "does not reproduce, or to a different key with a forged fingerprint",
            reason="decryption_failed",
        ) from exc
    kind = env.header.kind
    if kind == KIND_FACE_CROPS:
        identity: IdentityPayload = face_crops_from_bytes(plaintext)
    elif kind == KIND_LORA_ADAPTER:
        from megaportrait.shared.adapters import adapter_from_bytes

        try:
            identity = adapter_from_bytes(plaintext)
        except PayloadMalformed:
            raise
        except Exception as exc:  # the adapter codec's own errors: report them as a malformed payload
            raise PayloadMalformed(f"adapter payload cannot be decoded: {type(exc).__name__}: {exc}") from exc
    else:  # unreachable: the header validator admits only known kinds
        raise PayloadMalformed(f"unknown payload kind {kind!r}")
    del plaintext
    if identity.person_ref != env.header.person_ref:
        raise PayloadMalformed("the payload's person_ref differs from the one in its signed header")
    log.info("opened %s payload for job %s in memory", kind, short_hash(env.header.job_id))
    return identity
