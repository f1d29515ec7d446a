"""Retention: the sweeper deletes exactly what the policy says is too old, proves it is gone, and audits it."""
from __future__ import annotations

import hashlib
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from megaportrait.shared import audit
from megaportrait.shared.policy import load_retention_policy
from megaportrait.shared.retention import FileStore, RetainedItem, RetentionSweeper

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc)


@pytest.fixture()
def log(tmp_path):
    return audit.AuditLog(tmp_path / "audit.jsonl", audit.generate_signing_key(tmp_path / "k"), component="site:alpha", checkpoint_every=0)


@pytest.fixture()
def policy():
    return load_retention_policy(REPO / "policies" / "retention.yaml")


def test_sweep_deletes_only_expired_items_and_they_cannot_be_read_back(tmp_path, log, policy, people):
    photos = FileStore(tmp_path / "photos", "source_photos")  # keep 30d
    adapters = FileStore(tmp_path / "adapters", "personal_adapters")  # keep 1y
    old_photo = photos.put("person-obama", "old.jpg", people["obama"][0].read_bytes(), created_at=NOW - timedelta(days=31))
    edge = photos.put("person-obama", "edge.jpg", people["obama"][1].read_bytes(), created_at=NOW - timedelta(days=30))
    fresh = photos.put("person-biden", "new.jpg", people["biden"][0].read_bytes(), created_at=NOW - timedelta(days=29, hours=23))
    adapter_40d = adapters.put("person-obama", "a.safetensors", b"\x01" * 512, created_at=NOW - timedelta(days=40))
    adapter_2y = adapters.put("person-biden", "b.safetensors", b"\x02" * 512, created_at=NOW - timedelta(days=730))
    assert old_photo.digest == hashlib.sha256(people["obama"][0].read_bytes()).hexdigest()

    sweeper = RetentionSweeper(policy, {"source_photos": photos, "personal_adapters": adapters}, log, actor="retention:site:alpha")
    assert {i.item_id for i in sweeper.expired(NOW)} == {old_photo.item_id, edge.item_id, adapter_2y.item_id}
    seen = []
    report = sweeper.sweep(NOW, progress=lambda done, total: seen.append((done, total)))
    assert report.ok and report.deleted_count == 3 and report.kept == 2
    assert sorted(report.deleted["source_photos"]) == sorted([old_photo.digest, edge.digest])
    assert report.deleted["personal_adapters"] == [adapter_2y.digest]
    assert seen == [(1, 3), (2, 3), (3, 3)]
    for item, store in ((old_photo, photos), (edge, photos), (adapter_2y, adapters)):
        assert store.is_gone(item)
        with pytest.raises(FileNotFoundError):
            store.read(item)
    assert photos.read(fresh) == people["biden"][0].read_bytes() and adapters.read(adapter_40d) == b"\x01" * 512

    entries = list(audit.read_entries(log.path))
    deletes = [e for e in entries if e.action == "retention.delete"]
    assert {e.data[0] for e in deletes} == {old_photo.digest, edge.digest, adapter_2y.digest}
    assert all(e.outcome == "ok" and e.policy == policy.version_hash and e.actor == "retention:site:alpha" for e in deletes)
    assert next(e for e in deletes if e.data[0] == adapter_2y.digest).detail["keep_s"] == 365 * 86400
    assert (entries[-1].action, entries[-1].detail) == ("retention.sweep", {"deleted": 3, "failed": 0, "kept": 2})
    assert audit.verify(log.path, log.public_key).ok
    # A second sweep finds nothing more to do.
    assert sweeper.sweep(NOW).deleted_count == 0


class _LeakyStore:
    """A store whose delete does nothing: the sweeper must notice and say so."""

    def __init__(self) -> None:
        self.items = [RetainedItem("outputs", "job-1", NOW - timedelta(days=8), "ef" * 32, "person-x")]

    def list(self, kind):
        return list(self.items) if kind == "outputs" else []

    def delete(self, item):
        pass

    def is_gone(self, item):
        return item not in self.items


def test_a_deletion_that_did_not_happen_is_reported_and_audited_as_failed(log, policy):
    report = RetentionSweeper(policy, {"outputs": _LeakyStore()}, log).sweep(NOW)
    assert not report.ok and report.deleted_count == 0
    assert report.failed[0][1] == "still readable after delete"
    bad = [e for e in audit.read_entries(log.path) if e.outcome == "failed"]
    assert [(e.action, e.person, e.data) for e in bad] == [("retention.delete", "person-x", ("ef" * 32,)), ("retention.sweep", "", ())]
    assert bad[0].detail["reason"] == "still readable after delete" and bad[1].detail["failed"] == 1


