"""The render node's job store: SQLite, every stored byte of a job encrypted under that job's own data key.

Tables: `jobs` (state and non-personal bookkeeping: hashes, pseudonymous references), `blobs` (the sealed payload,
the template and the results, each AES-256-GCM under the job's data key with the job id and blob name as associated
data), `data_keys` (one key per job, itself wrapped with the node's store key, which lives in a 0600 file outside
the database so a copy of the database alone reads nothing), `consumed_nonces` (replay protection; outlives the job), `tombstones` (what was
deleted and when), `person_deletions` (when a person's jobs were deleted on revocation: payloads sealed before then
are refused). Deleting a job destroys its data key and blobs with SQLite's `secure_delete` on, so the data
cannot be read back even from a copy of the blobs (crypto-shredding). `shred_inputs` does the same for a finished
job's payload and template alone (the result is re-keyed first), for the retention rule on payloads.

One connection, guarded by a lock: the node runs a handful of threads and SQLite serialises writes anyway.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from megaportrait.shared.crypto import decrypt_at_rest, encrypt_at_rest, new_data_key
from megaportrait.shared.errors import MegaPortraitError
from megaportrait.shared.logs import short_hash
from megaportrait.shared.payload_format import PayloadReplayed
from megaportrait.shared.records import StageSwitches, sha256_hex

log = logging.getLogger("megaportrait.render.jobs")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT '',
    fraction REAL NOT NULL DEFAULT 0,
    backend TEXT NOT NULL,
    payload_kind TEXT NOT NULL,
    person_ref TEXT NOT NULL,
    consent_ref TEXT NOT NULL,
    site_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    request_sha256 TEXT NOT NULL,
    nonce TEXT NOT NULL,
    stages_json TEXT NOT NULL,
    seed INTEGER NOT NULL,
    params_json TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error_reason TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '',
    result_sha256 TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_person ON jobs(person_ref);
CREATE TABLE IF NOT EXISTS blobs (
    job_id TEXT NOT NULL,
    name TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, name)
);
CREATE TABLE IF NOT EXISTS data_keys (
    job_id TEXT PRIMARY KEY,
    key BLOB NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS consumed_nonces (
    nonce TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    consumed_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS person_deletions (
    person_ref TEXT PRIMARY KEY,
    deleted_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tombstones (
    job_id TEXT PRIMARY KEY,
    payload_sha256 TEXT NOT NULL,
    result_sha256 TEXT NOT NULL,
    deleted_at TEXT NOT NULL,
    reason TEXT NOT NULL
);
"""


class JobNotFound(MegaPortraitError):
    """No job with this id exists on the node (never submitted, or deleted)."""

    reason = "job_not_found"


class JobConflict(MegaPortraitError):
    """A job with this id exists (or existed) with a different payload."""

    reason = "job_id_conflict"


class JobNotReady(MegaPortraitError):
    """The job has no result (yet, or ever): its state says why."""

    reason = "job_not_ready"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class NewJob:
    """What the node stores for a submitted job (after the payload passed every check)."""

    job_id: str
    backend: str
    payload_kind: str
    person_ref: str
    consent_ref: str
    site_id: str
    owner: str
    nonce: str
    payload_expires_at: int
    stages: StageSwitches
    seed: int
    params: dict
    request_sha256: str = ""  # over payload, template, backend, stages, seed, params; "" = the payload alone


@dataclass(frozen=True)
class JobRow:
    """One job's state and bookkeeping (no personal data: references are pseudonymous hashes)."""

    job_id: str
    state: str
    stage: str
    fraction: float
    backend: str
    payload_kind: str
    person_ref: str
    consent_ref: str
    site_id: str
    owner: str
    payload_sha256: str
    request_sha256: str
    stages: StageSwitches
    seed: int
    params: dict
    attempts: int
    cancel_requested: bool
    error_reason: str
    error_message: str
    result_sha256: str
    created_at: str
    updated_at: str

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True)
class DeletedJob:
    """What a deletion confirmation names for one job."""

    job_id: str
    payload_sha256: str
    result_sha256: str
    data_key_destroyed: bool


