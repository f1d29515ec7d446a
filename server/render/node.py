"""The render node: its keys, trusted sites, job store, backends and worker pool, wired together.

`RenderNode` is the transport-free core (the gRPC service in `service.py` is a thin adapter over it):
submit -> verify the sealed payload -> store it encrypted -> a worker opens it in memory, renders, stores the
encrypted result -> fetch -> delete (data key destroyed, signed confirmation).

State directory layout::

    <state_dir>/keys/node_hpke.json       HPKE private key (0600)
    <state_dir>/keys/node_signing.pem     Ed25519 private key (0600)
    <state_dir>/keys/store.key            AES-256 key wrapping every job's data key (0600)
    <state_dir>/node_public.json          what sites need: HPKE public key, signing key, fingerprints
    <state_dir>/trusted_sites/<site>/<fingerprint>.pem
    <state_dir>/jobs.sqlite
"""
from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from megaportrait.shared.crypto import (
    HpkePrivateKey,
    KeyFileError,
    NodePublicKeys,
    canonical_json,
    ed25519_fingerprint,
    load_ed25519_private,
    load_hpke_private,
    new_data_key,
    save_ed25519_private,
    save_hpke_private,
    sign,
    verify,
    write_secret,
)
from megaportrait.shared.errors import MegaPortraitError
from megaportrait.shared.imaging import encode_png, load_image
from megaportrait.shared.logs import short_hash
from megaportrait.shared.payload_format import Envelope, valid_id
from megaportrait.shared.records import SourceImage, StageSwitches, sha256_hex

from .backends import BackendRegistry, default_registry
from .jobs import CANCELLED, FAILED, QUEUED, RUNNING, JobNotFound, JobRow, JobStore, NewJob
from .payloads import Expectation, TrustedSites, open_identity, verify_envelope

log = logging.getLogger("megaportrait.render.node")

DELETION_DOMAIN = "megaportrait/render-deletion/v1"
API_VERSION = "megaportrait.render.v1"
MAX_TEMPLATE_PIXELS = 40_000_000


class InvalidRequest(MegaPortraitError):
    """A request field is missing or malformed; the message names the field."""

    reason = "invalid_request"


class NotJobOwner(MegaPortraitError):
    """The caller's certificate identity is not the one that submitted the job."""

    reason = "not_job_owner"


class JobCancelled(MegaPortraitError):
    """Raised inside a render when its job was cancelled."""

    reason = "cancelled"


class NodeShuttingDown(MegaPortraitError):
    """Raised inside a render when the node stops; the job is re-queued and resumes on restart."""

    reason = "node_shutting_down"


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


# ---------------------------------------------------------------------------------------- deletion statement


@dataclass(frozen=True)
class DeletionConfirmation:
    """A node-signed statement that these jobs' data keys and data were destroyed."""

    statement: bytes  # canonical JSON
    signature: bytes
    signer_fingerprint: str
    job_ids: tuple[str, ...]


def verify_deletion(confirmation: DeletionConfirmation, node_signing_key: Ed25519PublicKey) -> dict:
    """The statement as a dict when the node's signature verifies over it; raises MegaPortraitError otherwise."""
    if not verify(node_signing_key, DELETION_DOMAIN, confirmation.statement, confirmation.signature):
        raise MegaPortraitError("deletion confirmation signature does not verify with this node key", reason="deletion_signature_invalid")
    return json.loads(confirmation.statement)


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


