"""The render node as a real gRPC server on loopback with mutual TLS: sealed payload in, portrait out, every refusal.

The end-to-end test checks consent in a real site ledger and renders with the real classic backend. Plumbing tests
(restart, cancel, crypto-shredding, audit, health) use test doubles registered only in this module
(`TestDoublePaste`, `TestDoubleBlocking`, `TestDoubleFailing`) so they control timing and outcome.
"""
from __future__ import annotations

import io
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from PIL import Image

from megaportrait.client.payload import seal_face_crops, seal_face_crops_unchecked
from megaportrait.protos import render_pb2 as pb
from megaportrait.server.render.backends import default_registry
from megaportrait.server.render.node import DeletionConfirmation, NodeIdentity, RenderNode, verify_deletion
from megaportrait.server.render.payloads import TrustedSites
from megaportrait.server.render.service import TLSFiles, client_channel, start_server, stub
from megaportrait.shared import pki
from megaportrait.shared.crypto import DecryptionFailed, HpkePrivateKey, HpkePublicKey, decrypt_at_rest
from megaportrait.shared.imaging import decode_png, read_png_metadata
from megaportrait.shared.payload_format import CLASSIC_CROP_PURPOSE
from megaportrait.shared.records import FaceCropSet, Portrait, sha256_hex

TIMEOUT = 60


# ---------------------------------------------------------------------------------------------- test doubles


class TestDoublePaste:
    """Test double, not a backend: pastes the first face crop into the template's corner, reporting three stages."""

    __test__ = False
    name = "test-double-paste"

    def render(self, job_id, template, identity, *, stages, seed, params, progress):
        out = template.pixels.copy()
        crop = identity.crops[0].pixels[:64, :64]
        out[: crop.shape[0], : crop.shape[1]] = crop
        for stage in stages.enabled():
            progress(stage, 1.0)
        return Portrait(job_id=job_id, pixels=out, metadata={"test_double": True})


class TestDoubleBlocking(TestDoublePaste):
    """Test double: reports progress every 10 ms until `release` is set, so a test can act on a running job."""

    __test__ = False
    name = "test-double-blocking"

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def render(self, job_id, template, identity, *, stages, seed, params, progress):
        while not self.release.is_set():
            progress("identity", 0.5)
            time.sleep(0.01)
        return super().render(job_id, template, identity, stages=stages, seed=seed, params=params, progress=progress)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def crops(people) -> FaceCropSet:
    """Aligned crops of two real photos of one person, from the site's own intake."""
    from megaportrait.client.faces import face_crop_set, intake_photos

    return face_crop_set("person-7f3a", intake_photos(people["obama"][:2], show_progress=False))


@pytest.fixture(scope="module")
def template_bytes(templates) -> bytes:
    return templates[0].read_bytes()


@pytest.fixture(scope="module")
def tls() -> dict[str, TLSFiles]:
    ca = pki.create_ca("Test CA")
    server = pki.issue_certificate(ca, "render-node", role="server", dns_names=("localhost",), ip_addresses=("127.0.0.1",))
    files = {"server": TLSFiles(ca.cert_pem, server.cert_pem, server.key_pem)}
    for site in ("site-a", "site-b", "site-n"):
        cred = pki.issue_certificate(ca, site, role="client")
        files[site] = TLSFiles(ca.cert_pem, cred.cert_pem, cred.key_pem)
    foreign = pki.create_ca("Foreign CA")
    cred = pki.issue_certificate(foreign, "site-a", role="client")
    files["foreign"] = TLSFiles(ca.cert_pem, cred.cert_pem, cred.key_pem)
    return files


@pytest.fixture(scope="module")
def site_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture()
def ledger(tmp_path):
    """Site site-a's consent ledger (shipped consent policy, its own audit log)."""
    from megaportrait.shared import audit, consent
    from megaportrait.shared.policy import load_consent_policy

    key = audit.generate_signing_key(tmp_path / "site" / "site.key")
    log = audit.AuditLog(tmp_path / "site" / "audit.jsonl", key, component="site:site-a", checkpoint_every=0)
    ledger = consent.ConsentLedger(tmp_path / "site" / "consent.sqlite", site="site-a", key=key,
                                   policy=load_consent_policy(REPO / "policies" / "consent.yaml"), audit=log)  # fmt: skip
    yield ledger
    ledger.close()


REPO = Path(__file__).resolve().parents[3]


@dataclass
class Running:
    node: RenderNode
    server: grpc.Server
    port: int
    channels: list

    def client(self, tls: TLSFiles):
        channel = client_channel(f"localhost:{self.port}", tls)
        self.channels.append(channel)
        return stub(channel)

    def stop(self) -> None:
        for ch in self.channels:
            ch.close()
        self.server.stop(None)
        self.node.stop()


@pytest.fixture
def launch(tmp_path, tls, site_key):
    """Start a node (keys kept in tmp_path/state) and its mTLS server on an ephemeral port; stopped at teardown."""
    started: list[Running] = []
    identity_box: dict[str, NodeIdentity] = {}

    def _launch(release: threading.Event | None = None, *, start_workers: bool = True) -> Running:
        state = tmp_path / "state"
        if "id" not in identity_box:
            identity_box["id"] = NodeIdentity.generate("node-test")
            identity_box["id"].save(state)
            TrustedSites().add("site-a", site_key.public_key(), state / "trusted_sites")
        registry = default_registry()
        registry.register("test-double-paste", lambda s: TestDoublePaste(), payload_kind="face_crops")
        gate = release or threading.Event()
        registry.register("test-double-blocking", lambda s: TestDoubleBlocking(gate), payload_kind="face_crops")
        node = RenderNode.from_state_dir(state, registry=registry, default_backend="classic")
        if start_workers:
            node.start()
        server, port = start_server(node, "127.0.0.1:0", tls["server"])
        run = Running(node, server, port, [])
        started.append(run)
        return run

    yield _launch
    for run in started:
        if not run.node.stopping:
            run.stop()


