"""Consent: jobs refused without consent or after expiry; grants held to the policy; revocation end to end.

The end-to-end revocation test uses real site files (the shared photos) and the real render node
(server/render/node.py: `RenderNode.delete_person`, its SQLite job store with per-job data keys, its signed
deletion statement).
"""
from __future__ import annotations

import io
import json
import os
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image

from megaportrait.shared import audit, consent
from megaportrait.shared.policy import load_consent_policy
from megaportrait.shared.retention import FileStore

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 1, 9, 0, tzinfo=timezone.utc)


@pytest.fixture()
def site(tmp_path):
    key = audit.generate_signing_key(tmp_path / "site.key")
    log = audit.AuditLog(tmp_path / "site-audit.jsonl", key, component="site:alpha", checkpoint_every=0)
    ledger = consent.ConsentLedger(tmp_path / "consent.sqlite", site="alpha", key=key,
                                   policy=load_consent_policy(REPO / "policies" / "consent.yaml"), audit=log)  # fmt: skip
    yield ledger
    ledger.close()


def _actions(ledger: consent.ConsentLedger) -> list[tuple[str, str, str]]:
    return [(e.action, e.person, e.outcome) for e in audit.read_entries(ledger.audit.path)]


def test_job_refused_without_consent(site):
    with pytest.raises(consent.ConsentMissing) as info:
        site.require("person-obama", "render", T0, actor="operator:1")
    err = info.value
    assert (err.person, err.purpose, err.at) == ("person-obama", "render", T0)
    assert err.reason == "consent_missing"
    # Consent to another purpose does not stand in for this one.
    site.grant("person-obama", ["personal_adapter"], granted_by="subject", actor="operator:1", at=T0)
    with pytest.raises(consent.ConsentMissing):
        site.require("person-obama", "render", T0 + timedelta(minutes=1))
    entry = list(audit.read_entries(site.audit.path))[-1]
    assert (entry.action, entry.outcome, entry.detail["purpose"], entry.detail["reason"]) == ("consent.check", "refused", "render", "consent_missing")
    assert entry.policy == site.policy.version_hash


def test_job_refused_after_expiry(site):
    receipt = site.grant("person-obama", ["render"], granted_by="subject", actor="operator:1", at=T0)
    assert receipt.expires_at == T0 + timedelta(days=90)  # policy: render max_validity 90d
    assert site.require("person-obama", "render", T0 + timedelta(days=89)).receipt_id == receipt.receipt_id
    late = T0 + timedelta(days=90)
    with pytest.raises(consent.ConsentExpired) as info:
        site.require("person-obama", "render", late)
    assert (info.value.person, info.value.purpose, info.value.at, info.value.expired_at) == ("person-obama", "render", late, receipt.expires_at)
    # A shorter expiry than the policy allows is honoured; a renewal makes it valid again.
    short = site.grant("person-biden", ["render"], granted_by="guardian", actor="operator:1", at=T0, expires_at=T0 + timedelta(days=1))
    with pytest.raises(consent.ConsentExpired):
        site.require("person-biden", "render", T0 + timedelta(days=2))
    renewed = site.grant("person-biden", ["render"], granted_by="subject", actor="operator:1", at=T0 + timedelta(days=3))
    assert site.require("person-biden", "render", T0 + timedelta(days=3, hours=1)).receipt_id == renewed.receipt_id != short.receipt_id
    assert ("consent.check", "person-obama", "refused") in _actions(site)