class JobStore:
    """Persistent jobs; see the module docstring for what is stored and how."""

    def __init__(self, path: str | Path, *, store_key: bytes) -> None:
        """`store_key`: 32-byte AES key that wraps every job's data key (`NodeIdentity.store_key`)."""
        if len(store_key) != 32:
            raise ValueError("store_key must be 32 bytes")
        self._store_key = store_key
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA secure_delete = ON")
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.executescript(_SCHEMA)
        self.path.chmod(0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------------------- reading

    def find(self, job_id: str) -> JobRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _row(row) if row else None

    def get(self, job_id: str) -> JobRow:
        row = self.find(job_id)
        if row is None:
            tomb = self.tombstone(job_id)
            if tomb:
                raise JobNotFound(f"job {job_id!r} was deleted at {tomb['deleted_at']} ({tomb['reason']})", reason="job_deleted")
            raise JobNotFound(f"no job {job_id!r} on this node")
        return row

    def tombstone(self, job_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM tombstones WHERE job_id = ?", (job_id,)).fetchone()
        return dict(row) if row else None

    def ids_in_state(self, *states: str) -> list[str]:
        marks = ",".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(f"SELECT job_id FROM jobs WHERE state IN ({marks}) ORDER BY created_at", states).fetchall()
        return [r["job_id"] for r in rows]

    def person_job_ids(self, person_ref: str, owner: str | None = None) -> list[str]:
        """Every job of `person_ref` (only those submitted by `owner` when given)."""
        sql, args = "SELECT job_id FROM jobs WHERE person_ref = ?", [person_ref]
        if owner is not None:
            sql, args = sql + " AND owner = ?", args + [owner]
        with self._lock:
            return [r["job_id"] for r in self._db.execute(sql + " ORDER BY created_at", args).fetchall()]

    def count_in_state(self, *states: str) -> int:
        marks = ",".join("?" * len(states))
        with self._lock:
            return int(self._db.execute(f"SELECT count(*) FROM jobs WHERE state IN ({marks})", states).fetchone()[0])

    def jobs_holding_inputs(self) -> list[JobRow]:
        """Jobs whose sealed payload is still stored (oldest first): what the `render_payloads` rule governs."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE job_id IN (SELECT job_id FROM blobs WHERE name = 'sealed_payload') ORDER BY created_at"
            ).fetchall()
        return [_row(r) for r in rows]

    def holds_data(self, job_id: str) -> bool:
        """True while any blob or data key of the job is stored."""
        with self._lock:
            return bool(self._db.execute(
                "SELECT EXISTS(SELECT 1 FROM blobs WHERE job_id = ?) OR EXISTS(SELECT 1 FROM data_keys WHERE job_id = ?)", (job_id, job_id)
            ).fetchone()[0])

    def ping(self) -> None:
        """Raise when the database cannot be read (a health check)."""
        with self._lock:
            self._db.execute("SELECT count(*) FROM data_keys").fetchone()

    def load_inputs(self, job_id: str) -> tuple[bytes, bytes]:
        """(sealed payload, template bytes), decrypted from rest into memory."""
        return self._read_blob(job_id, "sealed_payload"), self._read_blob(job_id, "template")

    def load_result(self, job_id: str) -> tuple[bytes, dict]:
        """(PNG bytes, metadata) of a succeeded job."""
        row = self.get(job_id)
        if row.state != SUCCEEDED:
            detail = f": {row.error_reason}: {row.error_message}" if row.error_reason else ""
            raise JobNotReady(f"job {job_id!r} is {row.state}{detail}", reason=f"job_{row.state}")
        png = self._read_blob(job_id, "result_png")
        return png, json.loads(self._read_blob(job_id, "result_metadata"))

    # ------------------------------------------------------------------------------------------- writing

    def create(self, job: NewJob, sealed_payload: bytes, template: bytes) -> tuple[JobRow, bool]:
        """Store a new job, or return the existing one when it was submitted with the very same request.

        Returns (row, existing). Raises JobConflict (same id, other payload or request fields, or a deleted id) and PayloadReplayed
        (the payload's nonce was consumed by an earlier job).
        """
        payload_sha = sha256_hex(sealed_payload)
        request_sha = job.request_sha256 or payload_sha
        with self._lock:
            existing = self.find(job.job_id)
            if existing is not None and existing.request_sha256 == request_sha:
                return existing, True
            self._refuse_new(job.job_id, job.nonce, payload_sha, existing)
            key, now = new_data_key(), _now()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO jobs (job_id, state, backend, payload_kind, person_ref, consent_ref, site_id, owner, "
                    "payload_sha256, request_sha256, nonce, stages_json, seed, params_json, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        job.job_id, QUEUED, job.backend, job.payload_kind, job.person_ref, job.consent_ref, job.site_id,
                        job.owner, payload_sha, request_sha, job.nonce, json.dumps(_stages_dict(job.stages)), int(job.seed),
                        json.dumps(job.params, sort_keys=True), now, now,
                    ),
                )
                wrapped = encrypt_at_rest(self._store_key, key, _key_aad(job.job_id))
                self._db.execute("INSERT INTO data_keys (job_id, key, created_at) VALUES (?, ?, ?)", (job.job_id, wrapped, now))
                self._db.execute(
                    "INSERT INTO consumed_nonces (nonce, job_id, payload_sha256, expires_at, consumed_at) VALUES (?, ?, ?, ?, ?)",
                    (job.nonce, job.job_id, payload_sha, job.payload_expires_at, now),
                )
                self._put_blob(job.job_id, "sealed_payload", sealed_payload, key)
                self._put_blob(job.job_id, "template", template, key)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        log.info("stored job %s (payload %s)", short_hash(job.job_id), payload_sha[:12])
        return self.get(job.job_id), False

    def mark_running(self, job_id: str) -> bool:
        """queued -> running (attempts + 1). False when the job is no longer queued (cancelled, deleted)."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, stage = '', fraction = 0, updated_at = ? "
                "WHERE job_id = ? AND state = ?",
                (RUNNING, _now(), job_id, QUEUED),
            )
            return cur.rowcount == 1

    def set_progress(self, job_id: str, stage: str, fraction: float) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET stage = ?, fraction = ?, updated_at = ? WHERE job_id = ? AND state = ?",
                (stage, float(fraction), _now(), job_id, RUNNING),
            )

    def finish(self, job_id: str, png: bytes, metadata: dict) -> None:
        """Store the encrypted result and mark the job succeeded. Raises JobNotFound if it was deleted meanwhile."""
        with self._lock:
            key = self._key(job_id)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._put_blob(job_id, "result_png", png, key)
                self._put_blob(job_id, "result_metadata", json.dumps(metadata, sort_keys=True, default=str).encode(), key)
                self._db.execute(
                    "UPDATE jobs SET state = ?, stage = 'done', fraction = 1, result_sha256 = ?, error_reason = '', error_message = '', "
                    "updated_at = ? WHERE job_id = ?",  # a resumed job's "resumed after a node restart" no longer applies
                    (SUCCEEDED, sha256_hex(png), _now(), job_id),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def set_terminal(self, job_id: str, state: str, reason: str = "", message: str = "") -> None:
        """Mark a job failed or cancelled, with a reason code and message for the caller."""
        if state not in (FAILED, CANCELLED):
            raise ValueError(f"set_terminal takes {FAILED!r} or {CANCELLED!r}, got {state!r}")
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state = ?, error_reason = ?, error_message = ?, updated_at = ? WHERE job_id = ?",
                (state, reason, message, _now(), job_id),
            )

    def requeue(self, job_id: str, reason: str) -> None:
        """running -> queued (interrupted by a shutdown); the message says why, the reason stays empty."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state = ?, stage = '', fraction = 0, error_message = ?, updated_at = ? WHERE job_id = ? AND state = ?",
                (QUEUED, reason, _now(), job_id, RUNNING),
            )

    def request_cancel(self, job_id: str) -> JobRow:
        """Cancel a queued job now; flag a running one (the worker stops at its next progress report)."""
        with self._lock:
            row = self.get(job_id)
            if row.state == QUEUED:
                self.set_terminal(job_id, CANCELLED, "cancelled", "cancelled before it started")
            elif row.state == RUNNING:
                self._db.execute("UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE job_id = ?", (_now(), job_id))
            return self.get(job_id)

    def recover(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """After a restart: jobs left `running` are re-queued, or failed when cancelled or tried `max_attempts` times.

        Returns (re-queued ids, failed-or-cancelled ids).
        """
        requeued, ended = [], []
        for job_id in self.ids_in_state(RUNNING):
            row = self.get(job_id)
            if row.cancel_requested:
                self.set_terminal(job_id, CANCELLED, "cancelled", "cancel was requested before the node stopped")
                ended.append(job_id)
            elif row.attempts >= max_attempts:
                self.set_terminal(
                    job_id, FAILED, "interrupted",
                    f"the node stopped during this job {row.attempts} time(s); not retried again (limit {max_attempts})",
                )
                ended.append(job_id)
            else:
                self.requeue(job_id, f"resumed after a node restart (attempt {row.attempts + 1} of {max_attempts})")
                requeued.append(job_id)
        return requeued, ended

    def delete(self, job_ids: list[str], reason: str) -> list[DeletedJob]:
        """Destroy each job's data key, blobs and row, leaving a tombstone; unknown ids raise JobNotFound first."""
        rows = [self.get(j) for j in job_ids]
        deleted = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    cur = self._db.execute("DELETE FROM data_keys WHERE job_id = ?", (row.job_id,))
                    self._db.execute("DELETE FROM blobs WHERE job_id = ?", (row.job_id,))
                    self._db.execute("DELETE FROM jobs WHERE job_id = ?", (row.job_id,))
                    self._db.execute(
                        "INSERT OR REPLACE INTO tombstones (job_id, payload_sha256, result_sha256, deleted_at, reason) VALUES (?, ?, ?, ?, ?)",
                        (row.job_id, row.payload_sha256, row.result_sha256, _now(), reason),
                    )
                    deleted.append(DeletedJob(row.job_id, row.payload_sha256, row.result_sha256, cur.rowcount == 1))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        for d in deleted:
            log.info("deleted job %s: data key destroyed", short_hash(d.job_id))
        return deleted

    def shred_inputs(self, job_id: str) -> bool:
        """Crypto-shred a finished job's sealed payload and template, keeping its result readable.

        The result blobs are re-encrypted under a fresh data key and the old key is destroyed, so a copy of the
        input blobs taken earlier can no longer be opened; the input blobs are deleted (secure_delete). Returns
        False when the job holds no inputs any more. Raises JobNotFound for an unknown job and JobNotReady for a
        job that is still queued or running (delete it whole instead).
        """
        with self._lock:
            row = self.get(job_id)
            if not row.terminal:
                raise JobNotReady(f"job {job_id!r} is {row.state}; its inputs are still needed (delete the job instead)", reason=f"job_{row.state}")
            names = [r["name"] for r in self._db.execute("SELECT name FROM blobs WHERE job_id = ?", (job_id,)).fetchall()]
            if "sealed_payload" not in names and "template" not in names:
                return False
            old_key, new_key = self._key(job_id), new_data_key()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for name in names:
                    if name in _INPUT_BLOBS:
                        continue
                    blob = self._db.execute("SELECT data FROM blobs WHERE job_id = ? AND name = ?", (job_id, name)).fetchone()
                    self._put_blob(job_id, name, decrypt_at_rest(old_key, bytes(blob["data"]), _aad(job_id, name)), new_key)
                self._db.execute(f"DELETE FROM blobs WHERE job_id = ? AND name IN ({','.join('?' * len(_INPUT_BLOBS))})", (job_id, *_INPUT_BLOBS))
                self._db.execute("UPDATE data_keys SET key = ? WHERE job_id = ?", (encrypt_at_rest(self._store_key, new_key, _key_aad(job_id)), job_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            del old_key
        log.info("job %s: inputs shredded (data key rotated)", short_hash(job_id))
        return True

    def check_new(self, job_id: str, nonce: str, payload_sha256: str) -> None:
        """Raise what `create` would for a new job (JobConflict, PayloadReplayed) without storing anything, so a
        refused payload need not be decrypted first. `create` checks again, atomically."""
        with self._lock:
            self._refuse_new(job_id, nonce, payload_sha256, self.find(job_id))

    def _refuse_new(self, job_id: str, nonce: str, payload_sha256: str, existing: JobRow | None) -> None:
        if existing is not None:
            what = "template, backend or parameters" if existing.payload_sha256 == payload_sha256 else "payload"
            raise JobConflict(f"job {job_id!r} already exists with a different {what}; use a new job id")
        used = self._db.execute("SELECT job_id FROM consumed_nonces WHERE nonce = ?", (nonce,)).fetchone()
        if used is not None:
            raise PayloadReplayed(f"this payload (nonce {nonce[:8]}...) was already consumed by job {used['job_id']!r}; seal a new payload")
        if self.tombstone(job_id):
            raise JobConflict(f"job id {job_id!r} belonged to a deleted job and cannot be reused")

    def record_person_deletion(self, person_ref: str, at: int) -> None:
        """Remember that every job of `person_ref` was deleted at `at` (epoch seconds; the latest time is kept)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO person_deletions (person_ref, deleted_at) VALUES (?, ?) "
                "ON CONFLICT(person_ref) DO UPDATE SET deleted_at = max(deleted_at, excluded.deleted_at)", (person_ref, int(at))
            )

    def person_deleted_at(self, person_ref: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT deleted_at FROM person_deletions WHERE person_ref = ?", (person_ref,)).fetchone()
        return int(row["deleted_at"]) if row else None

    def prune_nonces(self, now: int) -> int:
        """Forget consumed nonces of payloads that expired (an expired payload is refused anyway)."""
        with self._lock:
            return self._db.execute("DELETE FROM consumed_nonces WHERE expires_at < ?", (int(now),)).rowcount

    # ------------------------------------------------------------------------------------------- blobs

    def _key(self, job_id: str) -> bytes:
        row = self._db.execute("SELECT key FROM data_keys WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"job {job_id!r} has no data key: it was deleted", reason="job_deleted")
        return decrypt_at_rest(self._store_key, bytes(row["key"]), _key_aad(job_id))

    def _put_blob(self, job_id: str, name: str, data: bytes, key: bytes) -> None:
        blob = encrypt_at_rest(key, data, _aad(job_id, name))
        self._db.execute("INSERT OR REPLACE INTO blobs (job_id, name, data) VALUES (?, ?, ?)", (job_id, name, blob))

    def _read_blob(self, job_id: str, name: str) -> bytes:
        with self._lock:
            key = self._key(job_id)
            row = self._db.execute("SELECT data FROM blobs WHERE job_id = ? AND name = ?", (job_id, name)).fetchone()
        if row is None:
            raise JobNotFound(f"job {job_id!r} has no stored {name}")
        return decrypt_at_rest(key, bytes(row["data"]), _aad(job_id, name))


_INPUT_BLOBS = ("sealed_payload", "template")


def _key_aad(job_id: str) -> bytes:
    return f"megaportrait/render-data-key/v1\0{job_id}".encode()


def _aad(job_id: str, name: str) -> bytes:
    return f"megaportrait/render-job-blob/v1\0{job_id}\0{name}".encode()


def _stages_dict(s: StageSwitches) -> dict:
    return {"identity": s.identity, "shading": s.shading, "harmonize": s.harmonize}


def _row(r: sqlite3.Row) -> JobRow:
    d = dict(r)
    return JobRow(
        job_id=d["job_id"], state=d["state"], stage=d["stage"], fraction=float(d["fraction"]), backend=d["backend"],
        payload_kind=d["payload_kind"], person_ref=d["person_ref"], consent_ref=d["consent_ref"], site_id=d["site_id"],
        owner=d["owner"], payload_sha256=d["payload_sha256"], request_sha256=d["request_sha256"], stages=StageSwitches(**json.loads(d["stages_json"])),
        seed=int(d["seed"]), params=json.loads(d["params_json"]), attempts=int(d["attempts"]),
        cancel_requested=bool(d["cancel_requested"]), error_reason=d["error_reason"], error_message=d["error_message"],
        result_sha256=d["result_sha256"], created_at=d["created_at"], updated_at=d["updated_at"],
    )
