"""The SQLite job store on its own: idempotent create, conflicts, replay, restart recovery, crypto-shredding."""
from __future__ import annotations

import sqlite3

import pytest

from megaportrait.server.render.jobs import (
    CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobConflict, JobNotFound, JobNotReady, JobStore, NewJob,
)
from megaportrait.shared.crypto import DecryptionFailed, decrypt_at_rest, new_data_key
from megaportrait.shared.payload_format import PayloadReplayed
from megaportrait.shared.records import StageSwitches


STORE_KEY = new_data_key()


def _job(job_id="job-1", nonce="a" * 32, person="person-1", request="r1") -> NewJob:
    return NewJob(job_id=job_id, backend="classic", payload_kind="face_crops", person_ref=person, consent_ref="c-1",
                  site_id="site-a", owner="site-a", nonce=nonce, payload_expires_at=2_000_000_000, request_sha256=request,
                  stages=StageSwitches(shading=False), seed=7, params={"strength": 0.5})


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite", store_key=STORE_KEY)
    yield s
    s.close()


@pytest.fixture(scope="module")
def template(templates) -> bytes:
    return templates[1].read_bytes()


def test_create_is_idempotent_and_refuses_a_different_payload(store, template):
    row, existing = store.create(_job(), b"sealed-1", template)
    assert not existing and row.state == QUEUED and row.stages == StageSwitches(shading=False) and row.params == {"strength": 0.5}
    again, existing = store.create(_job(), b"sealed-1", template)
    assert existing and again == row
    with pytest.raises(JobConflict, match="different payload"):
        store.create(_job(nonce="b" * 32, request="r2"), b"sealed-2", template)
    with pytest.raises(JobConflict, match="different template, backend or parameters"):
        store.create(_job(request="r3"), b"sealed-1", template)
    with pytest.raises(PayloadReplayed, match="job-1"):
        store.create(_job(job_id="job-2", request="r4"), b"sealed-1-again", template)  # the nonce is consumed


def test_inputs_and_results_are_encrypted_at_rest(store, template, tmp_path):
    store.create(_job(), b"sealed-payload-bytes", template)
    assert store.load_inputs("job-1") == (b"sealed-payload-bytes", template)
    with pytest.raises(JobNotReady) as err:
        store.load_result("job-1")
    assert err.value.reason == "job_queued"
    assert store.mark_running("job-1") and not store.mark_running("job-1")
    store.set_progress("job-1", "identity", 0.5)
    assert (store.get("job-1").stage, store.get("job-1").fraction) == ("identity", 0.5)
    store.finish("job-1", b"\x89PNG result", {"identity_score": 0.61})
    assert store.load_result("job-1") == (b"\x89PNG result", {"identity_score": 0.61})
    raw = (tmp_path / "jobs.sqlite").read_bytes()
    assert template not in raw and b"sealed-payload-bytes" not in raw and b"\x89PNG result" not in raw
    assert store.get("job-1").state == SUCCEEDED


def test_recover_requeues_fails_or_cancels_interrupted_jobs(store, template):
    for i in range(3):
        store.create(_job(job_id=f"job-{i}", nonce=f"{i}" * 32), b"sealed-%d" % i, template)
        assert store.mark_running(f"job-{i}")
    store.request_cancel("job-1")  # flagged while running
    store._db.execute("UPDATE jobs SET attempts = 3 WHERE job_id = 'job-2'")
    resumed, ended = store.recover(max_attempts=3)
    assert resumed == ["job-0"] and sorted(ended) == ["job-1", "job-2"]
    assert store.get("job-0").state == QUEUED and "resumed after a node restart" in store.get("job-0").error_message
    assert store.get("job-1").state == CANCELLED
    assert (store.get("job-2").state, store.get("job-2").error_reason) == (FAILED, "interrupted")


def test_cancel_queued_job_at_once_and_flag_running_job(store, template):
    store.create(_job(), b"s1", template)
    store.create(_job(job_id="job-2", nonce="b" * 32), b"s2", template)
    assert store.request_cancel("job-1").state == CANCELLED
    store.mark_running("job-2")
    row = store.request_cancel("job-2")
    assert row.state == RUNNING and row.cancel_requested


def test_delete_shreds_key_and_leaves_tombstone(store, template, tmp_path):
    store.create(_job(), b"s1", template)
    store.create(_job(job_id="job-2", nonce="b" * 32, person="person-2"), b"s2", template)
    key = store._db.execute("SELECT key FROM data_keys WHERE job_id = 'job-1'").fetchone()[0]
    deleted = store.delete(["job-1"], "test")
    assert [d.job_id for d in deleted] == ["job-1"] and deleted[0].data_key_destroyed
    with pytest.raises(JobNotFound) as err:
        store.get("job-1")
    assert err.value.reason == "job_deleted"
    with pytest.raises(JobNotFound):
        store.load_inputs("job-1")
    with pytest.raises(JobNotFound, match="no job 'nope'"):
        store.delete(["nope"], "test")
    assert store.person_job_ids("person-2") == ["job-2"] and store.person_job_ids("person-1") == []
    with pytest.raises(JobConflict, match="deleted"):
        store.create(_job(nonce="c" * 32), b"s3", template)
    assert key not in (tmp_path / "jobs.sqlite").read_bytes()