def test_unknown_kind_is_refused(log, policy, tmp_path):
    with pytest.raises(ValueError, match="selfies"):
        RetentionSweeper(policy, {"selfies": _LeakyStore()}, log)
    with pytest.raises(ValueError, match="unknown data kind"):
        FileStore(tmp_path / "x", "selfies")
    with pytest.raises(ValueError, match="unsafe path part"):
        FileStore(tmp_path / "y", "outputs").put("../escape", "a.png", b"")


def test_sweeper_runs_at_start_up_and_on_its_interval(tmp_path, log):
    text = (REPO / "policies" / "retention.yaml").read_text().replace("interval: 1h", "interval: 1s")
    (tmp_path / "retention.yaml").write_text(text)
    policy = load_retention_policy(tmp_path / "retention.yaml")
    outputs = FileStore(tmp_path / "outputs", "outputs")
    old = outputs.put("person-x", "p.png", b"png", created_at=datetime.now(timezone.utc) - timedelta(days=8))
    stop = threading.Event()
    thread = RetentionSweeper(policy, {"outputs": outputs}, log).run_every(stop)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        sweeps = [e for e in audit.read_entries(log.path) if e.action == "retention.sweep"]
        if len(sweeps) >= 2:
            break
        time.sleep(0.1)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    assert len(sweeps) >= 2 and sweeps[0].detail["deleted"] == 1  # the start-up sweep removed the old output
    assert outputs.is_gone(old)


class RenderJobRetention:
    """The render node's job store seen by the sweeper: a job (payload + output, one data key) is one item.

    Built only on the job store's public API; this is the adapter the render node registers for `render_payloads`
    (a job's payload and output share one key, so the shorter `keep` of the two applies to the whole job).
    """

    def __init__(self, store) -> None:
        self.store = store

    def list(self, kind):
        if kind != "render_payloads":
            return []
        from megaportrait.server.render.jobs import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED

        rows = [self.store.get(j) for j in self.store.ids_in_state(QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)]
        return [RetainedItem(kind, r.job_id, datetime.fromisoformat(r.created_at), r.payload_sha256, r.person_ref) for r in rows]

    def delete(self, item):
        self.store.delete([item.item_id], reason="retention")

    def is_gone(self, item):
        from megaportrait.server.render.jobs import JobNotFound

        try:
            self.store.load_inputs(item.item_id)
        except JobNotFound:
            return self.store.find(item.item_id) is None
        return False


def test_sweep_on_the_render_nodes_job_store(tmp_path, log, policy, templates):
    node_mod = pytest.importorskip("megaportrait.server.render.node", reason="render node not present")
    import os

    from megaportrait.server.render.jobs import JobNotFound, NewJob
    from megaportrait.server.render.payloads import TrustedSites
    from megaportrait.shared.records import StageSwitches

    node = node_mod.RenderNode(tmp_path / "node", identity=node_mod.NodeIdentity.generate("n1"), trusted=TrustedSites())
    store = node.store
    for job_id in ("j-1", "j-2"):
        new = NewJob(job_id=job_id, backend="classic", payload_kind="face_crops", person_ref="person-x", consent_ref="r" * 32,
                     site_id="alpha", owner="site:alpha", nonce=os.urandom(16).hex(), payload_expires_at=2_000_000_000,
                     stages=StageSwitches(), seed=0, params={})  # fmt: skip
        store.create(new, os.urandom(256), templates[0].read_bytes())
    sweeper = RetentionSweeper(policy, {"render_payloads": RenderJobRetention(store)}, log, actor="retention:render-node")
    now = datetime.now(timezone.utc)
    early = sweeper.sweep(now + timedelta(hours=23))  # render_payloads keep 1d
    assert early.ok and early.deleted_count == 0 and early.kept == 2
    late = sweeper.sweep(now + timedelta(hours=25))
    assert late.ok and late.deleted_count == 2
    for job_id in ("j-1", "j-2"):
        assert store.find(job_id) is None and store.tombstone(job_id)["reason"] == "retention"
        with pytest.raises(JobNotFound):
            store.load_inputs(job_id)
    node.stop()
