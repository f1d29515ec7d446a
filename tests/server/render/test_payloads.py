"""Sealing at the site and opening on the node, without transport: every refusal and its precise reason.

The site's entry points (`seal_face_crops`, `seal_adapter`) are checked against a real ConsentLedger; the node-side
refusal tests seal with the low-level `*_unchecked` forms so that they reach the node's own checks.
"""
from __future__ import annotations

import io
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from megaportrait.client.payload import seal_face_crops, seal_face_crops_unchecked, seal_payload
from megaportrait.shared import audit, consent
from megaportrait.shared.policy import load_consent_policy
from megaportrait.server.render.payloads import Expectation, TrustedSites, open_identity, verify_envelope
from megaportrait.shared.crypto import HpkePrivateKey
from megaportrait.shared.payload_format import (
    CLASSIC_CROP_PURPOSE,
    KIND_FACE_CROPS,
    ConsentScopeRefused,
    Envelope,
    PayloadBindingMismatch,
    PayloadExpired,
    PayloadMalformed,
    PayloadTampered,
    UnknownSite,
    WrongRecipientKey,
    face_crops_from_bytes,
    face_crops_to_bytes,
)
from megaportrait.shared.records import FaceCropSet


@pytest.fixture(scope="module")
def crops(people) -> FaceCropSet:
    """Aligned crops of two real photos of one person, from the site's own intake."""
    from megaportrait.client.faces import face_crop_set, intake_photos

    return face_crop_set("person-7f3a", intake_photos(people["obama"][:2], show_progress=False))


@pytest.fixture(scope="module")
def keys():
    node = HpkePrivateKey.generate()
    site = Ed25519PrivateKey.generate()
    trusted = TrustedSites()
    trusted.add("site-a", site.public_key())
    return node, site, trusted


def _seal(crops, keys, **overrides):
    node, site, _ = keys
    kw = dict(job_id="job-1", consent_ref="consent-9", consent_scope=CLASSIC_CROP_PURPOSE, recipient=node.public_key(),
              site_id="site-a", site_key=site, backend="classic")
    kw.update(overrides)
    return seal_face_crops_unchecked(crops, **kw)


@pytest.fixture()
def ledger(tmp_path):
    """The site's real consent ledger (SQLite, shipped consent policy, its own audit log)."""
    key = audit.generate_signing_key(tmp_path / "site.key")
    log = audit.AuditLog(tmp_path / "site-audit.jsonl", key, component="site:site-a", checkpoint_every=0)
    ledger = consent.ConsentLedger(tmp_path / "consent.sqlite", site="site-a", key=key,
                                   policy=load_consent_policy(REPO / "policies" / "consent.yaml"), audit=log)  # fmt: skip
    yield ledger
    ledger.close()


REPO = Path(__file__).resolve().parents[3]


def _verify(sealed, keys, *, now=None, expect=None):
    node, _, trusted = keys
    expect = expect or Expectation(job_id="job-1", consent_ref="consent-9", backend="classic", payload_kind=KIND_FACE_CROPS)
    return verify_envelope(sealed, node_key_fingerprint=node.public_key().fingerprint(), trusted=trusted, expect=expect, now=now)


def test_crops_round_trip_in_memory(crops, keys):
    sealed = _seal(crops, keys)
    assert crops.crops[0].pixels.tobytes()[:4096] not in sealed  # the face is not in the clear
    env = _verify(sealed, keys)
    assert env.header.person_ref == "person-7f3a" and env.header.kind == KIND_FACE_CROPS
    opened = open_identity(env, keys[0])
    assert isinstance(opened, FaceCropSet) and len(opened.crops) == len(crops.crops) == 2
    for a, b in zip(opened.crops, crops.crops, strict=True):
        np.testing.assert_array_equal(a.pixels, b.pixels)
        np.testing.assert_allclose(a.face.landmarks5, b.face.landmarks5)
        np.testing.assert_allclose(a.face.mesh, b.face.mesh)
        assert a.face.quality == b.face.quality and a.source_sha256 == b.source_sha256
    np.testing.assert_allclose(opened.mean_embedding, crops.mean_embedding)


def test_sealer_refuses_crops_without_classic_crop_consent(crops, keys):
    with pytest.raises(ConsentScopeRefused, match=CLASSIC_CROP_PURPOSE):
        _seal(crops, keys, consent_scope="render")


