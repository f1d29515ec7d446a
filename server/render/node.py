"""The render node: its keys, trusted sites, job store, backends, worker pool, audit log and retention sweeper.

`RenderNode` is the transport-free core (the gRPC service in `service.py` is a thin adapter over it):
submit -> verify the sealed payload (signed by the site whose client certificate submits it) and the template -> store
it encrypted -> a worker opens it in memory, renders, stores the encrypted result -> fetch -> delete (data key
destroyed, signed confirmation). Every job status, result and deletion confirmation carries the node's latest signed
audit checkpoint (`audit_checkpoint`), which the site keeps as a witness of the node's log.

Every request and its outcome is written to the node's own audit log (`shared.audit`, hash-chained and signed with
the node's audit key): submissions accepted or refused (with the reason code), each decryption, renders done or
failed, results fetched, cancels, deletions and retention deletions. Entries name data by sha256 and persons by
their pseudonymous person_ref only. The retention sweeper (`retention.py`) runs at start-up and every
`sweep.interval` of policies/retention.yaml. Trusted sites are re-read when `trusted_sites/` changes, so
`megaportrait render-node trust-site` takes effect without a restart.

State directory layout::

    <state_dir>/keys/node_hpke.json       HPKE private key (0600)
    <state_dir>/keys/node_signing.pem     Ed25519 private key (0600), signs deletion statements
    <state_dir>/keys/store.key            AES-256 key wrapping every job's data key (0600)
    <state_dir>/node_public.json          what sites need: HPKE public key, signing key, fingerprints
    <state_dir>/trusted_sites/<site>/<fingerprint>.pem
    <state_dir>/jobs.sqlite
    <state_dir>/audit/audit.jsonl         the node's audit log (+ .checkpoints)
    <state_dir>/audit/signing.key         its Ed25519 audit key (0600); signing.key.pub is what verifiers need
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from megaportrait.shared.audit import AuditError, AuditLog, Checkpoint, open_component_log
from megaportrait.shared.consent import CLASSIC_CROP_PURPOSE, RENDER_PURPOSE, check_policy_purposes
from megaportrait.shared.crypto import (
    HpkePrivateKey,
    KeyFileError,
    NodePublicKeys,
    canonical_json,
    load_ed25519_private,
    load_hpke_private,
    new_data_key,
    save_ed25519_private,
    save_hpke_private,
    write_secret,
)
from megaportrait.shared.deletion import DELETION_DOMAIN, DeletionConfirmation, sign_deletion, verify_deletion
from megaportrait.shared.errors import MegaPortraitError
from megaportrait.shared.imaging import encode_png, load_image
from megaportrait.shared.logs import short_hash
from megaportrait.shared.payload_format import ConsentScopeRefused, Envelope, valid_id
from megaportrait.shared.policy import Policies
from megaportrait.shared.records import SourceImage, StageSwitches, sha256_hex
from megaportrait.shared.retention import RetentionSweeper, SweepReport

from .backends import BackendRegistry, default_registry
from .jobs import CANCELLED, FAILED, QUEUED, RUNNING, JobNotFound, JobRow, JobStore, NewJob
from .metrics import RenderMetrics
from .payloads import Expectation, TrustedSites, open_identity, verify_envelope
from .retention import NODE_KINDS, RenderJobRetention, load_node_policies

__all__ = [
    "API_VERSION", "DELETION_DOMAIN", "DeletionConfirmation", "InvalidRequest", "JobCancelled", "NodeIdentity",
    "NodeShuttingDown", "NotJobOwner", "RenderNode", "SealedBeforeRevocation", "SiteMismatch", "SubmitRequest", "TrustedSitesUnavailable",
    "verify_deletion",
]  # fmt: skip

log = logging.getLogger("megaportrait.render.node")

API_VERSION = "megaportrait.render.v1"
MAX_TEMPLATE_PIXELS = 40_000_000


class InvalidRequest(MegaPortraitError):
    """A request field is missing or malformed; the message names the field."""

    reason = "invalid_request"


class NotJobOwner(MegaPortraitError):
    """The caller's certificate identity is not the one that submitted the job."""

    reason = "not_job_owner"


class SiteMismatch(MegaPortraitError):
    """The payload is signed by one site and submitted over another site's client certificate."""

    reason = "site_mismatch"


class JobCancelled(MegaPortraitError):
    """Raised inside a render when its job was cancelled."""

    reason = "cancelled"