def test_grants_are_held_to_the_policy(site):
    with pytest.raises(consent.ConsentInvalid, match="may be granted by"):
        site.grant("p", ["render"], granted_by="site_operator", actor="operator:1", at=T0)
    with pytest.raises(consent.ConsentInvalid, match="beyond the policy's limit"):
        site.grant("p", ["render"], granted_by="subject", actor="operator:1", at=T0, expires_at=T0 + timedelta(days=91))
    with pytest.raises(consent.ConsentInvalid, match="also needs consent to render"):
        site.grant("p", ["classic_face_crop_payload"], granted_by="subject", actor="operator:1", at=T0)
    from megaportrait.shared.policy import PolicyError

    with pytest.raises(PolicyError, match="no consent purpose 'marketing'"):
        site.grant("p", ["marketing"], granted_by="subject", actor="operator:1", at=T0)
    assert [a for a in _actions(site) if a[0] == "consent.grant"] == [("consent.grant", "p", "refused")] * 4
    # Both purposes in one grant: the shorter max_validity (90d) bounds it; a crop payload needs render too.
    r = site.grant("p", ["classic_face_crop_payload", "render"], granted_by="subject", actor="operator:1", at=T0)
    assert site.require("p", "classic_face_crop_payload", T0 + timedelta(days=1)) == r


def test_receipts_are_signed_and_checked_on_both_sides(site, tmp_path):
    receipt = site.grant("person-obama", ["render", "personal_adapter"], granted_by="subject", actor="operator:1", at=T0)
    token = receipt.to_token()
    back = consent.ConsentReceipt.from_json(token)
    assert back == receipt and back.policy_hash == site.policy.version_hash and back.site == "alpha"
    site_pub = audit.public_key_hex(site.public_key)
    consent.check_receipt(back, "render", site_pub, at=T0 + timedelta(days=1))  # the render node's check
    with pytest.raises(consent.ConsentExpired):
        consent.check_receipt(back, "render", site_pub, at=T0 + timedelta(days=91))
    with pytest.raises(consent.ConsentMissing):
        consent.check_receipt(back, "federated_training", site_pub, at=T0 + timedelta(days=1))
    with pytest.raises(consent.ConsentRevoked):
        consent.check_receipt(back, "render", site_pub, at=T0 + timedelta(days=1), revoked_persons={"person-obama"})
    forged = json.loads(token)
    forged["expires_at"] = (T0 + timedelta(days=3650)).isoformat()
    with pytest.raises(consent.ConsentInvalid, match="signature"):
        consent.check_receipt(consent.ConsentReceipt.from_json(forged), "render", site_pub, at=T0 + timedelta(days=200))
    # Editing the ledger's SQLite behind its back is caught when the receipt is next read.
    db = sqlite3.connect(site.path)
    db.execute("UPDATE receipts SET body = ? WHERE receipt_id = ?", (json.dumps(forged), receipt.receipt_id))
    db.commit()
    db.close()
    with pytest.raises(consent.ConsentInvalid, match="ledger was edited"):
        site.require("person-obama", "render", T0 + timedelta(days=200))


def test_revoked_person_is_excluded_from_the_next_round(site):
    for ref in ("person-obama", "person-biden"):
        site.grant(ref, ["federated_training", "personal_adapter"], granted_by="subject", actor="operator:1", at=T0)
    round_1 = site.eligible(["person-obama", "person-biden"], "federated_training", T0 + timedelta(days=1))
    assert round_1 == ["person-obama", "person-biden"]
    site.revoke("person-biden", by="subject", at=T0 + timedelta(days=2))
    round_2 = site.eligible(["person-obama", "person-biden"], "federated_training", T0 + timedelta(days=3))
    assert round_2 == ["person-obama"]
    with pytest.raises(consent.ConsentRevoked) as info:
        site.require("person-biden", "personal_adapter", T0 + timedelta(days=3))
    assert info.value.revoked_at == T0 + timedelta(days=2)
    # The record of what was allowed before the revocation is kept.
    assert site.require("person-biden", "personal_adapter", T0 + timedelta(days=1))
    assert site.is_revoked("person-biden") and not site.is_revoked("person-obama")


# --- revocation end to end ----------------------------------------------------------------------------------------


