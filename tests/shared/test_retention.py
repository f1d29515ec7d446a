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


class _BrokenStore:
    """A store that cannot even be listed (its database is gone): a whole sweep fails."""

    def __init__(self) -> None:
        self.calls = 0

    def list(self, kind):
        self.calls += 1
        raise OSError("database disk image is malformed")

    def delete(self, item):
        raise AssertionError("nothing was listed")

    def is_gone(self, item):
        raise AssertionError("nothing was listed")


def test_periodic_sweeper_survives_a_failed_sweep_and_says_so(tmp_path, log):
    text = (REPO / "policies" / "retention.yaml").read_text().replace("interval: 1h", "interval: 1s")
    (tmp_path / "retention.yaml").write_text(text)
    policy = load_retention_policy(tmp_path / "retention.yaml")
    broken = _BrokenStore()
    sweeper = RetentionSweeper(policy, {"outputs": broken}, log)
    stop = threading.Event()
    thread = sweeper.run_every(stop)
    deadline = time.monotonic() + 10
    while broken.calls < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(5)
    assert broken.calls >= 2  # the loop went on after the first failure
    assert sweeper.last_error == "OSError: database disk image is malformed" and sweeper.last_report is None
    failed = [e for e in audit.read_entries(log.path) if e.action == "retention.sweep"]
    assert failed and all(e.outcome == "failed" and e.detail == {"error": sweeper.last_error} for e in failed)


def test_sweeper_clock_decides_what_is_old(tmp_path, log, policy):
    outputs = FileStore(tmp_path / "outputs", "outputs")  # keep 7d
    item = outputs.put("person-x", "p.png", b"png", created_at=NOW - timedelta(days=1))
    now = {"t": NOW}
    seen = []
    sweeper = RetentionSweeper(policy, {"outputs": outputs}, log, clock=lambda: now["t"], on_report=seen.append)
    assert sweeper.sweep().deleted_count == 0 and not outputs.is_gone(item)
    now["t"] = NOW + timedelta(days=6)
    report = sweeper.sweep()
    assert report.deleted == {"outputs": [item.digest]} and outputs.is_gone(item)
    assert len(seen) == 2 and seen[-1] is report and sweeper.last_report is report
    assert report.at == NOW + timedelta(days=6)


def test_extra_kinds_are_kept_as_long_as_their_own_rule_says(log, policy):
    store = _LeakyStore()
    store.items = [RetainedItem("consent_receipts", "r-1", NOW - timedelta(days=8), "ab" * 32, "person-x")]
    store.list = lambda kind: list(store.items) if kind == "consent_receipts" else []
    store.delete = lambda item: store.items.remove(item)
    sweeper = RetentionSweeper(policy, {"consent_receipts": store}, log, extra_keep={"consent_receipts": timedelta(days=9)})
    assert sweeper.keep("consent_receipts") == timedelta(days=9) and sweeper.keep("outputs") == policy.keep("outputs")
    assert sweeper.sweep(NOW).deleted_count == 0
    assert sweeper.sweep(NOW + timedelta(days=1)).deleted == {"consent_receipts": ["ab" * 32]}
    (entry,) = [e for e in audit.read_entries(log.path) if e.action == "retention.delete"]
    assert entry.detail == {"kind": "consent_receipts", "age_s": 9 * 86400, "keep_s": 9 * 86400}
    with pytest.raises(ValueError, match="ruled by the retention policy"):
        RetentionSweeper(policy, {}, log, extra_keep={"outputs": timedelta(days=1)})