def test_node_refuses_crops_sealed_under_another_consent_scope(crops, keys):
    """Defence in depth: a site that skips its own check still cannot get crops accepted without that consent."""
    node, site, _ = keys
    sealed = seal_payload(face_crops_to_bytes(crops), kind=KIND_FACE_CROPS, person_ref="person-7f3a", job_id="job-1",
                          consent_ref="consent-9", consent_scope="render", recipient=node.public_key(), site_id="site-a",
                          site_key=site, backend="classic")
    with pytest.raises(ConsentScopeRefused, match="render"):
        _verify(sealed, keys)


def test_tampered_ciphertext_is_refused(crops, keys):
    sealed = bytearray(_seal(crops, keys))
    sealed[-100] ^= 0x01
    with pytest.raises(PayloadTampered) as err:
        _verify(bytes(sealed), keys)
    assert err.value.reason == "ciphertext_modified"


def test_tampered_header_is_refused(crops, keys):
    sealed = _seal(crops, keys)
    forged = sealed.replace(b'"consent_scope":"' + CLASSIC_CROP_PURPOSE.encode(), b'"consent_scope":"' + b"classic_face_crop_paylaod")
    assert forged != sealed and len(forged) == len(sealed)
    with pytest.raises(PayloadTampered) as err:
        _verify(forged, keys)
    assert err.value.reason == "header_signature_invalid"


def test_wrong_recipient_key_is_refused(crops, keys):
    sealed = _seal(crops, keys, recipient=HpkePrivateKey.generate().public_key())
    with pytest.raises(WrongRecipientKey, match="reseal"):
        _verify(sealed, keys)


def test_expired_and_future_payloads_are_refused(crops, keys):
    sealed = _seal(crops, keys, ttl_s=60, now=time.time() - 120)
    with pytest.raises(PayloadExpired, match="expired 60 s ago") as err:
        _verify(sealed, keys)
    assert err.value.reason == "payload_expired"
    future = _seal(crops, keys, now=time.time() + 3600)
    with pytest.raises(PayloadExpired) as err:
        _verify(future, keys)
    assert err.value.reason == "payload_not_yet_valid"


def test_unknown_site_and_unknown_site_key_are_refused(crops, keys):
    stranger = Ed25519PrivateKey.generate()
    with pytest.raises(UnknownSite) as err:
        _verify(_seal(crops, keys, site_id="site-z", site_key=stranger), keys)
    assert err.value.reason == "unknown_site"
    with pytest.raises(UnknownSite) as err:  # a known site id with a key the node never trusted
        _verify(_seal(crops, keys, site_key=stranger), keys)
    assert err.value.reason == "unknown_site_key"


@pytest.mark.parametrize(
    ("field", "expect"),
    [
        ("job_id", Expectation(job_id="job-2", consent_ref="consent-9", backend="classic")),
        ("consent_ref", Expectation(job_id="job-1", consent_ref="consent-8", backend="classic")),
        ("backend", Expectation(job_id="job-1", consent_ref="consent-9", backend="diffusion")),
    ],
)
def test_payload_is_bound_to_job_consent_and_backend(crops, keys, field, expect):
    with pytest.raises(PayloadBindingMismatch, match=field):
        _verify(_seal(crops, keys), keys, expect=expect)


def test_payload_kind_must_suit_the_backend(crops, keys):
    expect = Expectation(job_id="job-1", consent_ref="consent-9", backend="classic", payload_kind="lora_adapter")
    with pytest.raises(PayloadBindingMismatch, match="lora_adapter"):
        _verify(_seal(crops, keys), keys, expect=expect)


def test_malformed_envelopes_are_refused(crops, keys):
    sealed = _seal(crops, keys)
    with pytest.raises(PayloadMalformed, match="magic"):
        _verify(b"PK\x03\x04" + sealed[4:], keys)
    with pytest.raises(PayloadMalformed, match="header length"):
        _verify(sealed[:4] + (10**6).to_bytes(4, "big") + sealed[8:], keys)
    env = Envelope.parse(sealed)
    spaced = env.header_bytes.replace(b",", b", ", 1)
    with pytest.raises(PayloadMalformed, match="canonical"):
        Envelope.parse(Envelope(env.header, spaced, env.signature, env.ciphertext).to_bytes())