class RenderNode:
    """Accepts sealed jobs, renders them on a worker pool, keeps results encrypted until deleted."""

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
    ) -> None:
        self.state_dir = Path(state_dir)
        self.identity = identity
        self.trusted = trusted
        self.registry = registry or default_registry()
        self.default_backend = default_backend
        self.max_attempts = max_attempts
        self.store = JobStore(self.state_dir / "jobs.sqlite", store_key=identity.store_key)
        self._hpke_fp = identity.hpke.public_key().fingerprint()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="render")
        self._changed = threading.Condition()
        self._version = 0
        self._cancel: set[str] = set()
        self._stopping = threading.Event()

    @classmethod
    def from_state_dir(cls, state_dir: str | Path, **kwargs) -> "RenderNode":
        """A node using the keys and trusted sites found under `state_dir` (see the module docstring)."""
        state_dir = Path(state_dir)
        return cls(state_dir, identity=NodeIdentity.load(state_dir), trusted=TrustedSites.load(state_dir / "trusted_sites"), **kwargs)

    # ------------------------------------------------------------------------------------ lifecycle

    def start(self) -> tuple[list[str], list[str]]:
        """Recover jobs left running by a previous process and queue every waiting job.

        Returns (resumed job ids, job ids ended because they cannot be resumed).
        """
        resumed, ended = self.store.recover(self.max_attempts)
        for job_id in resumed:
            log.info("job %s resumes after restart", short_hash(job_id))
        for job_id in ended:
            log.warning("job %s ended after restart: %s", short_hash(job_id), self.store.get(job_id).error_reason)
        self.store.prune_nonces(int(time.time()))
        for job_id in self.store.ids_in_state(QUEUED):
            self._pool.submit(self._run, job_id)
        return resumed, ended

    def stop(self) -> None:
        """Stop taking work; running renders stop at their next progress report and are re-queued for restart."""
        self._stopping.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._notify()
        self.store.close()

    # ------------------------------------------------------------------------------------ requests

    def submit(self, req: SubmitRequest, owner: str) -> tuple[JobRow, bool]:
        """Check and queue a job. Returns (job, existing) where existing means an idempotent resubmit."""
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
            return existing, True  # idempotent resubmit: the same bytes were verified the first time
        env = verify_envelope(
            req.sealed_payload,
            node_key_fingerprint=self._hpke_fp,
            trusted=self.trusted,
            expect=Expectation(job_id=req.job_id, consent_ref=req.consent_ref, backend=backend, payload_kind=entry.payload_kind),
        )
        identity = open_identity(env, self.identity.hpke)  # decodes in memory to refuse a bad payload now, not later
        del identity
        template = _decode_template(req.template_image)
        h = env.header
        row, was_there = self.store.create(
            NewJob(
                job_id=req.job_id, backend=backend, payload_kind=h.kind, person_ref=h.person_ref, consent_ref=h.consent_ref,
                site_id=h.site_id, owner=owner, nonce=h.nonce, payload_expires_at=h.expires_at, request_sha256=request_sha, stages=req.stages,
                seed=req.seed, params=dict(req.params or {}),
            ),
            req.sealed_payload,
            req.template_image,
        )
        if not was_there:
            log.info("job %s queued on backend %s (template %s)", short_hash(req.job_id), backend, template.sha256[:12])
            self._pool.submit(self._run, req.job_id)
            self._notify()
        return row, was_there

    def get(self, job_id: str, owner: str | None) -> JobRow:
        row = self.store.get(job_id)
        self._check_owner(row, owner)
        return row

    def result(self, job_id: str, owner: str | None) -> tuple[bytes, dict]:
        self.get(job_id, owner)
        return self.store.load_result(job_id)

    def cancel(self, job_id: str, owner: str | None) -> JobRow:
        self.get(job_id, owner)
        row = self.store.request_cancel(job_id)
        if row.state == RUNNING:
            self._cancel.add(job_id)
        self._notify()
        return row

    def delete_jobs(self, job_ids: list[str], owner: str | None, reason: str = "requested by the job owner") -> DeletionConfirmation:
        """Destroy the jobs (a running one is cancelled first) and return a signed confirmation."""
        if not job_ids:
            raise InvalidRequest("job_ids is empty")
        for job_id in job_ids:
            _check_id("job_id", job_id)
            row = self.get(job_id, owner)
            if row.state == RUNNING:
                self._cancel.add(job_id)
        deleted = self.store.delete(list(dict.fromkeys(job_ids)), reason)
        self._notify()
        return self._confirm(deleted, reason, person_ref=None)

    def delete_person(self, person_ref: str, owner: str | None = None, reason: str = "consent revoked") -> DeletionConfirmation:
        """Destroy every job of `person_ref` (only the caller's when `owner` is given); used by consent revocation."""
        _check_id("person_ref", person_ref)
        job_ids = self.store.person_job_ids(person_ref, owner)
        for job_id in job_ids:
            self._cancel.add(job_id)
        deleted = self.store.delete(job_ids, reason) if job_ids else []
        self._notify()
        return self._confirm(deleted, reason, person_ref=person_ref)

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

    # ------------------------------------------------------------------------------------ internals

    def _check_owner(self, row: JobRow, owner: str | None) -> None:
        if owner is not None and row.owner != owner:
            raise NotJobOwner(f"job {row.job_id!r} belongs to another client identity; only its submitter may use it")

    def _notify(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def _confirm(self, deleted: list, reason: str, person_ref: str | None) -> DeletionConfirmation:
        statement = canonical_json(
            {
                "type": DELETION_DOMAIN,
                "node_id": self.identity.node_id,
                "deleted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "reason": reason,
                "person_ref": person_ref,
                "jobs": [
                    {"job_id": d.job_id, "payload_sha256": d.payload_sha256, "result_sha256": d.result_sha256, "data_key_destroyed": d.data_key_destroyed}
                    for d in deleted
                ],
            }
        )
        return DeletionConfirmation(
            statement=statement,
            signature=sign(self.identity.signing, DELETION_DOMAIN, statement),
            signer_fingerprint=ed25519_fingerprint(self.identity.signing),
            job_ids=tuple(d.job_id for d in deleted),
        )

    def _run(self, job_id: str) -> None:
        """Worker: one job from queued to a terminal state (or back to queued when the node stops)."""
        if self._stopping.is_set():
            return
        try:
            if not self.store.mark_running(job_id):
                return
        except JobNotFound:
            return
        self._notify()
        try:
            row = self.store.get(job_id)
            sealed, template_bytes = self.store.load_inputs(job_id)
            identity = open_identity(Envelope.parse(sealed), self.identity.hpke)
            del sealed
            template = _decode_template(template_bytes)
            backend = self.registry.get(row.backend)

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
            self.store.finish(job_id, encode_png(portrait.pixels, metadata), metadata)
            log.info("job %s succeeded", short_hash(job_id))
        except NodeShuttingDown:
            self.store.requeue(job_id, "the node stopped during this job; it resumes on restart")
        except JobCancelled:
            self.store.set_terminal(job_id, CANCELLED, "cancelled", "cancelled while rendering")
        except JobNotFound:
            log.info("job %s was deleted while rendering; its output is discarded", short_hash(job_id))
        except MegaPortraitError as exc:
            log.warning("job %s failed: %s", short_hash(job_id), exc.reason)
            self._fail_quietly(job_id, exc.reason, str(exc))
        except Exception as exc:  # a backend bug must end the job with a reason, not kill the worker
            log.exception("job %s: backend error", short_hash(job_id))
            self._fail_quietly(job_id, "backend_error", f"{type(exc).__name__}: {exc}")
        finally:
            self._cancel.discard(job_id)
            self._notify()

    def _fail_quietly(self, job_id: str, reason: str, message: str) -> None:
        try:
            self.store.set_terminal(job_id, FAILED, reason, message)
        except Exception:  # the store itself failed: nothing more to record
            log.exception("job %s: cannot record failure", short_hash(job_id))


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