class NodeShuttingDown(MegaPortraitError):
    """Raised inside a render when the node stops; the job is re-queued and resumes on restart."""

    reason = "node_shutting_down"


class SealedBeforeRevocation(ConsentScopeRefused):
    """The payload was sealed before this person's data was deleted on the node (consent revoked)."""

    reason = "consent_revoked"


class TrustedSitesUnavailable(MegaPortraitError):
    """trusted_sites/ changed and cannot be read back; submissions are refused until it is fixed."""

    reason = "trusted_sites_unavailable"


# ------------------------------------------------------------------------------------------------- identity


@dataclass(frozen=True, repr=False)
class NodeIdentity:
    """The node's long-term keys: HPKE (payloads are sealed to it), Ed25519 (it signs deletion statements) and the
    store key (wraps the per-job data keys in the job store)."""

    node_id: str
    hpke: HpkePrivateKey
    signing: Ed25519PrivateKey
    store_key: bytes

    def __repr__(self) -> str:
        return f"NodeIdentity({self.node_id!r}, hpke={self.hpke.public_key().fingerprint()[:12]})"

    @classmethod
    def generate(cls, node_id: str) -> "NodeIdentity":
        if not valid_id(node_id):
            raise InvalidRequest(f"node id {node_id!r} must be 1-128 chars of [A-Za-z0-9._:-]")
        return cls(node_id=node_id, hpke=HpkePrivateKey.generate(), signing=Ed25519PrivateKey.generate(), store_key=new_data_key())

    def public(self) -> NodePublicKeys:
        return NodePublicKeys(node_id=self.node_id, hpke=self.hpke.public_key(), signing=self.signing.public_key())

    def save(self, state_dir: str | Path) -> Path:
        """Write the private keys (0600) and node_public.json; refuses to overwrite existing keys."""
        state_dir = Path(state_dir)
        keys = state_dir / "keys"
        if (keys / "node_hpke.json").exists() or (keys / "node_signing.pem").exists():
            raise FileExistsError(f"{keys} already holds node keys; payloads sealed to them would become unreadable")
        keys.mkdir(parents=True, exist_ok=True)
        keys.chmod(0o700)
        save_hpke_private(self.hpke, keys / "node_hpke.json")
        save_ed25519_private(self.signing, keys / "node_signing.pem")
        write_secret(keys / "store.key", self.store_key)
        (keys / "node_id").write_text(self.node_id + "\n")
        public = state_dir / "node_public.json"
        public.write_bytes(self.public().to_json() + b"\n")
        return public

    @classmethod
    def load(cls, state_dir: str | Path) -> "NodeIdentity":
        keys = Path(state_dir) / "keys"
        if not (keys / "node_hpke.json").is_file():
            raise KeyFileError(f"{keys}/node_hpke.json not found; run `megaportrait render-node keygen --state-dir {state_dir}`")
        return cls(
            node_id=(keys / "node_id").read_text().strip(),
            hpke=load_hpke_private(keys / "node_hpke.json"),
            signing=load_ed25519_private(keys / "node_signing.pem"),
            store_key=_read_store_key(keys / "store.key"),
        )


# --------------------------------------------------------------------------------------------------- node


@dataclass(frozen=True)
class SubmitRequest:
    """A job submission, transport-independent. `backend` "" means the node's default."""

    job_id: str
    sealed_payload: bytes
    consent_ref: str
    template_image: bytes
    backend: str = ""
    stages: StageSwitches = StageSwitches()
    seed: int = 0
    params: dict | None = None


WORKER_ACTOR = "render-worker"


