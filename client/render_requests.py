"""The site's render jobs, all in this module: connecting to the render node over mutual TLS, sealing and submitting
a person's payload, following the job, fetching and checking the portrait, and listing, cancelling and deleting jobs.

Every job the site sends is first written to its job book (`JobBook`, SQLite in the state folder) together with the
sealed payload (staged in the site's `payloads` store), so a re-run of the same request picks up the same job id
and resubmits the same bytes (the node answers idempotently): nothing is lost or sent twice when the node was down
or went away mid-job. The staged payload is deleted (and read back) once the node has finished with the job.
Before a portrait is saved the person's consent is checked again: if it ended meanwhile, the job is deleted at the
node and nothing is saved.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from megaportrait.shared.errors import MegaPortraitError
from megaportrait.shared.records import StageSwitches, sha256_hex

from .site import Site

log = logging.getLogger("megaportrait.client.render")

STAGES = ("identity", "shading", "harmonize")
BACKEND_PURPOSE = {"classic": "classic_face_crop_payload", "diffusion": "render"}
REASON_KEY = "megaportrait-reason"
FINISHED = ("collected", "failed", "cancelled", "withdrawn", "deleted")


class RenderNodeUnreachable(MegaPortraitError):
    """The render node did not answer at its address."""

    reason = "render_node_unreachable"


class RenderNodeSetup(MegaPortraitError):
    """The site's render-node settings are incomplete or do not match the node (files, certificate, node key)."""

    reason = "render_node_setup"


class RenderRefused(MegaPortraitError):
    """The node or the site refused a render; the message says why and what to do."""

    reason = "render_refused"


# ------------------------------------------------------------------------------------------------ connection


@dataclass
class NodeConnection:
    """An open mTLS channel to the render node, its keys as checked against the site's `node_public.json`."""

    address: str
    stub: Any
    channel: Any
    node_id: str
    hpke_public: Any
    signing_public: Any
    timeout_s: float = 600.0

    def close(self) -> None:
        self.channel.close()


def open_connection(address: str, tls: Any, expected: Any = None, *, timeout_s: float = 600.0,
                    connect_timeout_s: float = 10.0) -> NodeConnection:
    """Connect with `tls` (`server.render.service.TLSFiles`) and read the node's keys (`GetNodeInfo`). With
    `expected` (`NodePublicKeys` from node_public.json) a node whose keys differ is refused (RenderNodeSetup)."""
    import grpc
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from megaportrait.protos import render_pb2 as pb
    from megaportrait.server.render.service import client_channel, stub
    from megaportrait.shared.crypto import HpkePublicKey

    channel = client_channel(address, tls)
    client = stub(channel)
    try:
        info = client.GetNodeInfo(pb.NodeInfoRequest(), timeout=connect_timeout_s)
    except grpc.RpcError as err:
        channel.close()
        raise _transport_error(err, address) from None
    hpke = HpkePublicKey.from_bytes(info.hpke_public_key)
    signing = Ed25519PublicKey.from_public_bytes(info.signing_public_key)
    if hpke.fingerprint() != info.hpke_fingerprint:
        channel.close()
        raise RenderNodeSetup(f"the render node at {address} sent an HPKE key that does not match its own fingerprint")
    if expected is not None and (expected.hpke.fingerprint() != hpke.fingerprint()
                                 or expected.signing.public_bytes_raw() != signing.public_bytes_raw()):
        channel.close()
        raise RenderNodeSetup(
            f"the render node at {address} ({info.node_id}) does not hold the keys in the site's node_public.json "
            f"({expected.node_id}, HPKE {expected.hpke.fingerprint()[:16]}, node has {hpke.fingerprint()[:16]}): ask "
            "the node operator for its current node_public.json (site.render_node.node_public), or fix "
            "site.render_node.address")
    return NodeConnection(address, client, channel, info.node_id, hpke, signing, timeout_s)


