"""The render node's retention: policies loaded and checked at start, payloads and outputs swept at start-up and on
the policy's interval (a clock the test controls decides what is old), deletions read back and audited.

Jobs go through `RenderNode.submit` (real sealed payloads of real face crops) and render with a test double that
pastes the first crop into the template, or blocks until released.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from megaportrait.client.payload import seal_face_crops_unchecked
from megaportrait.server.render.backends import default_registry
from megaportrait.server.render.jobs import TERMINAL, JobNotFound, NewJob
from megaportrait.server.render.node import NodeIdentity, RenderNode, SubmitRequest
from megaportrait.server.render.payloads import TrustedSites
from megaportrait.server.render.retention import RenderJobRetention, load_node_policies
from megaportrait.shared import audit
from megaportrait.shared.crypto import DecryptionFailed, decrypt_at_rest
from megaportrait.shared.payload_format import CLASSIC_CROP_PURPOSE
from megaportrait.shared.policy import PolicyError, load_retention_policy
from megaportrait.shared.records import Portrait, StageSwitches, sha256_hex
from megaportrait.shared.retention import RetentionSweeper

REPO = Path(__file__).resolve().parents[3]
SHIPPED = REPO / "policies"


class Paste:
    """Test double, not a backend: pastes the first face crop into the template's corner."""

    name = "test-double-paste"

    def render(self, job_id, template, identity, *, stages, seed, params, progress):
        out = template.pixels.copy()
        crop = identity.crops[0].pixels[:32, :32]
        out[: crop.shape[0], : crop.shape[1]] = crop
        progress("identity", 1.0)
        return Portrait(job_id=job_id, pixels=out, metadata={"test_double": True})


class Blocking(Paste):
    """Test double: reports progress every 10 ms until `release` is set."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def render(self, job_id, template, identity, *, stages, seed, params, progress):
        while not self.release.is_set():
            progress("identity", 0.5)
            time.sleep(0.01)
        return super().render(job_id, template, identity, stages=stages, seed=seed, params=params, progress=progress)


@pytest.fixture(scope="module")
def crops(people):
    from megaportrait.client.faces import face_crop_set, intake_photos

    return face_crop_set("person-7f3a", intake_photos(people["obama"][:1], show_progress=False))


def _policy_dir(tmp_path: Path, **replace: str) -> Path:
    """The shipped policies with some lines of retention.yaml replaced (old text -> new text)."""
    d = tmp_path / "policies"
    d.mkdir(exist_ok=True)
    (d / "consent.yaml").write_bytes((SHIPPED / "consent.yaml").read_bytes())
    text = (SHIPPED / "retention.yaml").read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    (d / "retention.yaml").write_text(text)
    return d


SHORT = {
    "render_payloads:      # sealed payloads held by the render node (crypto-shredded: the per-payload key is destroyed)\n    keep: 1d":
        "render_payloads:\n    keep: 1h",
    "outputs:              # finished portraits, on the render node until collected\n    keep: 7d": "outputs:\n    keep: 2h",
    "interval: 1h": "interval: 1s",
}  # fmt: skip


class Clock:
    """The node's idea of now: the real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(timezone.utc) + self.offset


def _node(tmp_path, policies, clock, release):
    state = tmp_path / "state"
    if not (state / "keys").is_dir():
        NodeIdentity.generate("node-r").save(state)
    registry = default_registry()
    registry.register("test-double-paste", lambda s: Paste(), payload_kind="face_crops")
    registry.register("test-double-blocking", lambda s: Blocking(release), payload_kind="face_crops")
    return RenderNode.from_state_dir(state, registry=registry, policies=policies, clock=clock)


def _submit(node, crops, site_key, template, job_id, backend="test-double-paste"):
    sealed = seal_face_crops_unchecked(crops, job_id=job_id, consent_ref="receipt-1", consent_scope=CLASSIC_CROP_PURPOSE,
                                       recipient=node.identity.public().hpke, site_id="site-a", site_key=site_key, backend=backend)  # fmt: skip
    node.submit(SubmitRequest(job_id=job_id, sealed_payload=sealed, consent_ref="receipt-1", template_image=template, backend=backend), "site-a")
    return sealed


@pytest.fixture(scope="module")
def template() -> bytes:
    import skimage.data

    from megaportrait.shared.imaging import encode_png

    return encode_png(skimage.data.astronaut()[:200, :160].copy())