class RenderNode:
    """Accepts sealed jobs, renders them on a worker pool, keeps results encrypted until deleted or expired.

    Optional keyword arguments (each has a working default):
    audit / audit_files: the node's audit log, open or as (log path, key path) (default `<state_dir>/audit/audit.jsonl`
    and `<state_dir>/audit/signing.key`, the key created on first start);
    policies: consent + retention policies (default: `retention.load_node_policies()`, the checkout's policies/);
    trusted_dir: re-read trusted sites from here when it changes (`from_state_dir` sets it);
    metrics_registry: where the Prometheus metrics go (default: a private registry, see `metrics`);
    clock: "now" for the retention sweeper (default: the system clock).
    """

    def __init__(
        self,
        state_dir: str | Path,
        *,
        identity: NodeIdentity,
        trusted: TrustedSites,
        registry: BackendRegistry | None = None,
        default_backend: str = "classic",
        workers: int = 1,
        max_attempts: int = 3,
        audit: AuditLog | None = None,
        audit_files: tuple[str | Path, str | Path] | None = None,
        policies: Policies | None = None,
        trusted_dir: str | Path | None = None,
        metrics_registry: CollectorRegistry | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.identity = identity
        self.trusted = trusted
        self.registry = registry or default_registry()
        self.default_backend = default_backend
        self.max_attempts = max_attempts
        self.policies = policies or load_node_policies()
        check_policy_purposes(self.policies.consent, (RENDER_PURPOSE, CLASSIC_CROP_PURPOSE))  # the scopes payloads are checked against
        if audit is not None and audit_files is not None:
            raise ValueError("pass either audit (an open log) or audit_files (where to open one), not both")
        log_path, key_path = audit_files or (self.state_dir / "audit" / "audit.jsonl", self.state_dir / "audit" / "signing.key")
        self.audit = audit or open_component_log(log_path, key_path, component=f"render-node:{identity.node_id}")
        self.store = JobStore(self.state_dir / "jobs.sqlite", store_key=identity.store_key)
        self.metrics = RenderMetrics(metrics_registry)
        self.metrics.watch_queue(lambda: self._count(QUEUED), lambda: self._count(RUNNING))
        self.retention = RetentionSweeper(
            self.policies.retention, {kind: RenderJobRetention(self.store, delete_jobs=self._delete_expired) for kind in NODE_KINDS},
            self.audit, actor=f"retention:render-node:{identity.node_id}", clock=clock, on_report=self._count_sweep,
        )
        self.trusted_dir = Path(trusted_dir) if trusted_dir is not None else None
        self._trusted_stamp = _dir_stamp(self.trusted_dir) if self.trusted_dir is not None else None
        self._trust_lock = threading.Lock()
        self._trust_error = ""
        self._audit_error = ""
        self._hpke_fp = identity.hpke.public_key().fingerprint()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="render")
        self._changed = threading.Condition()
        self._version = 0
        self._cancel: set[str] = set()
        self._stopping = threading.Event()
        self._sweep_stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._closed = False

    @classmethod
    def from_state_dir(cls, state_dir: str | Path, **kwargs) -> "RenderNode":
        """A node using the keys and trusted sites found under `state_dir` (see the module docstring); trusted sites
        are re-read whenever `trusted_sites/` changes."""
        state_dir = Path(state_dir)
        identity = NodeIdentity.load(state_dir)
        trusted_dir = state_dir / "trusted_sites"
        stamp = _dir_stamp(trusted_dir)
        node = cls(state_dir, identity=identity, trusted=TrustedSites.load(trusted_dir), trusted_dir=trusted_dir, **kwargs)
        node._trusted_stamp = stamp  # taken before the load: a change during it is picked up on the next submit
        return node

    # ------------------------------------------------------------------------------------ lifecycle

    def start(self) -> tuple[list[str], list[str]]:
        """Recover jobs left running by a previous process, sweep expired data, queue every waiting job, and start
        the periodic retention sweeper.

        Returns (resumed job ids, job ids ended because they cannot be resumed).
        """
        resumed, ended = self.store.recover(self.max_attempts)
        for job_id in resumed:
            log.info("job %s resumes after restart", short_hash(job_id))
        for job_id in ended:
            log.warning("job %s ended after restart: %s", short_hash(job_id), self.store.get(job_id).error_reason)
        self.store.prune_nonces(int(time.time()))
        self._audit("node.start", "node", policy=self.policies.retention.version_hash, detail={
            "resumed": len(resumed), "ended": len(ended), "backends": list(self.registry.names()),
            "consent_policy": self.policies.consent.version_hash, "retention_policy": self.policies.retention.version_hash,
        })  # fmt: skip
        if self.policies.retention.rules.sweep.on_startup:
            self.retention.sweep_logged()  # before any job is queued: nothing past its retention gets rendered
        self._sweeper = self.retention.run_every(self._sweep_stop, on_startup=False)
        self.audit.run_checkpoints(self._sweep_stop)
        for job_id in self.store.ids_in_state(QUEUED):
            self._pool.submit(self._run, job_id)
        return resumed, ended

    def stop(self) -> None:
        """Stop taking work; running renders stop at their next progress report and are re-queued for restart."""
        self._stopping.set()
        self._sweep_stop.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=120)
            if self._sweeper.is_alive():
                log.error("the retention sweeper did not finish within 120 s; closing the store under it")
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._notify()
        self._audit_quietly("node.stop", "node")
        try:
            self.audit.close()
        except (AuditError, OSError):
            log.exception("cannot write the audit checkpoint at shutdown")
        self._closed = True
        self.store.close()

    # ------------------------------------------------------------------------------------ requests

    def submit(self, req: SubmitRequest, owner: str) -> tuple[JobRow, bool]:
        """Check and queue a job. Returns (job, existing) where existing means an idempotent resubmit.

        Every refusal is audited with its reason code; an acceptance that cannot be audited is undone (AuditError).
        """
        try:
            return self._submit(req, owner)
        except MegaPortraitError as exc:
            self.metrics.refused.labels(exc.reason).inc()
            data = [sha256_hex(req.sealed_payload)] if req.sealed_payload else []
            self._audit_quietly("job.submit", _actor(owner), outcome="refused", data=data,
                                detail={"job_id": _safe_id(req.job_id), "reason": exc.reason})  # fmt: skip
            raise

    def _submit(self, req: SubmitRequest, owner: str) -> tuple[JobRow, bool]:
        if self._stopping.is_set():
            raise NodeShuttingDown("the node is shutting down; resubmit to it after it restarts")
        _check_id("job_id", req.job_id)
        _check_id("consent_ref", req.consent_ref)
        if not req.sealed_payload:
            raise InvalidRequest("sealed_payload is empty")
        if not req.template_image:
            raise InvalidRequest("template_image is empty: send the reference portrait as PNG or JPEG bytes")
        if not 0 <= req.seed < 2**63:
            raise InvalidRequest(f"seed must be in [0, 2^63), got {req.seed}")
        if req.params is not None and not isinstance(req.params, dict):
            raise InvalidRequest("params must be a JSON object")
        backend = req.backend or self.default_backend
        entry = self.registry.entry(backend)
        request_sha = _request_digest(req, backend)
        existing = self.store.find(req.job_id)
        if existing is not None and existing.request_sha256 == request_sha:
            self._check_owner(existing, owner)
            self._audit("job.submit", _actor(owner), person=existing.person_ref, data=[existing.payload_sha256],
                        detail={"job_id": existing.job_id, "existing": True})  # fmt: skip
            return existing, True  # idempotent resubmit: the same bytes were verified the first time
        env = verify_envelope(
            req.sealed_payload,
            node_key_fingerprint=self._hpke_fp,
            trusted=self._trusted_sites(),
            expect=Expectation(job_id=req.job_id, consent_ref=req.consent_ref, backend=backend, payload_kind=entry.payload_kind),
        )
        h = env.header
        if h.site_id != owner:  # else another site could take the job (and its result) and lock the signer out of it
            raise SiteMismatch(f"payload is signed by site {h.site_id!r} but was submitted over the client certificate of "
                               f"{owner!r}; a site may submit only payloads it signed")  # fmt: skip
        payload_sha = sha256_hex(req.sealed_payload)
        self.store.check_new(req.job_id, h.nonce, payload_sha)  # a replay or id conflict is refused before decryption
        deleted_at = self.store.person_deleted_at(h.person_ref)
        if deleted_at is not None and h.issued_at <= deleted_at:
            raise SealedBeforeRevocation(
                f"payload was sealed at {h.issued_at}, before this person's data was deleted here ({deleted_at}, consent "
                "revoked); the site must check consent again and seal a new payload"
            )
        template = _decode_template(req.template_image)  # a bad template is refused before anything is decrypted
        try:
            identity = open_identity(env, self.identity.hpke)  # decodes in memory to refuse a bad payload now, not later
        except MegaPortraitError as exc:
            self._audit_quietly("payload.decrypt", _actor(owner), outcome="refused", person=h.person_ref, data=[payload_sha],
                                detail={"job_id": req.job_id, "stage": "submit", "reason": exc.reason})  # fmt: skip
            raise
        del identity
        self._audit("payload.decrypt", _actor(owner), person=h.person_ref, data=[payload_sha],
                    detail={"job_id": req.job_id, "stage": "submit", "kind": h.kind})  # fmt: skip
        row, was_there = self.store.create(
            NewJob(
                job_id=req.job_id, backend=backend, payload_kind=h.kind, person_ref=h.person_ref, consent_ref=h.consent_ref,
                site_id=h.site_id, owner=owner, nonce=h.nonce, payload_expires_at=h.expires_at, request_sha256=request_sha, stages=req.stages,
                seed=req.seed, params=dict(req.params or {}),
            ),
            req.sealed_payload,
            req.template_image,
        )
        try:
            self._audit("job.submit", _actor(owner), person=h.person_ref, data=[payload_sha, template.sha256], detail={
                "job_id": req.job_id, "existing": was_there, "backend": backend, "kind": h.kind, "site": h.site_id,
                "consent_ref": h.consent_ref, "consent_scope": h.consent_scope,
            })  # fmt: skip
        except AuditError:
            if not was_there:
                self.store.delete([req.job_id], "not audited")  # no job runs without a record of its acceptance
            raise
        if not was_there:
            self.metrics.submitted.labels(backend).inc()
            log.info("job %s queued on backend %s (template %s)", short_hash(req.job_id), backend, template.sha256[:12])
            self._pool.submit(self._run, req.job_id)
            self._notify()
        return row, was_there

    def get(self, job_id: str, owner: str | None) -> JobRow:
        row = self.store.get(job_id)
        self._check_owner(row, owner)
        return row

    def result(self, job_id: str, owner: str | None) -> tuple[bytes, dict]:
        """The PNG and metadata of a finished job; audited, and not handed out when it cannot be audited."""
        try:
            row = self.get(job_id, owner)
            png, metadata = self.store.load_result(job_id)
        except MegaPortraitError as exc:
            self._audit_quietly("job.fetch", _actor(owner), outcome="refused", detail={"job_id": _safe_id(job_id), "reason": exc.reason})
            raise
        self._audit("job.fetch", _actor(owner), person=row.person_ref, data=[row.result_sha256], detail={"job_id": job_id})
        return png, metadata

    def cancel(self, job_id: str, owner: str | None) -> JobRow:
        try:
            before = self.get(job_id, owner)
            row = self.store.request_cancel(job_id)
        except MegaPortraitError as exc:
            self._audit_quietly("job.cancel", _actor(owner), outcome="refused", detail={"job_id": _safe_id(job_id), "reason": exc.reason})
            raise
        self._audit_quietly("job.cancel", _actor(owner), person=row.person_ref, data=[row.payload_sha256],
                            detail={"job_id": job_id, "state": row.state})  # fmt: skip
        if row.state == RUNNING:
            self._cancel.add(job_id)  # the worker stops at its next progress report (and audits that)
        elif row.state == CANCELLED and before.state == QUEUED:
            self.metrics.cancelled.labels(row.backend).inc()
        self._notify()
        return row

    def delete_jobs(self, job_ids: list[str], owner: str | None, reason: str = "requested by the job owner") -> DeletionConfirmation:
        """Destroy the jobs (a running one is cancelled first) and return a signed confirmation."""
        try:
            if not job_ids:
                raise InvalidRequest("job_ids is empty")
            rows = []
            for job_id in job_ids:
                _check_id("job_id", job_id)
                rows.append(self.get(job_id, owner))
        except MegaPortraitError as exc:
            self._audit_quietly("job.delete", _actor(owner), outcome="refused",
                                detail={"job_ids": [_safe_id(j) for j in job_ids][:100], "reason": exc.reason})  # fmt: skip
            raise
        for row in rows:
            if row.state == RUNNING:
                self._cancel.add(row.job_id)
        deleted = self.store.delete(list(dict.fromkeys(job_ids)), reason)
        self._notify()
        persons = {r.person_ref for r in rows}
        self._audit_deleted("job.delete", _actor(owner), deleted, reason, person=persons.pop() if len(persons) == 1 else "")
        return self._confirm(deleted, reason, person_ref=None)

    def delete_person(self, person_ref: str, owner: str | None = None, reason: str = "consent revoked") -> DeletionConfirmation:
        """Destroy every job of `person_ref` (only the caller's when `owner` is given); used by consent revocation.

    From then on, payloads of the person sealed before this moment are refused (`SealedBeforeRevocation`).
    """
        try:
            _check_id("person_ref", person_ref)
        except MegaPortraitError as exc:
            self._audit_quietly("person.delete", _actor(owner), outcome="refused", detail={"reason": exc.reason})
            raise
        job_ids = self.store.person_job_ids(person_ref, owner)
        for job_id in job_ids:
            self._cancel.add(job_id)
        deleted = self.store.delete(job_ids, reason) if job_ids else []
        self.store.record_person_deletion(person_ref, int(time.time()))  # payloads sealed before now are refused
        self._notify()
        self._audit_deleted("person.delete", _actor(owner), deleted, reason, person=person_ref)
        return self._confirm(deleted, reason, person_ref=person_ref)

    def audit_checkpoint(self) -> Checkpoint | None:
        """The node's signed audit checkpoint covering every entry so far, handed to sites with each reply so that
        they witness it; None (logged) when it cannot be signed or written."""
        try:
            return self.audit.current_checkpoint()
        except (AuditError, OSError):
            log.exception("cannot checkpoint the audit log for a reply")
            return None

    def wait_for_change(self, since: int, timeout: float) -> int:
        """Block until some job changed after version `since` (or timeout); returns the current version."""
        with self._changed:
            if self._version == since:
                self._changed.wait(timeout)
            return self._version

    @property
    def version(self) -> int:
        with self._changed:
            return self._version

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # ------------------------------------------------------------------------------------ health

    def health_checks(self) -> dict[str, Callable[[], None]]:
        """Checks for `shared.service_health.start`: each returns when healthy and raises saying why when not."""
        return {
            "job_store": self.store.ping, "workers": self._check_workers, "audit_log": self._check_audit,
            "retention": self._check_retention, "trusted_sites": self._check_trust,
        }  # fmt: skip

    def _check_workers(self) -> None:
        if self._stopping.is_set():
            raise RuntimeError("the node is stopping")
        if self._sweeper is None:
            raise RuntimeError("the node has not been started")

    def _check_audit(self) -> None:
        if self._audit_error:
            raise RuntimeError(f"last audit append failed: {self._audit_error}")
        if not os.access(self.audit.path, os.W_OK):
            raise RuntimeError(f"{self.audit.path} is not writable")

    def _check_retention(self) -> None:
        if self._sweeper is None or not self._sweeper.is_alive():
            raise RuntimeError("the retention sweeper is not running")
        if self.retention.last_error:
            raise RuntimeError(f"last retention sweep failed: {self.retention.last_error}")
        report = self.retention.last_report
        if report is not None and not report.ok:
            kinds = sorted({item.kind for item, _ in report.failed})
            raise RuntimeError(f"last retention sweep could not delete {len(report.failed)} item(s) of {', '.join(kinds)}")

    def _check_trust(self) -> None:
        if self._trust_error:
            raise RuntimeError(self._trust_error)

    # ------------------------------------------------------------------------------------ internals

    def _check_owner(self, row: JobRow, owner: str | None) -> None:
        if owner is not None and row.owner != owner:
            raise NotJobOwner(f"job {row.job_id!r} belongs to another client identity; only its submitter may use it")

    def _notify(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def _count(self, state: str) -> int:
        if self._closed:
            return 0
        try:
            return self.store.count_in_state(state)
        except sqlite3.ProgrammingError:  # closed under a late scrape
            return 0

    def _trusted_sites(self) -> TrustedSites:
        """The trusted sites, re-read when `trusted_dir` changed since the last read (fails closed on a bad file)."""
        if self.trusted_dir is None:
            return self.trusted
        stamp = _dir_stamp(self.trusted_dir)
        with self._trust_lock:
            if stamp != self._trusted_stamp:
                try:
                    loaded = TrustedSites.load(self.trusted_dir)
                except (MegaPortraitError, OSError, ValueError) as exc:
                    self._trusted_stamp = None  # retry on every submission until it loads
                    self._trust_error = f"{self.trusted_dir}: cannot be read: {exc}"
                    self._audit_quietly("trust.reload", "node", outcome="failed", detail={"reason": str(exc)[:200]})
                    raise TrustedSitesUnavailable(f"{self._trust_error}; fix or remove the file (megaportrait render-node trust-site)") from exc
                self.trusted, self._trusted_stamp, self._trust_error = loaded, stamp, ""
                counts = {site: len(keys) for site, keys in loaded.keys.items()}
                log.info("trusted sites reloaded: %s", counts)
                self._audit_quietly("trust.reload", "node", detail={"sites": counts})
            return self.trusted

    def _audit(self, action: str, actor: str, *, outcome: str = "ok", person: str = "", data: Iterable[str] = (),
               detail: dict | None = None, policy: str | None = None) -> None:  # fmt: skip
        """Append one entry to the node's log; raises AuditError (counted, shown by the health check) when it cannot."""
        try:
            self.audit.append(action, actor=actor, outcome=outcome, person=person, data=[d for d in data if d],  # type: ignore[arg-type]
                              policy=self.policies.consent.version_hash if policy is None else policy, detail=detail)  # fmt: skip
        except (AuditError, OSError) as exc:
            self.metrics.audit_failures.inc()
            self._audit_error = f"{type(exc).__name__}: {exc}"[:300]
            if isinstance(exc, AuditError):
                raise
            raise AuditError(f"cannot write the audit log {self.audit.path}: {exc}") from exc
        self._audit_error = ""

    def _audit_quietly(self, action: str, actor: str, **kw) -> None:
        """`_audit` where the action has already happened (or was refused): a failure is logged, not raised."""
        try:
            self._audit(action, actor, **kw)
        except AuditError:
            log.exception("audit entry %s not written", action)

    def _audit_deleted(self, action: str, actor: str, deleted: list, reason: str, *, person: str) -> None:
        hashes = [h for d in deleted for h in (d.payload_sha256, d.result_sha256) if h]
        self._audit_quietly(action, actor, person=person, data=hashes, detail={
            "job_ids": [d.job_id for d in deleted], "keys_destroyed": sum(d.data_key_destroyed for d in deleted), "reason": reason,
        })  # fmt: skip

    def _delete_expired(self, job_ids: list[str], reason: str) -> None:
        """Whole-job deletion for the retention sweeper (it verifies and audits each item itself)."""
        for job_id in job_ids:
            self._cancel.add(job_id)
        self.store.delete(job_ids, reason)
        self._notify()

    def _count_sweep(self, report: SweepReport) -> None:
        for kind, digests in report.deleted.items():
            self.metrics.retention_deleted.labels(kind).inc(len(digests))
        for item, _ in report.failed:
            self.metrics.retention_failed.labels(item.kind).inc()

    def _confirm(self, deleted: list, reason: str, person_ref: str | None) -> DeletionConfirmation:
        return sign_deletion(
            self.identity.signing, node_id=self.identity.node_id, reason=reason, person_ref=person_ref,
            jobs=[{"job_id": d.job_id, "payload_sha256": d.payload_sha256, "result_sha256": d.result_sha256,
                   "data_key_destroyed": d.data_key_destroyed} for d in deleted],
        )  # fmt: skip

    def _run(self, job_id: str) -> None:
        """Worker: one job from queued to a terminal state (or back to queued when the node stops)."""
        if self._stopping.is_set():
            return
        try:
            if not self.store.mark_running(job_id):
                self._cancel.discard(job_id)
                return
        except JobNotFound:
            self._cancel.discard(job_id)
            return
        self._notify()
        row = None
        try:
            row = self.store.get(job_id)
            sealed, template_bytes = self.store.load_inputs(job_id)
            try:
                identity = open_identity(Envelope.parse(sealed), self.identity.hpke)
            except MegaPortraitError as exc:
                self._audit_quietly("payload.decrypt", WORKER_ACTOR, outcome="failed", person=row.person_ref, data=[row.payload_sha256],
                                    detail={"job_id": job_id, "stage": "render", "reason": exc.reason})  # fmt: skip
                raise
            del sealed
            # no render without a record of the decryption: an AuditError fails the job here
            self._audit("payload.decrypt", WORKER_ACTOR, person=row.person_ref, data=[row.payload_sha256],
                        detail={"job_id": job_id, "stage": "render", "attempt": row.attempts})  # fmt: skip
            template = _decode_template(template_bytes)
            backend = self.registry.get(row.backend)
            started = time.monotonic()

            def progress(stage: str, fraction: float) -> None:
                if self._stopping.is_set():
                    raise NodeShuttingDown("node stopping")
                if job_id in self._cancel:
                    raise JobCancelled("job cancelled")
                self.store.set_progress(job_id, stage, max(0.0, min(1.0, float(fraction))))
                self._notify()

            progress("start", 0.0)
            portrait = backend.render(
                job_id, template, identity, stages=row.stages, seed=row.seed, params=row.params, progress=progress
            )
            del identity
            if portrait.pixels.shape != template.pixels.shape or portrait.pixels.dtype.name != "uint8":
                raise MegaPortraitError(
                    f"backend {row.backend!r} returned {portrait.pixels.shape} {portrait.pixels.dtype}, expected the template's "
                    f"{template.pixels.shape} uint8", reason="backend_output_invalid",
                )
            metadata = {**portrait.metadata, "job_id": job_id, "backend": row.backend, "render_node": self.identity.node_id}
            png = encode_png(portrait.pixels, metadata)
            self.store.finish(job_id, png, metadata)
            self.metrics.completed.labels(row.backend).inc()
            self.metrics.render_seconds.labels(row.backend).observe(time.monotonic() - started)
            self._audit_quietly("job.render", WORKER_ACTOR, person=row.person_ref, data=[row.payload_sha256, sha256_hex(png)],
                                detail={"job_id": job_id, "backend": row.backend, "seconds": round(time.monotonic() - started, 3)})  # fmt: skip
            log.info("job %s succeeded", short_hash(job_id))
        except NodeShuttingDown:
            self.store.requeue(job_id, "the node stopped during this job; it resumes on restart")
            self._render_failed(row, job_id, "node_shutting_down", requeued=True)
        except JobCancelled:
            self.store.set_terminal(job_id, CANCELLED, "cancelled", "cancelled while rendering")
            if row is not None:
                self.metrics.cancelled.labels(row.backend).inc()
            self._render_failed(row, job_id, "cancelled")
        except JobNotFound:
            log.info("job %s was deleted while rendering; its output is discarded", short_hash(job_id))
            self._render_failed(row, job_id, "job_deleted")
        except MegaPortraitError as exc:
            log.warning("job %s failed: %s", short_hash(job_id), exc.reason)
            self._fail_quietly(job_id, exc.reason, str(exc))
            self._render_failed(row, job_id, exc.reason, count=True)
        except Exception as exc:  # a backend bug must end the job with a reason, not kill the worker
            log.exception("job %s: backend error", short_hash(job_id))
            self._fail_quietly(job_id, "backend_error", f"{type(exc).__name__}: {exc}")
            self._render_failed(row, job_id, "backend_error", count=True)
        finally:
            self._cancel.discard(job_id)
            self._notify()

    def _render_failed(self, row: JobRow | None, job_id: str, reason: str, *, requeued: bool = False, count: bool = False) -> None:
        if count:
            self.metrics.failed.labels(row.backend if row else "", reason).inc()
        detail = {"job_id": job_id, "reason": reason}
        if requeued:
            detail["requeued"] = True
        self._audit_quietly("job.render", WORKER_ACTOR, outcome="failed", person=row.person_ref if row else "",
                            data=[row.payload_sha256] if row else [], detail=detail)  # fmt: skip

    def _fail_quietly(self, job_id: str, reason: str, message: str) -> None:
        try:
            self.store.set_terminal(job_id, FAILED, reason, message)
        except Exception:  # the store itself failed: nothing more to record
            log.exception("job %s: cannot record failure", short_hash(job_id))


def _actor(owner: str | None) -> str:
    """Who asked, as the audit log names it: the client certificate's identity, or the node itself."""
    return f"client:{owner}" if owner else "node"


def _safe_id(value: object) -> str:
    """An id from a request as the audit log may record it: only when well-formed (never arbitrary bytes)."""
    return value if isinstance(value, str) and valid_id(value) else ""


def _dir_stamp(root: Path) -> tuple:
    """(name, mtime_ns, size) of `root`, its site folders and their files: changes whenever a key is added or removed."""
    try:
        out: list[tuple] = [("", root.stat().st_mtime_ns, 0)]
        for site in sorted(os.scandir(root), key=lambda e: e.name):
            if site.is_dir():
                out.append((site.name, site.stat().st_mtime_ns, 0))
                for f in sorted(os.scandir(site.path), key=lambda e: e.name):
                    st = f.stat()
                    out.append((f"{site.name}/{f.name}", st.st_mtime_ns, st.st_size))
    except FileNotFoundError:
        return ()
    return tuple(out)


def _request_digest(req: SubmitRequest, backend: str) -> str:
    """What makes two submissions the same job: payload, template, backend, stages, seed and params."""
    return sha256_hex(canonical_json({
        "payload": sha256_hex(req.sealed_payload), "template": sha256_hex(req.template_image), "backend": backend,
        "stages": list(req.stages.enabled()), "seed": req.seed, "params": req.params or {},
    }))


def _read_store_key(path: Path) -> bytes:
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the job store key ({exc.strerror or exc})") from exc
    if len(key) != 32:
        raise KeyFileError(f"{path}: a store key is 32 bytes, this file has {len(key)}")
    return key


def _check_id(name: str, value: str) -> None:
    if not value:
        raise InvalidRequest(f"{name} is required")
    if not valid_id(value):
        raise InvalidRequest(f"{name} must be 1-128 chars of [A-Za-z0-9._:-], got {value[:40]!r}")


def _decode_template(data: bytes) -> SourceImage:
    from megaportrait.shared.errors import PhotoRejected

    try:
        return load_image(data, origin="template", max_pixels=MAX_TEMPLATE_PIXELS)
    except PhotoRejected as exc:
        raise InvalidRequest(f"template_image: {exc.reason}: {exc.detail}", reason="invalid_template") from exc