def connect(link: Any) -> NodeConnection:
    """Connect as `site.render_node` (`shared.config.RenderNodeLink`) says; each missing file is named with its fix."""
    from megaportrait.server.render.service import TLSFiles
    from megaportrait.shared.crypto import NodePublicKeys
    from megaportrait.shared.crypto import KeyFileError

    files = {}
    for name, hint in (("ca", "the CA certificate from `megaportrait pki init` (pki/sites/<site>/ca.pem)"),
                       ("cert", "this site's client certificate (pki/sites/<site>/<site>.pem)"),
                       ("key", "this site's client key (pki/sites/<site>/<site>.key)"),
                       ("node_public", "the node's node_public.json from `megaportrait render-node keygen`")):
        path = Path(getattr(link, name))
        try:
            files[name] = path.read_bytes()
        except OSError as exc:
            raise RenderNodeSetup(f"site.render_node.{name}: cannot read {path} ({exc.strerror or exc}); it should "
                                  f"be {hint}") from None
    try:
        expected = NodePublicKeys.load(link.node_public)
    except (KeyFileError, ValueError) as exc:
        raise RenderNodeSetup(f"site.render_node.node_public: {exc}") from None
    for name in ("ca", "cert"):
        if b"-----BEGIN CERTIFICATE-----" not in files[name]:
            raise RenderNodeSetup(f"site.render_node.{name}: {getattr(link, name)} is not a PEM certificate")
    if b"PRIVATE KEY-----" not in files["key"]:
        raise RenderNodeSetup(f"site.render_node.key: {link.key} is not a PEM private key")
    tls = TLSFiles(files["ca"], files["cert"], files["key"])
    return open_connection(link.address, tls, expected, timeout_s=link.timeout_s)


def _witnessed(site: Site, reply: Any) -> Any:
    """Keep the node's audit checkpoint that came with `reply` in the site's witness store; return the reply."""
    site.witness.keep_reply(reply)
    return reply


def _reason(err: Any) -> str:
    for key, value in (err.trailing_metadata() or ()):
        if key == REASON_KEY:
            return value
    return ""


def _transport_error(err: Any, address: str) -> MegaPortraitError:
    """A clear error for an RPC that failed before the node could answer (down, TLS refused)."""
    import grpc

    details = err.details() or ""
    if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        low = details.lower()
        if any(w in low for w in ("ssl", "handshake", "certificate", "tls", "socket closed")):
            return RenderNodeSetup(
                f"the render node at {address} refused this site's TLS connection ({details[:160]}): check that "
                "site.render_node.cert and .key are this site's certificate from the same CA as the node's "
                "(site.render_node.ca), and that the node's certificate names this address")
        return RenderNodeUnreachable(f"render node at {address} is not reachable ({err.code().name}: "
                                     f"{details[:400]}); check that it runs and site.render_node.address, then run "
                                     "the same command again: the job is picked up where it stopped")
    if err.code() == grpc.StatusCode.UNAUTHENTICATED:
        return RenderNodeSetup(f"the render node at {address} does not accept this site: {details}. Give the node "
                               "operator this site's public key file (policy.audit_key + '.pub') for "
                               "`megaportrait render-node trust-site`, and check the client certificate")
    return RenderRefused(f"render node at {address}: {err.code().name}: {details}", reason=_reason(err) or
                         "render_refused")


# ------------------------------------------------------------------------------------------------ job book


@dataclass
class JobRecord:
    """One render job as the site knows it."""

    job_id: str
    person_ref: str
    backend: str
    template: str
    template_sha256: str
    stages: str
    seed: int
    params: dict
    request_key: str
    state: str
    created_at: str
    updated_at: str
    payload_item: str = ""
    portrait_item: str = ""
    error: str = ""
    figures: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, person_ref TEXT NOT NULL, backend TEXT NOT NULL, template TEXT NOT NULL,
    template_sha256 TEXT NOT NULL, stages TEXT NOT NULL, seed INTEGER NOT NULL, params TEXT NOT NULL,
    request_key TEXT NOT NULL, state TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    payload_item TEXT NOT NULL DEFAULT '', portrait_item TEXT NOT NULL DEFAULT '', error TEXT NOT NULL DEFAULT '',
    figures TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS jobs_request ON jobs (request_key);