def _render_node(tmp_path):
    """The real render node (server/render/node.py) with jobs placed straight into its job store.

    Submission (sealing, HPKE, site trust) is the render node's own concern and tested there; what matters here is
    that the node holds encrypted payloads and outputs for two persons, each job under its own data key.
    """
    node_mod = pytest.importorskip("megaportrait.server.render.node", reason="render node not present")
    from megaportrait.server.render.jobs import NewJob
    from megaportrait.server.render.payloads import TrustedSites
    from megaportrait.shared.records import StageSwitches

    node = node_mod.RenderNode(tmp_path / "node", identity=node_mod.NodeIdentity.generate("render-node-n1"), trusted=TrustedSites())

    def submit(job_id: str, person_ref: str, payload: bytes, template: bytes, result: bytes) -> None:
        new = NewJob(job_id=job_id, backend="classic", payload_kind="face_crops", person_ref=person_ref,
                     consent_ref="r" * 32, site_id="alpha", owner="site:alpha", nonce=os.urandom(16).hex(),
                     payload_expires_at=2_000_000_000, stages=StageSwitches(), seed=0, params={})  # fmt: skip
        node.store.create(new, payload, template)
        node.store.finish(job_id, result, {"backend": "classic"})

    return node, submit


def _statement(key, person_ref: str, jobs: list[dict], at: datetime | None = None):
    """A deletion statement in the render node's format, signed with `key` (for nodes that misbehave)."""
    from types import SimpleNamespace

    from megaportrait.shared.crypto import canonical_json, sign

    body = canonical_json({"type": consent.RENDER_DELETION_DOMAIN, "node_id": "n1", "person_ref": person_ref, "reason": "test",
                           "deleted_at": (at or datetime.now(timezone.utc)).isoformat(timespec="seconds"), "jobs": jobs})  # fmt: skip
    return SimpleNamespace(statement=body, signature=sign(key, consent.RENDER_DELETION_DOMAIN, body))