def test_binding_is_enforced_by_decryption_too(crops, keys):
    """A header re-signed by a trusted site but changed after sealing does not decrypt (HPKE info differs)."""
    node, site, _ = keys
    env = Envelope.parse(_seal(crops, keys))
    doc = {**env.header.__dict__, "person_ref": "person-other"}
    from megaportrait.shared.crypto import sign
    from megaportrait.shared.payload_format import SIGNATURE_DOMAIN, PayloadHeader

    header = PayloadHeader(**doc)
    hb = header.to_bytes()
    resigned = Envelope(header, hb, sign(site, SIGNATURE_DOMAIN, hb), env.ciphertext).to_bytes()
    with pytest.raises(PayloadTampered) as err:
        open_identity(_verify(resigned, keys), node)
    assert err.value.reason == "decryption_failed"


def test_crop_decoder_refuses_pickled_objects(crops, keys):
    with np.load(io.BytesIO(face_crops_to_bytes(crops)), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["mean_embedding"] = np.array([{"evil": 1}], dtype=object)  # np.savez pickles object arrays
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with pytest.raises(PayloadMalformed, match="pickle"):
        face_crops_from_bytes(buf.getvalue())
    node, site, _ = keys
    # the same bytes sealed by a trusted site are refused when opened, not unpickled
    sealed = seal_payload(buf.getvalue(), kind=KIND_FACE_CROPS, person_ref="person-7f3a", job_id="job-1", consent_ref="consent-9",
                          consent_scope=CLASSIC_CROP_PURPOSE, recipient=node.public_key(), site_id="site-a", site_key=site, backend="classic")
    with pytest.raises(PayloadMalformed):
        open_identity(_verify(sealed, keys), node)


def test_header_carries_no_personal_data(crops, keys):
    header = Envelope.parse(_seal(crops, keys)).header_bytes
    assert b"obama" not in header.lower() and b".jpg" not in header


def test_adapter_round_trip_for_the_diffusion_backend(keys, ledger):
    """A LoRA adapter (the diffusion backend's payload) is sealed via shared.adapters and opened intact."""
    torch = pytest.importorskip("torch")
    from datetime import datetime, timezone

    from megaportrait.client.payload import seal_adapter
    from megaportrait.shared.payload_format import KIND_LORA_ADAPTER
    from megaportrait.shared.records import BaseModelRef, IdentityAdapter, PrivacyReport

    gen = torch.Generator().manual_seed(0)
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    adapter = IdentityAdapter(
        person_ref="person-7f3a", token="sks", rank=4, alpha=4.0, target_modules=("to_q",),
        lora_state={f"{prefix}.lora_A.weight": torch.randn(4, 32, generator=gen), f"{prefix}.lora_B.weight": torch.randn(32, 4, generator=gen)},
        base_model=BaseModelRef(name="tiny", sha256="0" * 64, kind="tiny-embedded"),
        privacy=PrivacyReport(epsilon=3.2, delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.0, steps=30, sample_rate=0.5, accountant="rdp"),
        photo_sha256=("a" * 64,), created_at=datetime(2026, 11, 25, tzinfo=timezone.utc),
    )
    node, site, _ = keys
    receipt = ledger.grant("person-7f3a", ["render"], granted_by="subject", actor="operator:1")
    sealed = seal_adapter(adapter, ledger=ledger, job_id="job-1", recipient=node.public_key(), site_id="site-a", site_key=site)
    assert Envelope.parse(sealed).header.consent_scope == "render"
    env = _verify(sealed, keys, expect=Expectation(job_id="job-1", consent_ref=receipt.receipt_id, backend="diffusion", payload_kind=KIND_LORA_ADAPTER))
    opened = open_identity(env, node)
    assert isinstance(opened, IdentityAdapter) and opened.privacy == adapter.privacy and opened.base_model == adapter.base_model
    for name, tensor in adapter.lora_state.items():
        assert torch.equal(opened.lora_state[name], tensor)
    with pytest.raises(PayloadBindingMismatch, match="face_crops"):
        _verify(sealed, keys, expect=Expectation(job_id="job-1", consent_ref=receipt.receipt_id, backend="diffusion", payload_kind=KIND_FACE_CROPS))
    # the node takes adapters only under the render purpose, whatever a site that skipped its check put in the header
    from megaportrait.client.payload import seal_adapter_unchecked

    other = seal_adapter_unchecked(adapter, job_id="job-1", consent_ref="consent-9", consent_scope="personal_adapter",
                                   recipient=node.public_key(), site_id="site-a", site_key=site)
    with pytest.raises(ConsentScopeRefused, match="only under 'render'"):
        _verify(other, keys, expect=Expectation(job_id="job-1", consent_ref="consent-9", backend="diffusion", payload_kind=KIND_LORA_ADAPTER))


# ------------------------------------------------------------------------------------------- the site's consent gate


def _seal_checked(crops, keys, ledger, **kw):
    node, site, _ = keys
    args = dict(ledger=ledger, job_id="job-1", recipient=node.public_key(), site_id="site-a", site_key=site)
    args.update(kw)
    return seal_face_crops(crops, **args)


def _refusals(ledger) -> list[tuple[str, str]]:
    return [(e.detail["purpose"], e.detail["reason"]) for e in audit.read_entries(ledger.audit.path)
            if e.action == "consent.check" and e.outcome == "refused"]  # fmt: skip


def test_site_seals_crops_only_with_consent_and_binds_the_receipt(crops, keys, ledger):
    with pytest.raises(consent.ConsentMissing):
        _seal_checked(crops, keys, ledger)
    # render alone does not let the crops themselves leave the site
    ledger.grant("person-7f3a", ["render"], granted_by="subject", actor="operator:1")
    with pytest.raises(consent.ConsentMissing) as err:
        _seal_checked(crops, keys, ledger)
    assert err.value.purpose == CLASSIC_CROP_PURPOSE
    receipt = ledger.grant("person-7f3a", [CLASSIC_CROP_PURPOSE, "render"], granted_by="subject", actor="operator:1")
    sealed = _seal_checked(crops, keys, ledger)
    header = Envelope.parse(sealed).header
    assert (header.consent_ref, header.consent_scope) == (receipt.receipt_id, CLASSIC_CROP_PURPOSE)
    env = _verify(sealed, keys, expect=Expectation(job_id="job-1", consent_ref=receipt.receipt_id, backend="classic", payload_kind=KIND_FACE_CROPS))
    assert isinstance(open_identity(env, keys[0]), FaceCropSet)
    assert _refusals(ledger) == [(CLASSIC_CROP_PURPOSE, "consent_missing")] * 2
    ok = [e for e in audit.read_entries(ledger.audit.path) if e.action == "consent.check" and e.outcome == "ok"]
    assert ok[-1].data == (receipt.receipt_id,) and ok[-1].person == "person-7f3a"


def test_site_refuses_to_seal_after_expiry(crops, keys, ledger):
    granted = datetime.now(timezone.utc) - timedelta(days=2)
    ledger.grant("person-7f3a", [CLASSIC_CROP_PURPOSE, "render"], granted_by="subject", actor="operator:1", at=granted,
                 expires_at=granted + timedelta(days=1))  # fmt: skip
    with pytest.raises(consent.ConsentExpired):
        _seal_checked(crops, keys, ledger)
    # a sealing time inside the receipt's window does not help: consent is checked at the real time (or later)
    with pytest.raises(consent.ConsentExpired):
        _seal_checked(crops, keys, ledger, now=(granted + timedelta(hours=12)).timestamp())
    assert _refusals(ledger) == [(CLASSIC_CROP_PURPOSE, "consent_expired")] * 2


def test_payload_never_outlives_its_consent(crops, keys, ledger):
    now = datetime.now(timezone.utc)
    receipt = ledger.grant("person-7f3a", [CLASSIC_CROP_PURPOSE, "render"], granted_by="subject", actor="operator:1", at=now,
                           expires_at=now + timedelta(seconds=600))  # fmt: skip
    header = Envelope.parse(_seal_checked(crops, keys, ledger, ttl_s=3600, now=now.timestamp())).header
    assert header.expires_at == int(receipt.expires_at.timestamp()) and header.expires_at - header.issued_at <= 600


def test_site_refuses_to_seal_after_revocation(crops, keys, ledger):
    ledger.grant("person-7f3a", [CLASSIC_CROP_PURPOSE, "render"], granted_by="subject", actor="operator:1")
    assert _seal_checked(crops, keys, ledger)
    ledger.revoke("person-7f3a", by="subject")
    with pytest.raises(consent.ConsentRevoked):
        _seal_checked(crops, keys, ledger, job_id="job-2")
    with pytest.raises(consent.ConsentRevoked):  # not even by claiming a sealing time before the revocation
        _seal_checked(crops, keys, ledger, job_id="job-2", now=time.time() - 3600)
    assert _refusals(ledger) == [(CLASSIC_CROP_PURPOSE, "consent_revoked")] * 2