CREATE INDEX IF NOT EXISTS jobs_person ON jobs (person_ref);
"""


class JobBook:
    """The site's render jobs in SQLite: what was asked, its state, the staged payload and the saved portrait."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _rows(self, sql: str, args: tuple = ()) -> list[JobRecord]:
        with self._lock:
            cur = self._conn.execute(sql, args)
            names = [d[0] for d in cur.description]
            rows = cur.fetchall()
        out = []
        for row in rows:
            d = dict(zip(names, row))
            d["params"], d["figures"] = json.loads(d["params"]), json.loads(d["figures"])
            out.append(JobRecord(**d))
        return out

    def add(self, rec: JobRecord) -> None:
        d = asdict(rec)
        d["params"], d["figures"] = json.dumps(rec.params, sort_keys=True), json.dumps(rec.figures)
        with self._lock:
            self._conn.execute(f"INSERT INTO jobs ({', '.join(d)}) VALUES ({', '.join('?' * len(d))})",
                               tuple(d.values()))

    def update(self, job_id: str, **changes: Any) -> JobRecord:
        if "figures" in changes:
            changes["figures"] = json.dumps(changes["figures"])
        changes["updated_at"] = _now_iso()
        sets = ", ".join(f"{k} = ?" for k in changes)
        with self._lock:
            self._conn.execute(f"UPDATE jobs SET {sets} WHERE job_id = ?", (*changes.values(), job_id))
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        rows = self._rows("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        if not rows:
            raise RenderRefused(f"no job {job_id!r} in this site's job book ({self.path}); `megaportrait client "
                                "jobs list` shows the site's jobs", reason="unknown_job")
        return rows[0]

    def for_request(self, request_key: str) -> list[JobRecord]:
        return self._rows("SELECT * FROM jobs WHERE request_key = ? ORDER BY created_at", (request_key,))

    def all(self, person_ref: str | None = None) -> list[JobRecord]:
        if person_ref:
            return self._rows("SELECT * FROM jobs WHERE person_ref = ? ORDER BY created_at", (person_ref,))
        return self._rows("SELECT * FROM jobs ORDER BY created_at")

    name = "render_jobs"

    def delete_person(self, person_ref: str) -> list[str]:
        """Forget the person's jobs (revocation): returns their job ids."""
        ids = [r.job_id for r in self.all(person_ref)]
        with self._lock:
            self._conn.execute("DELETE FROM jobs WHERE person_ref = ?", (person_ref,))
        return ids

    def find_person(self, person_ref: str) -> list[str]:
        return [r.job_id for r in self.all(person_ref)]


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------ requests


@dataclass(frozen=True)
class RenderRequest:
    """What staff ask for: a person onto a template, with a backend, stages, seed and backend params."""

    person_ref: str
    template_name: str
    template: bytes
    backend: str = "classic"
    stages: StageSwitches = StageSwitches()
    seed: int = 0
    params: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Same key = same render: a re-run finds the job it started."""
        return sha256_hex(json.dumps({"person": self.person_ref, "template": sha256_hex(self.template),
                                      "backend": self.backend, "stages": list(self.stages.enabled()),
                                      "seed": self.seed, "params": self.params}, sort_keys=True).encode())


def parse_stages(text: str) -> StageSwitches:
    """`identity,shading,harmonize` (any subset, in any order) as switches; an unknown name is refused."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in STAGES]
    if bad or not names:
        raise RenderRefused(f"--stages: unknown stage(s) {', '.join(bad) or '(none given)'}; choose from "
                            f"{', '.join(STAGES)}", reason="bad_stages")
    return StageSwitches(*(s in names for s in STAGES))


def _seal(site: Site, conn: NodeConnection, payload: Any, job_id: str, backend: str, actor: str) -> bytes:
    from megaportrait.client.payload import seal_adapter, seal_face_crops
    from megaportrait.shared.records import FaceCropSet

    kw = dict(ledger=site.ledger, job_id=job_id, recipient=conn.hpke_public, site_id=site.site_id, site_key=site.key,
              backend=backend, actor=actor)
    if isinstance(payload, FaceCropSet):
        return seal_face_crops(payload, **kw)
    return seal_adapter(payload, **kw)


def submit_render(site: Site, conn: NodeConnection, request: RenderRequest, payload: Any = None, *,
                  job_id: str | None = None, actor: str = "operator:cli",
                  make_payload: Callable[[], Any] | None = None) -> JobRecord:
    """Seal and submit `request`, or pick up the job an earlier run of it started (same job id, same bytes).

    `payload` (FaceCropSet for classic, IdentityAdapter for diffusion) or `make_payload()` is used only for a new
    job. Consent is checked when sealing (ConsentMissing/Expired/Revoked naming the person ref and purpose).
    Raises RenderNodeUnreachable with the job kept staged, so a re-run resubmits it.
    """
    from megaportrait.shared.payload_format import Envelope

    book = site.jobs
    for rec in reversed(book.for_request(request.key)):
        if rec.state in ("collected", "sealed", "submitted", "succeeded") or (rec.state == "running"):
            if rec.state in ("sealed", "submitted") and rec.payload_item:
                _send(site, conn, rec, request, site.payloads.root / rec.payload_item)
                return book.get(rec.job_id)
            return rec
    job_id = job_id or f"{site.site_id}.{request.key[:20]}.{len(book.for_request(request.key))}"
    payload = payload if payload is not None else make_payload()
    sealed = _seal(site, conn, payload, job_id, request.backend, actor)
    header = Envelope.parse(sealed).header
    item = site.payloads.put(request.person_ref, f"{job_id[-100:]}.sealed", sealed)
    now = _now_iso()
    rec = JobRecord(job_id=job_id, person_ref=request.person_ref, backend=request.backend,
                    template=request.template_name, template_sha256=sha256_hex(request.template),
                    stages=",".join(request.stages.enabled()), seed=request.seed, params=dict(request.params),
                    request_key=request.key, state="sealed", created_at=now, updated_at=now,
                    payload_item=item.item_id)
    book.add(rec)
    site.audit.append("payload.seal", actor=actor, person=request.person_ref, data=[item.digest],
                      detail={"job": job_id, "kind": header.kind, "consent": header.consent_ref,
                              "backend": request.backend})
    _send(site, conn, rec, request, site.payloads.root / item.item_id)
    return book.get(job_id)


def _send(site: Site, conn: NodeConnection, rec: JobRecord, request: RenderRequest, sealed_path: Path) -> None:
    import grpc
    from megaportrait.protos import render_pb2 as pb
    from megaportrait.shared.payload_format import Envelope

    sealed = sealed_path.read_bytes()
    stages = request.stages
    try:
        status = _witnessed(site, conn.stub.SubmitJob(pb.SubmitJobRequest(
            job_id=rec.job_id, backend=request.backend, sealed_payload=sealed,
            consent_ref=Envelope.parse(sealed).header.consent_ref, template_image=request.template,
            seed=request.seed, params_json=json.dumps(request.params),
            stages=pb.StageSwitches(identity=stages.identity, shading=stages.shading, harmonize=stages.harmonize)),
            timeout=conn.timeout_s))
    except grpc.RpcError as err:
        error = _transport_error(err, conn.address)
        if isinstance(error, RenderRefused):  # the node looked at it and said no: the staged payload goes
            _drop_payload(site, rec, actor="site")
            site.jobs.update(rec.job_id, state="failed", error=f"{_reason(err) or err.code().name}: {err.details()}")
            site.audit.append("render.submit", actor="site", outcome="refused", person=rec.person_ref,
                              detail={"job": rec.job_id, "reason": _reason(err) or err.code().name})
        raise error from None
    site.jobs.update(rec.job_id, state="submitted")
    site.audit.append("render.submit", actor="site", person=rec.person_ref,
                      detail={"job": rec.job_id, "existing": status.existing, "node": conn.node_id})


def _drop_payload(site: Site, rec: JobRecord, actor: str) -> None:
    """Delete the job's staged payload and read it back; audited."""
    if not rec.payload_item:
        return
    path = site.payloads.root / rec.payload_item
    if path.exists():
        digest = sha256_hex(path.read_bytes())
        path.unlink()
        try:
            path.parent.rmdir()
        except OSError:
            pass
        site.audit.append("payload.unstage", actor=actor, outcome="ok" if not path.exists() else "failed",
                          person=rec.person_ref, data=[digest], detail={"job": rec.job_id})
    site.jobs.update(rec.job_id, payload_item="")


def follow(site: Site, conn: NodeConnection, job_id: str,
           on_progress: Callable[[str, float, str], None] | None = None) -> str:
    """Follow the job at the node until it ends; `on_progress(stage, fraction, state)`. Returns the node's final
    state (succeeded, failed, cancelled). A job the node no longer has (deleted) is recorded as such."""
    import grpc
    from megaportrait.protos import render_pb2 as pb

    last = None
    try:
        for update in conn.stub.StreamProgress(pb.JobRef(job_id=job_id), timeout=conn.timeout_s):
            last = update
            if on_progress:
                on_progress(update.stage, update.fraction, _state_name(update.state))
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            site.jobs.update(job_id, state="deleted", error="the render node no longer has this job")
            return "deleted"
        raise _transport_error(err, conn.address) from None
    state = _state_name(last.state) if last is not None else "unknown"
    if state in ("succeeded", "failed", "cancelled"):
        rec = site.jobs.get(job_id)
        error = ""
        if state != "succeeded":
            status = _witnessed(site, conn.stub.GetJob(pb.JobRef(job_id=job_id), timeout=conn.timeout_s))
            error = f"{status.error_reason}: {status.error_message}"
        site.jobs.update(job_id, state=state, error=error)
        _drop_payload(site, rec, actor="site")  # the node has what it needs; a finished job is never resubmitted
    return state


def _state_name(state: int) -> str:
    from megaportrait.protos import render_pb2 as pb

    return pb.JobState.Name(state).removeprefix("JOB_STATE_").lower()


@dataclass
class Portrait:
    """A fetched, checked and saved portrait and the site's figures on it."""

    job_id: str
    png: bytes
    metadata: dict
    path: Path
    figures: dict


def fetch_portrait(site: Site, conn: NodeConnection, job_id: str, *, analyzer: Any = None,
                   held_out: list | None = None, actor: str = "operator:cli") -> Portrait:
    """Fetch a finished job's portrait, check its hash, provenance label and metadata, check the person's consent
    again, and save it in the site's portraits store. Consent ended meanwhile: the job is deleted at the node,
    nothing is saved, and the ConsentError is raised. `held_out`: embeddings of the person's photos the payload did
    not carry, for the site's own identity score (needs `analyzer`)."""
    import grpc
    from megaportrait.protos import render_pb2 as pb
    from megaportrait.shared.consent import ConsentError
    from megaportrait.shared.imaging import AI_GENERATED_LABEL, read_png_metadata

    rec = site.jobs.get(job_id)
    if rec.state == "collected" and rec.portrait_item:
        path = site.portraits.root / rec.portrait_item
        png = path.read_bytes()
        return Portrait(job_id, png, read_png_metadata(png), path, rec.figures)
    try:
        site.ledger.require(rec.person_ref, BACKEND_PURPOSE.get(rec.backend, "render"), actor=actor)
    except ConsentError:
        delete_jobs(site, conn, [job_id], actor=actor, state="withdrawn")
        raise
    try:
        result = _witnessed(site, conn.stub.FetchResult(pb.JobRef(job_id=job_id), timeout=conn.timeout_s))
    except grpc.RpcError as err:
        raise _transport_error(err, conn.address) from None
    if sha256_hex(result.png) != result.png_sha256:
        raise RenderRefused(f"job {job_id}: the portrait's bytes do not match their hash; fetch it again",
                            reason="portrait_corrupt")
    metadata = json.loads(result.metadata_json)
    embedded = read_png_metadata(result.png)
    if metadata.get("provenance") != AI_GENERATED_LABEL or AI_GENERATED_LABEL not in embedded.get("xmp", ""):
        raise RenderRefused(f"job {job_id}: the portrait lacks the AI-generated provenance label; it is not saved",
                            reason="provenance_missing")
    if metadata.get("person_ref", rec.person_ref) != rec.person_ref:
        raise RenderRefused(f"job {job_id}: the portrait's metadata names another person; it is not saved",
                            reason="metadata_mismatch")
    figures = portrait_figures(result.png, metadata, analyzer, held_out)
    item = site.portraits.put(rec.person_ref, f"{job_id[-100:]}.png", result.png)
    site.jobs.update(job_id, state="collected", portrait_item=item.item_id, figures=figures)
    site.audit.append("render.result", actor=actor, person=rec.person_ref, data=[item.digest],
                      detail={"job": job_id, "backend": rec.backend})
    return Portrait(job_id, result.png, metadata, site.portraits.root / item.item_id, figures)


def portrait_figures(png: bytes, metadata: dict, analyzer: Any = None, held_out: list | None = None) -> dict:
    """Identity and skin-tone figures: the node's (payload identity score, ITA of person, template and output) and,
    with `analyzer` and `held_out` embeddings, the site's identity cosine against the held-out photos."""
    from megaportrait.shared.portrait_metrics import tone_kept

    ita = metadata.get("ita") or {}
    figures = {"identity_payload": metadata.get("identity_score"), "identity": None, "face_found": None,
               "ita_person": ita.get("person"), "ita_template": ita.get("template"), "ita_output": ita.get("output"),
               "tone_kept": None, "fallbacks": list(metadata.get("fallbacks", []))}
    if figures["ita_person"] is not None and figures["ita_template"] is not None:
        figures["tone_kept"] = tone_kept(figures["ita_output"], figures["ita_person"], figures["ita_template"])
    if analyzer is not None:
        from megaportrait.shared.face_analysis import cosine, mean_embedding
        from megaportrait.shared.imaging import decode_png
        from megaportrait.shared.portrait_metrics import output_face

        face = output_face(analyzer, decode_png(png))
        figures["face_found"] = face is not None and face.embedding is not None
        if figures["face_found"] and held_out:
            figures["identity"] = float(cosine(face.embedding, mean_embedding(held_out)))
    return figures


def refresh(site: Site, conn: NodeConnection, job_id: str) -> JobRecord:
    """The job's state at the node, recorded in the book (a job the node lost is recorded as deleted)."""
    import grpc
    from megaportrait.protos import render_pb2 as pb

    rec = site.jobs.get(job_id)
    if rec.finished or rec.state == "sealed":
        return rec
    try:
        status = _witnessed(site, conn.stub.GetJob(pb.JobRef(job_id=job_id), timeout=conn.timeout_s))
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            return site.jobs.update(job_id, state="deleted", error="the render node no longer has this job")
        raise _transport_error(err, conn.address) from None
    state = _state_name(status.state)
    error = f"{status.error_reason}: {status.error_message}" if status.error_reason else ""
    return site.jobs.update(job_id, state=state if state != "queued" else "submitted", error=error)


def progress(conn: NodeConnection, job_id: str) -> tuple[str, float]:
    """(stage, fraction) of a job at the node now."""
    import grpc
    from megaportrait.protos import render_pb2 as pb

    try:
        status = conn.stub.GetJob(pb.JobRef(job_id=job_id), timeout=30)
    except grpc.RpcError as err:
        raise _transport_error(err, conn.address) from None
    return status.stage, status.fraction


def cancel_job(site: Site, conn: NodeConnection, job_id: str, *, actor: str = "operator:cli") -> JobRecord:
    """Ask the node to cancel a queued or running job."""
    import grpc
    from megaportrait.protos import render_pb2 as pb

    rec = site.jobs.get(job_id)
    try:
        status = _witnessed(site, conn.stub.CancelJob(pb.JobRef(job_id=job_id), timeout=conn.timeout_s))
    except grpc.RpcError as err:
        raise _transport_error(err, conn.address) from None
    site.audit.append("render.cancel", actor=actor, person=rec.person_ref, detail={"job": job_id})
    state = _state_name(status.state)
    rec = site.jobs.update(job_id, state="cancelled" if state == "cancelled" else rec.state)
    if state == "cancelled":
        _drop_payload(site, rec, actor)
    return site.jobs.get(job_id)


def delete_jobs(site: Site, conn: NodeConnection, job_ids: list[str], *, actor: str = "operator:cli",
                state: str = "deleted") -> Any:
    """Delete jobs at the node (signed statement verified with the node's key) and their staged payloads and saved
    portraits at the site, each read back and audited. Returns the node's `DeletionConfirmation`."""
    import grpc
    from megaportrait.protos import render_pb2 as pb
    from megaportrait.shared.deletion import DeletionConfirmation, DeletionSignatureInvalid, verify_deletion

    recs = [site.jobs.get(j) for j in job_ids]
    try:
        raw = _witnessed(site, conn.stub.DeleteJobs(pb.DeleteJobsRequest(job_ids=job_ids), timeout=conn.timeout_s))
        conf = DeletionConfirmation.from_raw(raw, conn.signing_public)
        try:
            verify_deletion(conf, conn.signing_public)
        except (DeletionSignatureInvalid, ValueError) as exc:
            raise RenderRefused(f"the node's deletion statement does not verify: {exc}", reason="bad_statement")
        if not conf.all_gone or not set(job_ids) <= set(conf.job_ids):
            raise RenderRefused(f"the node's deletion statement does not cover every job asked for ({job_ids}) "
                                "with its key destroyed", reason="deletion_unconfirmed")
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise _transport_error(err, conn.address) from None
        conf = None  # the node has none of them any more
    for rec in recs:
        _drop_payload(site, rec, actor)
        if rec.portrait_item:
            path = site.portraits.root / rec.portrait_item
            digest = sha256_hex(path.read_bytes()) if path.exists() else ""
            path.unlink(missing_ok=True)
            site.audit.append("render.portrait_delete", actor=actor, outcome="failed" if path.exists() else "ok",
                              person=rec.person_ref, data=[digest] if digest else [], detail={"job": rec.job_id})
        site.jobs.update(rec.job_id, state=state, portrait_item="", figures={})
    site.audit.append("render.delete", actor=actor, person=recs[0].person_ref if len(recs) == 1 else "",
                      data=list(conf.deleted) if conf else [],
                      detail={"jobs": job_ids, "node_confirmed": conf is not None, "state": state})
    return conf


class PersonDeleter:
    """`shared.consent.RenderNodeDeleter` over the node's DeletePerson, for revocation (`client.revocation`)."""

    def __init__(self, conn: NodeConnection, site: Site | None = None) -> None:
        self.conn = conn
        self.site = site

    def delete_person(self, person_ref: str):
        from megaportrait.protos import render_pb2 as pb

        reply = self.conn.stub.DeletePerson(pb.DeletePersonRequest(person_ref=person_ref), timeout=120)
        return _witnessed(self.site, reply) if self.site is not None else reply


def wait_for_portrait(site: Site, conn: NodeConnection, job_id: str, *, analyzer: Any = None,
                      held_out: list | None = None, on_progress: Callable[[str, float, str], None] | None = None,
                      actor: str = "operator:cli") -> tuple[JobRecord, Portrait | None]:
    """Follow a submitted job and fetch its portrait when it succeeds; (the job, the portrait or None)."""
    rec = site.jobs.get(job_id)
    if rec.state != "collected":
        state = follow(site, conn, job_id, on_progress)
        if state != "succeeded":
            return site.jobs.get(job_id), None
    portrait = fetch_portrait(site, conn, job_id, analyzer=analyzer, held_out=held_out, actor=actor)
    return site.jobs.get(job_id), portrait