def test_store_survives_reopen_and_prunes_expired_nonces(tmp_path, template):
    s = JobStore(tmp_path / "jobs.sqlite", store_key=STORE_KEY)
    s.create(_job(), b"s1", template)
    s.close()
    s = JobStore(tmp_path / "jobs.sqlite", store_key=STORE_KEY)
    assert s.get("job-1").seed == 7 and s.load_inputs("job-1")[0] == b"s1"
    assert s.prune_nonces(now=1_000) == 0 and s.prune_nonces(now=2_000_000_001) == 1
    s.close()
    assert sqlite3.connect(tmp_path / "jobs.sqlite").execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_data_keys_are_wrapped_by_the_store_key(tmp_path, template):
    s = JobStore(tmp_path / "jobs.sqlite", store_key=STORE_KEY)
    s.create(_job(), b"s1", template)
    wrapped = s._db.execute("SELECT key FROM data_keys").fetchone()[0]
    s.close()
    data_key = decrypt_at_rest(STORE_KEY, wrapped, b"megaportrait/render-data-key/v1\0job-1")
    assert len(data_key) == 32 and data_key not in (tmp_path / "jobs.sqlite").read_bytes()
    other = JobStore(tmp_path / "jobs.sqlite", store_key=new_data_key())  # a copy of the database with another key
    with pytest.raises(DecryptionFailed):
        other.load_inputs("job-1")
    other.close()


def test_shred_inputs_keeps_the_result_under_a_fresh_key(store, template, tmp_path):
    store.create(_job(), b"sealed-payload-bytes", template)
    with pytest.raises(JobNotReady, match="still needed"):
        store.shred_inputs("job-1")  # queued: its inputs are needed (the sweeper deletes such a job whole)
    store.mark_running("job-1")
    store.finish("job-1", b"\x89PNG result", {"k": 1})
    db = sqlite3.connect(tmp_path / "jobs.sqlite")
    old_wrapped = db.execute("SELECT key FROM data_keys WHERE job_id = 'job-1'").fetchone()[0]
    old_key = decrypt_at_rest(STORE_KEY, old_wrapped, b"megaportrait/render-data-key/v1\0job-1")
    old_payload = db.execute("SELECT data FROM blobs WHERE job_id = 'job-1' AND name = 'sealed_payload'").fetchone()[0]
    assert store.shred_inputs("job-1") and not store.shred_inputs("job-1")  # the second time there is nothing left
    with pytest.raises(JobNotFound, match="sealed_payload"):
        store.load_inputs("job-1")
    assert store.load_result("job-1") == (b"\x89PNG result", {"k": 1}) and store.holds_data("job-1")
    names = {r[0] for r in db.execute("SELECT name FROM blobs WHERE job_id = 'job-1'")}
    new_wrapped = db.execute("SELECT key FROM data_keys WHERE job_id = 'job-1'").fetchone()[0]
    assert names == {"result_png", "result_metadata"} and new_wrapped != old_wrapped
    new_key = decrypt_at_rest(STORE_KEY, new_wrapped, b"megaportrait/render-data-key/v1\0job-1")
    aad = b"megaportrait/render-job-blob/v1\0job-1\0sealed_payload"
    assert decrypt_at_rest(old_key, old_payload, aad) == b"sealed-payload-bytes"  # the old key opened it ...
    with pytest.raises(DecryptionFailed):
        decrypt_at_rest(new_key, old_payload, aad)  # ... and only the old key did, which is gone
    db.close()
    assert old_wrapped not in (tmp_path / "jobs.sqlite").read_bytes()  # secure_delete overwrote it
    with pytest.raises(JobNotFound):
        store.shred_inputs("job-nope")


def test_check_new_refuses_what_create_would_and_person_deletions(store, template):
    store.check_new("job-1", "a" * 32, "ab" * 32)  # nothing stored yet: fine
    store.create(_job(), b"sealed-1", template)
    with pytest.raises(PayloadReplayed, match="job-1"):
        store.check_new("job-2", "a" * 32, "ab" * 32)
    with pytest.raises(JobConflict, match="different payload"):
        store.check_new("job-1", "b" * 32, "ab" * 32)
    store.delete(["job-1"], "test")
    with pytest.raises(JobConflict, match="deleted job"):
        store.check_new("job-1", "c" * 32, "cd" * 32)
    assert store.person_deleted_at("person-1") is None
    store.record_person_deletion("person-1", 1_900_000_000)
    store.record_person_deletion("person-1", 1_800_000_000)  # an older time never moves it back
    assert store.person_deleted_at("person-1") == 1_900_000_000 and store.person_deleted_at("person-2") is None