def _seal(crops, node: RenderNode, signer, *, job_id="job-1", backend="test-double-paste", **kw) -> bytes:
    args = dict(job_id=job_id, consent_ref="consent-9", consent_scope=CLASSIC_CROP_PURPOSE, recipient=node.identity.public().hpke,
                site_id="site-a", site_key=signer, backend=backend)
    args.update(kw)
    return seal_face_crops_unchecked(crops, **args)  # the node's checks are under test here; the site's are in test_payloads


def _submit(client, sealed, template, *, job_id="job-1", backend="test-double-paste", consent_ref="consent-9", **kw):
    return client.SubmitJob(
        pb.SubmitJobRequest(job_id=job_id, sealed_payload=sealed, consent_ref=consent_ref, template_image=template, backend=backend, **kw),
        timeout=TIMEOUT,
    )


def _follow(client, job_id="job-1") -> list[pb.ProgressUpdate]:
    return list(client.StreamProgress(pb.JobRef(job_id=job_id), timeout=TIMEOUT))


def _wait_state(client, job_id: str, state: int) -> pb.JobStatus:
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        status = client.GetJob(pb.JobRef(job_id=job_id), timeout=TIMEOUT)
        if status.state == state:
            return status
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {pb.JobState.Name(state)}")


def _refused(call, code: grpc.StatusCode, reason: str) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    assert err.value.details().startswith(reason + ":"), err.value.details()
    return err.value.details()


def _confirmation(msg: pb.DeletionConfirmation) -> DeletionConfirmation:
    return DeletionConfirmation(msg.statement, msg.signature, msg.signer_fingerprint, tuple(msg.job_ids))


# ---------------------------------------------------------------------------------------------- tests


def test_classic_portrait_end_to_end_over_mtls(launch, tls, crops, site_key, template_bytes, ledger):
    """Site checks consent and seals real face crops; the node renders with the classic backend; the site fetches and deletes."""
    run = launch()
    client = run.client(tls["site-a"])
    info = client.GetNodeInfo(pb.NodeInfoRequest(), timeout=TIMEOUT)
    assert info.api_version == "megaportrait.render.v1" and "classic" in info.backends
    recipient = HpkePublicKey.from_bytes(info.hpke_public_key)
    assert recipient.fingerprint() == info.hpke_fingerprint
    receipt = ledger.grant(crops.person_ref, [CLASSIC_CROP_PURPOSE, "render"], granted_by="subject", actor="operator:1")
    sealed = seal_face_crops(crops, ledger=ledger, job_id="job-e2e", recipient=recipient, site_id="site-a", site_key=site_key)
    status = _submit(client, sealed, template_bytes, job_id="job-e2e", backend="", consent_ref=receipt.receipt_id)  # node default: classic
    assert status.state == pb.JOB_STATE_QUEUED and status.backend == "classic" and not status.existing

    updates = _follow(client, "job-e2e")
    assert updates[-1].state == pb.JOB_STATE_SUCCEEDED, updates[-1]
    assert {"identity", "harmonize"} <= {u.stage for u in updates}
    fractions = [u.fraction for u in updates if u.state == pb.JOB_STATE_RUNNING]
    assert fractions and all(0.0 <= f <= 1.0 for f in fractions)

    result = client.FetchResult(pb.JobRef(job_id="job-e2e"), timeout=TIMEOUT)
    assert sha256_hex(result.png) == result.png_sha256
    pixels = decode_png(result.png)
    template = np.asarray(Image.open(io.BytesIO(template_bytes)).convert("RGB"))
    assert pixels.shape == template.shape
    changed = np.abs(pixels.astype(int) - template.astype(int)).sum(axis=2) > 30
    assert 0.005 < changed.mean() < 0.5, changed.mean()  # the face region was re-rendered, not the whole frame
    meta = json.loads(result.metadata_json)
    assert meta["backend"] == "classic" and meta["job_id"] == "job-e2e" and meta["render_node"] == "node-test"
    assert read_png_metadata(result.png)["job_id"] == "job-e2e"

    confirmation = client.DeleteJobs(pb.DeleteJobsRequest(job_ids=["job-e2e"]), timeout=TIMEOUT)
    statement = verify_deletion(_confirmation(confirmation), Ed25519PublicKey.from_public_bytes(info.signing_public_key))
    assert statement["jobs"] == [{"job_id": "job-e2e", "payload_sha256": sha256_hex(sealed), "result_sha256": result.png_sha256, "data_key_destroyed": True}]
    _refused(lambda: client.FetchResult(pb.JobRef(job_id="job-e2e"), timeout=TIMEOUT), grpc.StatusCode.NOT_FOUND, "job_deleted")


def test_backend_failure_ends_the_job_with_its_reason(launch, tls, crops, site_key):
    """A template without a face (a real photo of coffee) fails the classic job cleanly, with the backend's reason."""
    import skimage.data

    buf = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).save(buf, format="PNG")
    run = launch()
    client = run.client(tls["site-a"])
    _submit(client, _seal(crops, run.node, site_key, backend="classic"), buf.getvalue(), backend="classic")
    last = _follow(client)[-1]
    assert last.state == pb.JOB_STATE_FAILED and last.error_reason == "template_no_face"
    _refused(lambda: client.FetchResult(pb.JobRef(job_id="job-1"), timeout=TIMEOUT), grpc.StatusCode.FAILED_PRECONDITION, "job_failed")