def test_site_and_render_node_share_one_deletion_format():
    """One domain and one confirmation class (shared.deletion), used by the node to sign and the site to check."""
    from megaportrait.shared import deletion

    node_mod = pytest.importorskip("megaportrait.server.render.node", reason="render node not present")
    assert consent.RENDER_DELETION_DOMAIN == node_mod.DELETION_DOMAIN == deletion.DELETION_DOMAIN
    assert consent.DeletionConfirmation is node_mod.DeletionConfirmation is deletion.DeletionConfirmation
    # what the node signs, the site verifies; the gRPC message and the stored form read back the same
    key = Ed25519PrivateKey.generate()
    job = {"job_id": "j1", "payload_sha256": "ab" * 32, "result_sha256": "cd" * 32, "data_key_destroyed": True}
    signed = deletion.sign_deletion(key, node_id="n1", reason="consent revoked", person_ref="p1", jobs=[job])
    seen = consent.verify_deletion_confirmation(signed, key.public_key(), person_ref="p1", not_before=datetime.now(timezone.utc))
    assert seen == signed and seen.job_ids == ("j1",) and seen.deleted == ("ab" * 32, "cd" * 32)
    from megaportrait.protos import render_pb2 as pb

    msg = pb.DeletionConfirmation(statement=signed.statement, signature=signed.signature)
    assert consent.verify_deletion_confirmation(msg, key.public_key(), person_ref="p1", not_before=seen.at) == signed
    stored = json.dumps(signed.to_json())
    assert deletion.DeletionConfirmation.from_raw(stored, key.public_key()) == signed
    with pytest.raises(deletion.DeletionSignatureInvalid):
        deletion.verify_deletion(signed, Ed25519PrivateKey.generate().public_key())


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_revocation_end_to_end_across_site_and_render_node(site, tmp_path, people, templates):
    obama, biden = "person-obama", "person-biden"
    for ref in (obama, biden):
        site.grant(ref, ["personal_adapter", "federated_training", "render", "classic_face_crop_payload"],
                   granted_by="subject", actor="operator:1")  # fmt: skip
    # Site data: real photos, face-region crops cut from them, and an adapter file per person.
    photos = FileStore(tmp_path / "site" / "photos", "source_photos")
    crops = FileStore(tmp_path / "site" / "crops", "face_crops")
    adapters = FileStore(tmp_path / "site" / "adapters", "personal_adapters")
    crop_bytes: dict[str, list[bytes]] = {}
    for ref, name in ((obama, "obama"), (biden, "biden")):
        for i, path in enumerate(people[name]):
            photos.put(ref, f"{i}.jpg", path.read_bytes())
            img = np.asarray(Image.open(path).convert("RGB"))
            h, w = img.shape[:2]
            crop = _png(img[h // 6 : h // 6 + min(h, w) // 2, w // 4 : w // 4 + min(h, w) // 2])
            crops.put(ref, f"{i}.png", crop)
            crop_bytes.setdefault(ref, []).append(crop)
        adapters.put(ref, "adapter.safetensors", os.urandom(4096))

    node, submit = _render_node(tmp_path)
    store, node_pub = node.store, node.identity.signing.public_key()
    template = templates[0].read_bytes()
    for ref in (obama, biden):
        for j in range(2):
            submit(f"{ref}-job{j}", ref, b"sealed:" + crop_bytes[ref][j], template, _png(np.full((8, 8, 3), j, np.uint8)))
    victim_job = f"{obama}-job0"
    key_before = store._key(victim_job)
    blob_before = store._db.execute("SELECT data FROM blobs WHERE job_id = ? AND name = 'sealed_payload'", (victim_job,)).fetchone()[0]

    result = consent.revoke_person(obama, ledger=site, by="subject", site_stores=[photos, crops, adapters],
                                   render_node=node, render_node_key=node_pub)  # fmt: skip
    assert result.complete and len(result.receipts_revoked) == 1
    assert len(result.site_deleted["source_photos"]) == len(people["obama"]) == 4
    conf = result.render_confirmation
    assert conf.person_ref == obama and conf.keys_destroyed == 2 and conf.all_gone and conf.node == "render-node-n1"
    assert sorted(conf.job_ids) == [f"{obama}-job0", f"{obama}-job1"] and len(conf.deleted) == 4  # payload + output each
    assert site.render_confirmation(obama, node_pub) == conf and site.pending_render_deletions() == []

    # Site: nothing of the person can be read back; the other person is untouched.
    for s in (photos, crops, adapters):
        assert s.find_person(obama) == []
        assert not (s.root / obama).exists()
        assert len(s.find_person(biden)) >= 1
    # Render node: jobs, keys and blobs gone; a copy of a blob taken before cannot be decrypted without the key.
    from megaportrait.server.render.jobs import JobNotFound
    from megaportrait.shared.crypto import DecryptionFailed, decrypt_at_rest, new_data_key

    assert store.person_job_ids(obama) == []
    with pytest.raises(JobNotFound, match="deleted"):
        store.load_inputs(victim_job)
    assert store._db.execute("SELECT COUNT(*) FROM data_keys WHERE job_id LIKE ?", (f"{obama}%",)).fetchone()[0] == 0
    assert store._db.execute("SELECT COUNT(*) FROM blobs WHERE job_id LIKE ?", (f"{obama}%",)).fetchone()[0] == 0
    assert decrypt_at_rest(key_before, bytes(blob_before), _aad(victim_job)).startswith(b"sealed:")  # sanity: key was the key
    with pytest.raises(DecryptionFailed):
        decrypt_at_rest(new_data_key(), bytes(blob_before), _aad(victim_job))
    assert store.person_job_ids(biden) == [f"{biden}-job0", f"{biden}-job1"]
    assert store.load_result(f"{biden}-job1")[0]

    # Consent checks now refuse; every step is in the (verifiable) audit log.
    with pytest.raises(consent.ConsentRevoked):
        site.require(obama, "render")
    acts = [a for a in _actions(site) if a[1] == obama]
    assert ("consent.revoke", obama, "ok") in acts
    assert acts.count(("revocation.site_delete", obama, "ok")) == 3
    assert ("revocation.render_delete", obama, "ok") in acts
    assert audit.verify(site.audit.path, site.public_key).ok
    node.stop()


def _aad(job_id: str) -> bytes:
    from megaportrait.server.render import jobs

    return jobs._aad(job_id, "sealed_payload")


class _Unreachable:
    def __init__(self) -> None:
        self.calls = 0

    def delete_person(self, person_ref: str):
        self.calls += 1
        raise ConnectionError("render node unreachable")


def test_unconfirmed_render_deletion_is_pending_until_a_valid_confirmation(site, tmp_path):
    site.grant("p1", ["render"], granted_by="subject", actor="operator:1")
    node_key = audit.generate_signing_key(tmp_path / "node.key")
    down = _Unreachable()
    with pytest.raises(consent.RevocationIncomplete) as info:
        consent.revoke_person("p1", ledger=site, by="subject", render_node=down, render_node_key=node_key.public_key())
    assert info.value.pending == ("render node confirmation",)
    assert [p for p, _ in site.pending_render_deletions()] == ["p1"]
    with pytest.raises(consent.ConsentRevoked):  # the revocation itself already holds
        site.require("p1", "render")

    job = {"job_id": "j1", "payload_sha256": "ab" * 32, "result_sha256": "", "data_key_destroyed": True}

    class Forger:  # signs with a key that is not the node's
        def delete_person(self, person_ref):
            return _statement(audit.generate_signing_key(tmp_path / "evil.key"), person_ref, [job])

    class WrongPerson:
        def delete_person(self, person_ref):
            return _statement(node_key, "p2", [job])

    class KeyKept:
        def delete_person(self, person_ref):
            return _statement(node_key, person_ref, [{**job, "data_key_destroyed": False}])

    class Replayed:
        def delete_person(self, person_ref):
            return _statement(node_key, person_ref, [job], at=datetime.now(timezone.utc) - timedelta(days=1))

    class Honest:
        def delete_person(self, person_ref):
            return _statement(node_key, person_ref, [job])

    for bad, msg in ((Forger(), "signature"), (WrongPerson(), "not p1"), (KeyKept(), "did not destroy"), (Replayed(), "replayed")):
        out = consent.retry_pending_revocations(site, bad, node_key.public_key())
        assert isinstance(out["p1"], consent.ConsentInvalid) and msg in str(out["p1"])
    out = consent.retry_pending_revocations(site, Honest(), node_key.public_key())
    assert isinstance(out["p1"], consent.DeletionConfirmation) and site.pending_render_deletions() == []
    assert site.render_confirmation("p1", audit.public_key_hex(node_key)).deleted == ("ab" * 32,)
    outcomes = [a[2] for a in _actions(site) if a[0] == "revocation.render_delete"]
    assert outcomes == ["failed"] * 5 + ["ok"]


def test_site_data_still_readable_makes_revocation_incomplete(site, tmp_path):
    class StickyStore:  # a store whose deletion silently fails
        name = "face_crops"

        def delete_person(self, person_ref):
            return ["cd" * 32]

        def find_person(self, person_ref):
            return ["cd" * 32]

    site.grant("p1", ["personal_adapter"], granted_by="subject", actor="operator:1")
    with pytest.raises(consent.RevocationIncomplete, match="1 items still readable"):
        consent.revoke_person("p1", ledger=site, by="subject", site_stores=[StickyStore()])
    assert ("revocation.site_delete", "p1", "failed") in _actions(site)


def test_ended_receipts_are_purged_after_the_policy_keeps_them(site):
    keep = site.policy.rules.site_retention_of_receipts  # 6y in the shipped policy
    old = site.grant("p-old", ["render"], granted_by="subject", actor="operator:1", at=T0)
    revoked = site.grant("p-rev", ["personal_adapter"], granted_by="subject", actor="operator:1", at=T0)
    site.revoke("p-rev", by="subject", at=T0 + timedelta(days=1))
    live = site.grant("p-live", ["render"], granted_by="subject", actor="operator:1", at=T0 + keep)
    assert site.purge_receipts(T0 + keep) == []  # nothing has been over for 6 years yet
    gone = site.purge_receipts(T0 + timedelta(days=1) + keep)
    assert gone == [revoked.receipt_id]
    assert site.receipts("p-rev") == [] and site.receipts("p-old")[0][0] == old
    assert site.purge_receipts(T0 + timedelta(days=90) + keep) == [old.receipt_id]
    assert site.receipts("p-live")[0][0] == live
    assert [e.data for e in audit.read_entries(site.audit.path) if e.action == "retention.delete"] == [(revoked.receipt_id,), (old.receipt_id,)]