def _wait(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_node_sweeps_at_start_up_and_on_its_interval_and_audits_each_deletion(tmp_path, crops, template):
    policies = load_node_policies(*(_policy_dir(tmp_path, **SHORT) / f for f in ("consent.yaml", "retention.yaml")))
    site_key = Ed25519PrivateKey.generate()
    TrustedSites().add("site-a", site_key.public_key(), tmp_path / "state" / "trusted_sites")
    clock, release = Clock(), threading.Event()
    node = _node(tmp_path, policies, clock, release)
    node.start()
    _submit(node, crops, site_key, template, "job-done")
    _wait(lambda: node.store.get("job-done").state == "succeeded", "job-done to finish")
    _submit(node, crops, site_key, template, "job-stuck", backend="test-double-blocking")
    _wait(lambda: node.store.get("job-stuck").state == "running", "job-stuck to run")
    png, _ = node.result("job-done", "site-a")
    db = sqlite3.connect(tmp_path / "state" / "jobs.sqlite")
    old_key_wrapped = db.execute("SELECT key FROM data_keys WHERE job_id = 'job-done'").fetchone()[0]
    old_payload_blob = db.execute("SELECT data FROM blobs WHERE job_id = 'job-done' AND name = 'sealed_payload'").fetchone()[0]
    payload_sha = node.store.get("job-done").payload_sha256

    time.sleep(1.5)  # a periodic sweep at "now" deletes nothing
    assert node.store.find("job-done") and node.store.find("job-stuck")
    clock.offset = timedelta(minutes=61)  # past render_payloads (1h), not outputs (2h)
    _wait(lambda: node.store.find("job-stuck") is None, "the periodic sweep to delete the stuck job")
    _wait(lambda: not _holds_inputs(node, "job-done"), "the periodic sweep to shred job-done's inputs")
    # job-done: inputs unreadable, result still served, old data key destroyed (an old copy of the payload blob is dead)
    with pytest.raises(JobNotFound, match="sealed_payload"):
        node.store.load_inputs("job-done")
    assert node.result("job-done", "site-a")[0] == png
    new_key_wrapped = db.execute("SELECT key FROM data_keys WHERE job_id = 'job-done'").fetchone()[0]
    assert new_key_wrapped != old_key_wrapped and db.execute("SELECT count(*) FROM data_keys WHERE key = ?", (old_key_wrapped,)).fetchone()[0] == 0
    store_key = (tmp_path / "state" / "keys" / "store.key").read_bytes()
    new_key = decrypt_at_rest(store_key, new_key_wrapped, b"megaportrait/render-data-key/v1\0job-done")
    with pytest.raises(DecryptionFailed):
        decrypt_at_rest(new_key, old_payload_blob, b"megaportrait/render-job-blob/v1\0job-done\0sealed_payload")
    assert node.store.tombstone("job-stuck")["reason"] == "retention"
    assert node.metrics.registry.get_sample_value("megaportrait_retention_deleted_total", {"kind": "render_payloads"}) == 2
    assert node.metrics.registry.get_sample_value("megaportrait_retention_failed_total", {"kind": "render_payloads"}) is None
    release.set()
    node.stop()

    # Restart with the clock past outputs (2h): the start-up sweep removes job-done before anything else runs.
    clock.offset = timedelta(hours=3)
    node = _node(tmp_path, policies, clock, release)
    node.start()
    assert node.store.find("job-done") is None and node.store.tombstone("job-done")["reason"] == "retention"
    assert not node.store.holds_data("job-done")
    node.health_checks()["retention"]()  # the last sweep deleted everything it had to
    node.stop()
    db.close()

    log_path = tmp_path / "state" / "audit" / "audit.jsonl"
    entries = list(audit.read_entries(log_path))
    deletes = [e for e in entries if e.action == "retention.delete"]
    assert [(e.outcome, e.detail["kind"]) for e in deletes] == [("ok", "render_payloads"), ("ok", "render_payloads"), ("ok", "outputs")]
    assert {d for e in deletes for d in e.data} == {payload_sha, sha256_hex(png), _payload_sha(entries, "job-stuck")}
    assert all(e.actor == "retention:render-node:node-r" and e.policy == policies.retention.version_hash for e in deletes)
    assert all(e.person == "person-7f3a" for e in deletes)
    sweeps = [e for e in entries if e.action == "retention.sweep"]
    assert sweeps[0].detail == {"deleted": 0, "failed": 0, "kept": 0}  # the first start-up sweep, before any job
    assert sweeps[-1].detail["deleted"] == 1 and all(s.outcome == "ok" for s in sweeps)
    assert audit.verify(log_path, audit.load_public_key(Path(f"{tmp_path}/state/audit/signing.key.pub"))).ok


def _holds_inputs(node, job_id: str) -> bool:
    try:
        node.store.load_inputs(job_id)
    except JobNotFound:
        return False
    return True


def _payload_sha(entries, job_id: str) -> str:
    return next(e.data[0] for e in entries if e.action == "job.submit" and e.detail.get("job_id") == job_id and e.outcome == "ok")


def test_job_store_adapter_deletes_queued_jobs_whole_and_reads_each_back(tmp_path, templates):
    """Moved from tests/shared: jobs placed straight into the store, swept under the shipped policy (payloads 1d)."""
    import os

    node = RenderNode(tmp_path / "node", identity=NodeIdentity.generate("n1"), trusted=TrustedSites())
    store = node.store
    for job_id in ("j-1", "j-2"):
        new = NewJob(job_id=job_id, backend="classic", payload_kind="face_crops", person_ref="person-x", consent_ref="r" * 32,
                     site_id="alpha", owner="site:alpha", nonce=os.urandom(16).hex(), payload_expires_at=2_000_000_000,
                     stages=StageSwitches(), seed=0, params={})  # fmt: skip
        store.create(new, os.urandom(256), templates[0].read_bytes())
    log = audit.AuditLog(tmp_path / "audit.jsonl", audit.generate_signing_key(tmp_path / "k"), component="render-node:n1", checkpoint_every=0)
    policy = load_retention_policy(SHIPPED / "retention.yaml")
    sweeper = RetentionSweeper(policy, {"render_payloads": RenderJobRetention(store), "outputs": RenderJobRetention(store)}, log)
    now = datetime.now(timezone.utc)
    early = sweeper.sweep(now + timedelta(hours=23))
    assert early.ok and early.deleted_count == 0 and early.kept == 2
    late = sweeper.sweep(now + timedelta(hours=25))
    assert late.ok and late.deleted_count == 2
    assert sorted(late.deleted["render_payloads"]) == sorted(store.tombstone(j)["payload_sha256"] for j in ("j-1", "j-2"))
    for job_id in ("j-1", "j-2"):
        assert store.find(job_id) is None and store.tombstone(job_id)["reason"] == "retention"
        with pytest.raises(JobNotFound):
            store.load_inputs(job_id)
    assert not set(store.ids_in_state(*TERMINAL))
    node.stop()


def test_a_bad_policy_file_stops_the_node_at_start_with_file_and_line(tmp_path):
    bad = _policy_dir(tmp_path, **{"keep: 7d": "keep: seven days"})
    with pytest.raises(PolicyError) as err:
        load_node_policies(bad / "consent.yaml", bad / "retention.yaml")
    line = next(n for n, text in enumerate((bad / "retention.yaml").read_text().splitlines(), 1) if "seven days" in text)
    assert err.value.line == line and str(err.value).startswith(f"{bad / 'retention.yaml'}:{line}:")

    # `render-node serve` refuses to start on it, naming the file and line, before it opens anything
    from megaportrait.shared.cli import app

    state = tmp_path / "state"
    assert CliRunner().invoke(app, ["render-node", "keygen", "--state-dir", str(state)]).exit_code == 0
    config = tmp_path / "render-node.yaml"
    config.write_text(f"policy:\n  consent_file: {bad / 'consent.yaml'}\n  retention_file: {bad / 'retention.yaml'}\n")
    result = CliRunner().invoke(app, ["render-node", "serve", "--state-dir", str(state), "--config", str(config), "--listen", "127.0.0.1:0"])
    assert result.exit_code == 2, result.output
    assert f"{bad / 'retention.yaml'}:{line}:" in result.output and "not a duration" in result.output
    assert not (state / "jobs.sqlite").exists() and not (state / "audit").exists()

    # a consent policy without a purpose the node checks payloads against is refused too
    text = (SHIPPED / "consent.yaml").read_text()
    cut = text[text.index("  render:"): text.index("  classic_face_crop_payload:")]
    no_render = tmp_path / "no-render"
    no_render.mkdir()
    (no_render / "consent.yaml").write_text(text.replace(cut, "").replace("    requires: [render]\n", ""))
    policies = load_node_policies(no_render / "consent.yaml", SHIPPED / "retention.yaml")
    with pytest.raises(PolicyError, match="purposes render are checked by the code"):
        RenderNode(tmp_path / "n2", identity=NodeIdentity.generate("n2"), trusted=TrustedSites(), policies=policies)