def test_sealed_payload_refusals_over_grpc(launch, tls, crops, site_key, template_bytes):
    run = launch()
    client = run.client(tls["site-a"])
    good = _seal(crops, run.node, site_key)

    flipped = bytearray(good)
    flipped[-200] ^= 0x01
    _refused(lambda: _submit(client, bytes(flipped), template_bytes), grpc.StatusCode.PERMISSION_DENIED, "ciphertext_modified")
    forged = good.replace(b'"person_ref":"person-7f3a"', b'"person_ref":"person-7f3b"')
    assert forged != good
    _refused(lambda: _submit(client, forged, template_bytes), grpc.StatusCode.PERMISSION_DENIED, "header_signature_invalid")
    other_node = _seal(crops, run.node, site_key, recipient=HpkePrivateKey.generate().public_key())
    _refused(lambda: _submit(client, other_node, template_bytes), grpc.StatusCode.FAILED_PRECONDITION, "wrong_recipient_key")
    expired = _seal(crops, run.node, site_key, ttl_s=30, now=time.time() - 60)
    _refused(lambda: _submit(client, expired, template_bytes), grpc.StatusCode.FAILED_PRECONDITION, "payload_expired")
    stranger = _seal(crops, run.node, site_key, site_key=Ed25519PrivateKey.generate())
    _refused(lambda: _submit(client, stranger, template_bytes), grpc.StatusCode.UNAUTHENTICATED, "unknown_site_key")
    unknown_site = _seal(crops, run.node, site_key, site_id="site-q")
    _refused(lambda: _submit(client, unknown_site, template_bytes), grpc.StatusCode.UNAUTHENTICATED, "unknown_site")
    detail = _refused(lambda: _submit(client, good, template_bytes, consent_ref="consent-8"), grpc.StatusCode.PERMISSION_DENIED, "payload_binding_mismatch")
    assert "consent_ref" in detail
    detail = _refused(lambda: _submit(client, good, template_bytes, job_id="job-2"), grpc.StatusCode.PERMISSION_DENIED, "payload_binding_mismatch")
    assert "job_id" in detail
    # none of the refused submissions left a job behind
    _refused(lambda: client.GetJob(pb.JobRef(job_id="job-1"), timeout=TIMEOUT), grpc.StatusCode.NOT_FOUND, "job_not_found")
    assert _submit(client, good, template_bytes).state == pb.JOB_STATE_QUEUED


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(job_id=""), "job_id is required"),
        (dict(job_id="job 1/../x"), "job_id must be"),
        (dict(consent_ref=""), "consent_ref is required"),
        (dict(sealed_payload=b""), "sealed_payload is empty"),
        (dict(sealed_payload=b"MPSP\x00\x00"), "payload_malformed"),
        (dict(template_image=b""), "template_image is empty"),
        (dict(template_image=b"not an image"), "template_image: unreadable"),
        (dict(params_json="{not json"), "params_json is not valid JSON"),
        (dict(params_json="[1, 2]"), "params_json must encode a JSON object"),
        (dict(backend="no-such-backend"), "backend 'no-such-backend' is not offered"),
    ],
)
def test_malformed_requests_get_invalid_argument(launch, tls, crops, site_key, template_bytes, change, message):
    run = launch()
    client = run.client(tls["site-a"])
    fields = dict(job_id="job-1", sealed_payload=_seal(crops, run.node, site_key), consent_ref="consent-9",
                  template_image=template_bytes, backend="test-double-paste")
    fields.update(change)
    with pytest.raises(grpc.RpcError) as err:
        client.SubmitJob(pb.SubmitJobRequest(**fields), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details(), err.value.details()


def test_clients_without_a_ca_signed_certificate_are_refused(launch, tls, crops, site_key, template_bytes):
    run = launch()
    no_cert = client_channel(f"localhost:{run.port}", ca_pem=tls["site-a"].ca_pem)
    run.channels.append(no_cert)
    for client in (stub(no_cert), run.client(tls["foreign"])):
        with pytest.raises(grpc.RpcError) as err:
            client.GetNodeInfo(pb.NodeInfoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # a CA-signed client of another site may not touch site-a's job
    owner, other = run.client(tls["site-a"]), run.client(tls["site-b"])
    _submit(owner, _seal(crops, run.node, site_key), template_bytes)
    _refused(lambda: other.FetchResult(pb.JobRef(job_id="job-1"), timeout=TIMEOUT), grpc.StatusCode.PERMISSION_DENIED, "not_job_owner")
    _refused(lambda: other.DeleteJobs(pb.DeleteJobsRequest(job_ids=["job-1"]), timeout=TIMEOUT), grpc.StatusCode.PERMISSION_DENIED, "not_job_owner")


def test_idempotent_resubmit_and_conflicting_resubmit(launch, tls, crops, site_key, template_bytes, templates):
    run = launch()
    client = run.client(tls["site-a"])
    sealed = _seal(crops, run.node, site_key)
    first = _submit(client, sealed, template_bytes)
    again = _submit(client, sealed, template_bytes)
    assert again.existing and not first.existing and again.job_id == first.job_id and again.created_at == first.created_at
    assert _follow(client)[-1].state == pb.JOB_STATE_SUCCEEDED
    assert _submit(client, sealed, template_bytes).state == pb.JOB_STATE_SUCCEEDED  # still the same job, not a new one
    resealed = _seal(crops, run.node, site_key)  # same job id, new nonce: a different payload
    detail = _refused(lambda: _submit(client, resealed, template_bytes), grpc.StatusCode.ALREADY_EXISTS, "job_id_conflict")
    assert "different payload" in detail
    other_template = templates[1].read_bytes()
    detail = _refused(lambda: _submit(client, sealed, other_template), grpc.StatusCode.ALREADY_EXISTS, "job_id_conflict")
    assert "different template" in detail


def test_replay_of_a_consumed_payload_is_refused_even_after_restart(launch, tls, crops, site_key, template_bytes):
    run = launch()
    client = run.client(tls["site-a"])
    sealed = _seal(crops, run.node, site_key)
    _submit(client, sealed, template_bytes)
    assert _follow(client)[-1].state == pb.JOB_STATE_SUCCEEDED
    client.DeleteJobs(pb.DeleteJobsRequest(job_ids=["job-1"]), timeout=TIMEOUT)
    _refused(lambda: _submit(client, sealed, template_bytes), grpc.StatusCode.ALREADY_EXISTS, "payload_replayed")
    run.stop()
    client = launch().client(tls["site-a"])
    _refused(lambda: _submit(client, sealed, template_bytes), grpc.StatusCode.ALREADY_EXISTS, "payload_replayed")


def test_restart_resumes_interrupted_jobs_or_fails_them_with_a_reason(launch, tls, crops, site_key, template_bytes, tmp_path):
    release = threading.Event()
    run = launch(release)
    client = run.client(tls["site-a"])
    for job_id in ("job-1", "job-2"):
        _submit(client, _seal(crops, run.node, site_key, job_id=job_id, backend="test-double-blocking"), template_bytes,
                job_id=job_id, backend="test-double-blocking")
    _wait_state(client, "job-1", pb.JOB_STATE_RUNNING)
    run.stop()  # graceful: the running job goes back to the queue
    db = sqlite3.connect(tmp_path / "state" / "jobs.sqlite")
    assert db.execute("SELECT state, attempts FROM jobs WHERE job_id = 'job-1'").fetchone() == ("queued", 1)
    # simulate a crash during job-2's third attempt: left 'running' with no process behind it
    db.execute("UPDATE jobs SET state = 'running', attempts = 3 WHERE job_id = 'job-2'")
    db.commit()
    db.close()

    release.set()  # after the restart the blocking double returns at once
    run = launch(release)
    client = run.client(tls["site-a"])
    assert _follow(client, "job-1")[-1].state == pb.JOB_STATE_SUCCEEDED
    assert decode_png(client.FetchResult(pb.JobRef(job_id="job-1"), timeout=TIMEOUT).png).shape[2] == 3
    failed = client.GetJob(pb.JobRef(job_id="job-2"), timeout=TIMEOUT)
    assert failed.state == pb.JOB_STATE_FAILED and failed.error_reason == "interrupted" and "3 time(s)" in failed.error_message
    done = client.GetJob(pb.JobRef(job_id="job-1"), timeout=TIMEOUT)
    assert (done.error_reason, done.error_message) == ("", "")  # no "resumed after a node restart" left on a success


def test_cancel_running_and_queued_jobs(launch, tls, crops, site_key, template_bytes):
    run = launch()
    client = run.client(tls["site-a"])
    for job_id in ("job-1", "job-2"):  # one worker: job-2 waits behind job-1
        _submit(client, _seal(crops, run.node, site_key, job_id=job_id, backend="test-double-blocking"), template_bytes,
                job_id=job_id, backend="test-double-blocking")
    _wait_state(client, "job-1", pb.JOB_STATE_RUNNING)
    queued = client.CancelJob(pb.JobRef(job_id="job-2"), timeout=TIMEOUT)
    assert queued.state == pb.JOB_STATE_CANCELLED
    client.CancelJob(pb.JobRef(job_id="job-1"), timeout=TIMEOUT)
    last = _follow(client, "job-1")[-1]
    assert last.state == pb.JOB_STATE_CANCELLED and last.error_reason == "cancelled"
    _refused(lambda: client.FetchResult(pb.JobRef(job_id="job-1"), timeout=TIMEOUT), grpc.StatusCode.FAILED_PRECONDITION, "job_cancelled")


def test_delete_destroys_the_data_key_so_stored_data_cannot_be_read(launch, tls, crops, site_key, template_bytes, tmp_path):
    run = launch()
    client = run.client(tls["site-a"])
    sealed = _seal(crops, run.node, site_key)
    _submit(client, sealed, template_bytes)
    _submit(client, _seal(crops, run.node, site_key, job_id="job-2"), template_bytes, job_id="job-2")  # stays
    assert _follow(client)[-1].state == pb.JOB_STATE_SUCCEEDED
    assert _follow(client, "job-2")[-1].state == pb.JOB_STATE_SUCCEEDED
    png = client.FetchResult(pb.JobRef(job_id="job-1"), timeout=TIMEOUT).png

    path = tmp_path / "state" / "jobs.sqlite"
    db = sqlite3.connect(path)
    wrapped = db.execute("SELECT key FROM data_keys WHERE job_id = 'job-1'").fetchone()[0]
    store_key = (tmp_path / "state" / "keys" / "store.key").read_bytes()
    key = decrypt_at_rest(store_key, wrapped, b"megaportrait/render-data-key/v1\0job-1")
    blobs = dict(db.execute("SELECT name, data FROM blobs WHERE job_id = 'job-1'").fetchall())
    db.close()
    assert set(blobs) == {"sealed_payload", "template", "result_png", "result_metadata"}
    raw = path.read_bytes()
    assert png not in raw and sealed not in raw and template_bytes not in raw  # nothing stored in the clear
    aad = b"megaportrait/render-job-blob/v1\0job-1\0result_png"
    assert decrypt_at_rest(key, blobs["result_png"], aad) == png  # the key is what makes it readable

    confirmation = _confirmation(client.DeleteJobs(pb.DeleteJobsRequest(job_ids=["job-1"]), timeout=TIMEOUT))
    statement = verify_deletion(confirmation, run.node.identity.signing.public_key())
    assert statement["jobs"][0]["data_key_destroyed"] and confirmation.job_ids == ("job-1",)
    _refused(lambda: client.FetchResult(pb.JobRef(job_id="job-1"), timeout=TIMEOUT), grpc.StatusCode.NOT_FOUND, "job_deleted")

    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM data_keys WHERE job_id = 'job-1'").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM blobs WHERE job_id = 'job-1'").fetchone()[0] == 0
    remaining = [decrypt_at_rest(store_key, r[1], b"megaportrait/render-data-key/v1\0" + r[0].encode())
                 for r in db.execute("SELECT job_id, key FROM data_keys").fetchall()]
    db.close()
    # a copy of the ciphertext taken before deletion opens with no key the node still holds
    assert len(remaining) == 1
    for k in remaining:
        with pytest.raises(DecryptionFailed):
            decrypt_at_rest(k, blobs["result_png"], aad)
    raw = path.read_bytes()
    assert wrapped not in raw and blobs["result_png"][:64] not in raw  # secure_delete overwrote the freed pages
    # a tampered confirmation does not verify
    forged = DeletionConfirmation(confirmation.statement.replace(b"job-1", b"job-X"), confirmation.signature,
                                  confirmation.signer_fingerprint, confirmation.job_ids)
    with pytest.raises(Exception, match="does not verify"):
        verify_deletion(forged, run.node.identity.signing.public_key())


def test_delete_person_removes_only_that_persons_jobs(launch, tls, crops, site_key, template_bytes):
    run = launch()
    client = run.client(tls["site-a"])
    other = FaceCropSet(person_ref="person-0b1d", crops=crops.crops[:1], mean_embedding=crops.mean_embedding, embedder=crops.embedder)
    _submit(client, _seal(crops, run.node, site_key, job_id="job-1"), template_bytes, job_id="job-1")
    _submit(client, _seal(crops, run.node, site_key, job_id="job-2"), template_bytes, job_id="job-2")
    _submit(client, _seal(other, run.node, site_key, job_id="job-3"), template_bytes, job_id="job-3")
    for job_id in ("job-1", "job-2", "job-3"):
        assert _follow(client, job_id)[-1].state == pb.JOB_STATE_SUCCEEDED
    confirmation = _confirmation(client.DeletePerson(pb.DeletePersonRequest(person_ref="person-7f3a"), timeout=TIMEOUT))
    statement = verify_deletion(confirmation, run.node.identity.signing.public_key())
    assert statement["person_ref"] == "person-7f3a" and sorted(j["job_id"] for j in statement["jobs"]) == ["job-1", "job-2"]
    _refused(lambda: client.GetJob(pb.JobRef(job_id="job-2"), timeout=TIMEOUT), grpc.StatusCode.NOT_FOUND, "job_deleted")
    assert client.GetJob(pb.JobRef(job_id="job-3"), timeout=TIMEOUT).state == pb.JOB_STATE_SUCCEEDED


# ---------------------------------------------------------------------------------------------- audit, trust, revocation


def _audit_rows(node: RenderNode) -> list[tuple[str, str, str]]:
    """(action, outcome, reason) of every entry in the node's audit log so far."""
    from megaportrait.shared import audit

    return [(e.action, e.outcome, e.detail.get("reason", "")) for e in audit.read_entries(node.audit.path)]


def test_the_node_audits_every_step_by_hash_and_its_log_verifies(launch, tls, crops, site_key, template_bytes, tmp_path):
    from megaportrait.client.payload import seal_payload
    from megaportrait.shared import audit
    from megaportrait.shared.cli import app
    from megaportrait.shared.payload_format import KIND_FACE_CROPS, face_crops_to_bytes
    from typer.testing import CliRunner

    release = threading.Event()
    run = launch(release)
    client = run.client(tls["site-a"])
    good = _seal(crops, run.node, site_key)
    flipped = bytearray(good)
    flipped[-200] ^= 0x01
    refusals = {
        "ciphertext_modified": bytes(flipped),
        "wrong_recipient_key": _seal(crops, run.node, site_key, recipient=HpkePrivateKey.generate().public_key()),
        "payload_expired": _seal(crops, run.node, site_key, ttl_s=30, now=time.time() - 60),
        "unknown_site_key": _seal(crops, run.node, site_key, site_key=Ed25519PrivateKey.generate()),
        "consent_scope_refused": seal_payload(face_crops_to_bytes(crops), kind=KIND_FACE_CROPS, person_ref=crops.person_ref, job_id="job-1",
                                              consent_ref="consent-9", consent_scope="render", recipient=run.node.identity.public().hpke,
                                              site_id="site-a", site_key=site_key, backend="test-double-paste"),
    }  # fmt: skip
    for sealed in refusals.values():
        with pytest.raises(grpc.RpcError):
            _submit(client, sealed, template_bytes)
    _submit(client, good, template_bytes)
    assert _follow(client)[-1].state == pb.JOB_STATE_SUCCEEDED
    png = client.FetchResult(pb.JobRef(job_id="job-1"), timeout=TIMEOUT).png
    client.DeleteJobs(pb.DeleteJobsRequest(job_ids=["job-1"]), timeout=TIMEOUT)
    _refused(lambda: _submit(client, good, template_bytes), grpc.StatusCode.ALREADY_EXISTS, "payload_replayed")
    _submit(client, _seal(crops, run.node, site_key, job_id="job-2", backend="test-double-blocking"), template_bytes,
            job_id="job-2", backend="test-double-blocking")  # fmt: skip
    deadline = time.time() + TIMEOUT
    while client.GetJob(pb.JobRef(job_id="job-2"), timeout=TIMEOUT).stage != "identity":  # opened (and audited), rendering
        assert time.time() < deadline, "job-2 never reported progress"
        time.sleep(0.01)
    client.CancelJob(pb.JobRef(job_id="job-2"), timeout=TIMEOUT)
    assert _follow(client, "job-2")[-1].state == pb.JOB_STATE_CANCELLED
    _refused(lambda: run.client(tls["site-b"]).FetchResult(pb.JobRef(job_id="job-2"), timeout=TIMEOUT), grpc.StatusCode.PERMISSION_DENIED, "not_job_owner")
    client.DeletePerson(pb.DeletePersonRequest(person_ref=crops.person_ref), timeout=TIMEOUT)
    node = run.node
    run.stop()

    rows = _audit_rows(node)
    refused = [r for a, o, r in rows if a == "job.submit" and o == "refused"]
    assert refused == [*refusals, "payload_replayed"]
    assert [(a, o) for a, o, _ in rows if a != "job.submit" or o != "refused"] == [
        ("node.start", "ok"), ("retention.sweep", "ok"),
        ("payload.decrypt", "ok"), ("job.submit", "ok"),  # job-1 accepted (opened once at submission)
        ("payload.decrypt", "ok"), ("job.render", "ok"), ("job.fetch", "ok"), ("job.delete", "ok"),
        ("payload.decrypt", "ok"), ("job.submit", "ok"), ("payload.decrypt", "ok"),  # job-2
        ("job.cancel", "ok"), ("job.render", "failed"), ("job.fetch", "refused"), ("person.delete", "ok"), ("node.stop", "ok"),
    ]  # fmt: skip
    entries = list(audit.read_entries(node.audit.path))
    assert {e.component for e in entries} == {"render-node:node-test"}
    by_action = {(e.action, e.outcome): e for e in entries}
    assert by_action[("job.submit", "ok")].actor == "client:site-a" and by_action[("job.render", "ok")].actor == "render-worker"
    assert by_action[("job.fetch", "ok")].data == (sha256_hex(png),) and by_action[("job.fetch", "refused")].actor == "client:site-b"
    assert by_action[("job.delete", "ok")].data == (sha256_hex(good), sha256_hex(png))
    assert by_action[("job.submit", "ok")].detail["consent_ref"] == "consent-9"
    assert by_action[("person.delete", "ok")].person == crops.person_ref
    # data only by hash: every data field is a sha256, and no crop, template or portrait bytes are in the file
    assert all(len(d) == 64 and int(d, 16) >= 0 for e in entries for d in e.data)
    raw = node.audit.path.read_bytes()
    assert crops.crops[0].pixels.tobytes()[:64] not in raw and png[-64:] not in raw and template_bytes[-64:] not in raw

    pub = tmp_path / "state" / "audit" / "signing.key.pub"
    assert audit.verify(node.audit.path, audit.load_public_key(pub)).ok
    result = CliRunner().invoke(app, ["audit", "verify", str(node.audit.path), "--public-key", str(pub)])
    assert result.exit_code == 0 and f"{len(entries)} entries" in result.output, result.output
    lines = node.audit.path.read_text().splitlines()
    lines[3] = lines[3].replace('"outcome":"refused"', '"outcome":"ok"', 1)  # an edited entry is caught
    node.audit.path.write_text("\n".join(lines) + "\n")
    assert CliRunner().invoke(app, ["audit", "verify", str(node.audit.path), "--public-key", str(pub)]).exit_code == 1


def test_trust_site_takes_effect_without_a_restart_and_a_bad_key_file_fails_closed(launch, tls, crops, tmp_path, template_bytes):
    from megaportrait.shared.cli import app
    from megaportrait.shared.crypto import ed25519_public_pem
    from typer.testing import CliRunner

    run = launch()
    client = run.client(tls["site-n"])  # a site submits only its own payloads, over its own certificate
    newcomer = Ed25519PrivateKey.generate()
    sealed = _seal(crops, run.node, newcomer, site_id="site-n")
    _refused(lambda: _submit(client, sealed, template_bytes), grpc.StatusCode.UNAUTHENTICATED, "unknown_site")
    (tmp_path / "site-n.pem").write_bytes(ed25519_public_pem(newcomer))
    result = CliRunner().invoke(app, ["render-node", "trust-site", "--state-dir", str(tmp_path / "state"), "--site-id", "site-n",
                                      "--key", str(tmp_path / "site-n.pem")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert _submit(client, sealed, template_bytes).state == pb.JOB_STATE_QUEUED  # the running node took the new key

    junk = tmp_path / "state" / "trusted_sites" / "site-j" / ("0" * 64 + ".pem")
    junk.parent.mkdir()
    junk.write_text("not a key")
    second = _seal(crops, run.node, newcomer, site_id="site-n", job_id="job-2")
    detail = _refused(lambda: _submit(client, second, template_bytes, job_id="job-2"), grpc.StatusCode.UNAVAILABLE, "trusted_sites_unavailable")
    assert str(junk) in detail
    with pytest.raises(RuntimeError, match="cannot be read"):
        run.node.health_checks()["trusted_sites"]()
    junk.unlink()
    assert _submit(client, second, template_bytes, job_id="job-2").state == pb.JOB_STATE_QUEUED
    run.node.health_checks()["trusted_sites"]()
    reloads = [(a, o) for a, o, _ in _audit_rows(run.node) if a == "trust.reload"]
    assert reloads == [("trust.reload", "ok"), ("trust.reload", "failed"), ("trust.reload", "ok")]


def test_payload_sealed_before_a_person_deletion_is_refused(launch, tls, crops, site_key, template_bytes):
    run = launch()
    client = run.client(tls["site-a"])
    early = _seal(crops, run.node, site_key, job_id="job-early", now=time.time() - 5)
    _submit(client, _seal(crops, run.node, site_key), template_bytes)
    client.DeletePerson(pb.DeletePersonRequest(person_ref=crops.person_ref), timeout=TIMEOUT)
    detail = _refused(lambda: _submit(client, early, template_bytes, job_id="job-early"), grpc.StatusCode.PERMISSION_DENIED, "consent_revoked")
    assert "seal a new payload" in detail
    later = _seal(crops, run.node, site_key, job_id="job-later", now=time.time() + 2)  # sealed after a new consent check
    assert _submit(client, later, template_bytes, job_id="job-later").state == pb.JOB_STATE_QUEUED


class TestDoubleFailing(TestDoublePaste):
    """Test double: every render fails with a reason code."""

    __test__ = False
    name = "test-double-failing"

    def render(self, job_id, template, identity, *, stages, seed, params, progress):
        from megaportrait.shared.errors import MegaPortraitError

        raise MegaPortraitError("this double always fails", reason="test_double_failure")


def test_health_endpoint_and_job_metrics_follow_the_node(launch, tls, crops, site_key, template_bytes, monkeypatch):
    import urllib.error
    import urllib.request

    from megaportrait.server.render.service import start_health

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(health.url + path, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    release = threading.Event()
    run = launch(release, start_workers=False)
    run.node.registry.register("test-double-failing", lambda s: TestDoubleFailing(), payload_kind="face_crops")
    health = start_health(run.node, "127.0.0.1:0")
    try:
        status, body = get("/healthz")
        failing = {c["name"]: c["detail"] for c in json.loads(body)["checks"] if not c["ok"]}
        assert status == 503 and set(failing) == {"workers", "retention"} and "not been started" in failing["workers"]
        run.node.start()
        assert get("/healthz")[0] == 200

        client = run.client(tls["site-a"])
        _submit(client, _seal(crops, run.node, site_key, job_id="ok-1"), template_bytes, job_id="ok-1")
        assert _follow(client, "ok-1")[-1].state == pb.JOB_STATE_SUCCEEDED
        _submit(client, _seal(crops, run.node, site_key, job_id="bad-1", backend="test-double-failing"), template_bytes,
                job_id="bad-1", backend="test-double-failing")  # fmt: skip
        assert _follow(client, "bad-1")[-1].error_reason == "test_double_failure"
        with pytest.raises(grpc.RpcError):
            _submit(client, _seal(crops, run.node, site_key, job_id="old-1", ttl_s=30, now=time.time() - 60), template_bytes, job_id="old-1")
        for job_id in ("slow-1", "slow-2"):  # one worker: slow-1 runs, slow-2 waits
            _submit(client, _seal(crops, run.node, site_key, job_id=job_id, backend="test-double-blocking"), template_bytes,
                    job_id=job_id, backend="test-double-blocking")  # fmt: skip
        _wait_state(client, "slow-1", pb.JOB_STATE_RUNNING)
        status, metrics = get("/metrics")
        assert status == 200
        for line in (
            'megaportrait_render_jobs_submitted_total{backend="test-double-paste"} 1.0',
            'megaportrait_render_jobs_submitted_total{backend="test-double-blocking"} 2.0',
            'megaportrait_render_jobs_completed_total{backend="test-double-paste"} 1.0',
            'megaportrait_render_jobs_failed_total{backend="test-double-failing",reason="test_double_failure"} 1.0',
            'megaportrait_render_submissions_refused_total{reason="payload_expired"} 1.0',
            'megaportrait_render_seconds_count{backend="test-double-paste"} 1.0',
            "megaportrait_render_queue_depth 1.0",
            "megaportrait_render_jobs_running 1.0",
            'megaportrait_health_check_ok{check="audit_log"} 1.0',
        ):
            assert line in metrics, line
        release.set()
        assert _follow(client, "slow-2")[-1].state == pb.JOB_STATE_SUCCEEDED
        assert "megaportrait_render_queue_depth 0.0" in get("/metrics")[1]

        # the audit log fails (disk full): submissions are refused, nothing is stored, and /healthz says why
        def disk_full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(run.node.audit, "append", disk_full)
        _refused(lambda: _submit(client, _seal(crops, run.node, site_key, job_id="lost-1"), template_bytes, job_id="lost-1"),
                 grpc.StatusCode.UNAVAILABLE, "audit_error")  # fmt: skip
        _refused(lambda: client.GetJob(pb.JobRef(job_id="lost-1"), timeout=TIMEOUT), grpc.StatusCode.NOT_FOUND, "job_not_found")
        status, body = get("/healthz")
        failing = {c["name"]: c["detail"] for c in json.loads(body)["checks"] if not c["ok"]}
        assert status == 503 and list(failing) == ["audit_log"] and "No space left on device" in failing["audit_log"]
        assert "megaportrait_audit_append_failures_total 2.0" in get("/metrics")[1]  # the decryption entry and the refusal
        monkeypatch.undo()
        _submit(client, _seal(crops, run.node, site_key, job_id="ok-2"), template_bytes, job_id="ok-2")
        assert get("/healthz")[0] == 200
    finally:
        health.stop()


# ---------------------------------------------------------------------------------------------- hostile input (issue 18)


def test_a_payload_submitted_over_another_sites_certificate_is_refused_and_consumes_nothing(launch, tls, crops, site_key, template_bytes):
    """Site B submits site A's signed payload first: refused (site_mismatch, audited); A then submits and owns its job."""
    run = launch()
    site_a, site_b = run.client(tls["site-a"]), run.client(tls["site-b"])
    sealed = _seal(crops, run.node, site_key)
    detail = _refused(lambda: _submit(site_b, sealed, template_bytes), grpc.StatusCode.PERMISSION_DENIED, "site_mismatch")
    assert "'site-a'" in detail and "'site-b'" in detail
    _refused(lambda: site_b.GetJob(pb.JobRef(job_id="job-1"), timeout=TIMEOUT), grpc.StatusCode.NOT_FOUND, "job_not_found")
    assert _submit(site_a, sealed, template_bytes).state == pb.JOB_STATE_QUEUED  # nonce and job id were not consumed
    assert _follow(site_a)[-1].state == pb.JOB_STATE_SUCCEEDED
    assert site_a.FetchResult(pb.JobRef(job_id="job-1"), timeout=TIMEOUT).png
    _refused(lambda: site_b.FetchResult(pb.JobRef(job_id="job-1"), timeout=TIMEOUT), grpc.StatusCode.PERMISSION_DENIED, "not_job_owner")
    assert ("job.submit", "refused", "site_mismatch") in _audit_rows(run.node)


def test_an_undecodable_request_gets_invalid_argument_and_a_log_line_without_its_bytes(launch, tls, caplog):
    run = launch()
    channel = client_channel(f"localhost:{run.port}", tls["site-a"])
    run.channels.append(channel)
    garbage = b"\x1a\x40SECRET-PAYLOAD-BYTES"  # field 3 (sealed_payload) announces 64 bytes and carries 20
    caplog.set_level("INFO", logger="megaportrait.render.service")
    for method in ("SubmitJob", "GetJob"):
        call = channel.unary_unary(f"/megaportrait.render.v1.RenderNode/{method}")
        with pytest.raises(grpc.RpcError) as err:
            call(garbage, timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert err.value.details().startswith("request_undecodable:")
    stream = channel.unary_stream("/megaportrait.render.v1.RenderNode/StreamProgress")
    with pytest.raises(grpc.RpcError) as err:
        list(stream(garbage, timeout=TIMEOUT))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    lines = [r.getMessage() for r in caplog.records if "request_undecodable" in r.getMessage()]
    assert len(lines) == 3 and "/SubmitJob (22 bytes)" in lines[0], lines
    assert not any("SECRET" in r.getMessage() for r in caplog.records)


def test_the_template_is_checked_before_the_payload_is_decrypted(launch, tls, crops, site_key):
    run = launch()
    client = run.client(tls["site-a"])
    _refused(lambda: _submit(client, _seal(crops, run.node, site_key), b"not an image"), grpc.StatusCode.INVALID_ARGUMENT, "invalid_template")
    rows = _audit_rows(run.node)
    assert ("job.submit", "refused", "invalid_template") in rows
    assert not [r for r in rows if r[0] == "payload.decrypt"]  # nothing was opened for a request that was refused anyway


def test_sites_witness_the_nodes_checkpoints_which_catch_its_log_truncated(launch, tls, crops, site_key, template_bytes, tmp_path):
    """Every status, result and deletion confirmation carries the node's signed checkpoint; the site keeps them. Cutting
    the node's log and its own checkpoint file is then caught by `audit verify --witness`, naming the missing entries."""
    from megaportrait.shared import audit
    from megaportrait.shared.cli import app
    from typer.testing import CliRunner

    run = launch()
    client = run.client(tls["site-a"])
    witness = audit.WitnessStore(tmp_path / "site" / "witness")
    replies = [_submit(client, _seal(crops, run.node, site_key), template_bytes)]
    _follow(client)
    replies.append(client.GetJob(pb.JobRef(job_id="job-1"), timeout=TIMEOUT))
    replies.append(client.FetchResult(pb.JobRef(job_id="job-1"), timeout=TIMEOUT))
    replies.append(client.DeleteJobs(pb.DeleteJobsRequest(job_ids=["job-1"]), timeout=TIMEOUT))
    assert all(r.HasField("audit_checkpoint") for r in replies)
    for reply in replies:
        witness.keep_reply(reply)
    sizes = [r.audit_checkpoint.size for r in replies]
    assert sizes == sorted(sizes) and sizes[-1] == len(_audit_rows(run.node))  # the last covers the deletion's own entry
    node = run.node
    run.stop()

    path = node.audit.path
    pub = str(tmp_path / "state" / "audit" / "signing.key.pub")
    lines = path.read_text().splitlines()
    cut = sizes[0]  # keep what the node had written when it accepted the job; drop its render, fetch and deletion
    path.write_text("".join(line + "\n" for line in lines[:cut]))
    Path(f"{path}.checkpoints").write_text("")
    runner = CliRunner()
    assert runner.invoke(app, ["audit", "verify", str(path), "--public-key", pub]).exit_code == 0  # fooled without a witness
    res = runner.invoke(app, ["audit", "verify", str(path), "--public-key", pub, "--witness", str(tmp_path / "site" / "witness")])
    assert res.exit_code == 1, res.output
    assert f"seqs {cut}..{sizes[-1] - 1} missing" in res.output, res.output
