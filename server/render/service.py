"""The render node's gRPC service (megaportrait.render.v1.RenderNode) over mutual TLS.

A thin adapter over `RenderNode`: it reads the caller's identity from its client certificate, converts messages,
and maps every refusal type to a gRPC status code with ``"<reason>: <message>"`` as details (and the reason alone in
the trailing metadata key `megaportrait-reason`).
"""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from megaportrait.protos import render_pb2 as pb
from megaportrait.protos import render_pb2_grpc as pb_grpc
from google.protobuf.message import DecodeError

from megaportrait.shared.audit import AuditError, Checkpoint
from megaportrait.shared.crypto import HPKE_SUITE_NAME, KeyFileError, ed25519_fingerprint
from megaportrait.shared.errors import MegaPortraitError
from megaportrait.shared.payload_format import (
    ConsentScopeRefused,
    PayloadBindingMismatch,
    PayloadExpired,
    PayloadMalformed,
    PayloadReplayed,
    PayloadTampered,
    UnknownSite,
    WrongRecipientKey,
)
from megaportrait.shared.records import StageSwitches, sha256_hex

from .backends import UnknownBackend
from .jobs import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobConflict, JobNotFound, JobNotReady, JobRow
from .node import (
    API_VERSION,
    DeletionConfirmation,
    InvalidRequest,
    NodeShuttingDown,
    NotJobOwner,
    RenderNode,
    SiteMismatch,
    SubmitRequest,
    TrustedSitesUnavailable,
)

log = logging.getLogger("megaportrait.render.service")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
REASON_METADATA_KEY = "megaportrait-reason"

_STATE = {
    QUEUED: pb.JOB_STATE_QUEUED, RUNNING: pb.JOB_STATE_RUNNING, SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    FAILED: pb.JOB_STATE_FAILED, CANCELLED: pb.JOB_STATE_CANCELLED,
}

# Most specific first: the first class in an error's MRO found here decides the code.
STATUS_FOR_ERROR: dict[type[MegaPortraitError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    PayloadMalformed: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownBackend: grpc.StatusCode.INVALID_ARGUMENT,
    ConsentScopeRefused: grpc.StatusCode.PERMISSION_DENIED,
    PayloadBindingMismatch: grpc.StatusCode.PERMISSION_DENIED,
    PayloadTampered: grpc.StatusCode.PERMISSION_DENIED,
    UnknownSite: grpc.StatusCode.UNAUTHENTICATED,
    WrongRecipientKey: grpc.StatusCode.FAILED_PRECONDITION,
    PayloadExpired: grpc.StatusCode.FAILED_PRECONDITION,
    PayloadReplayed: grpc.StatusCode.ALREADY_EXISTS,
    JobConflict: grpc.StatusCode.ALREADY_EXISTS,
    JobNotFound: grpc.StatusCode.NOT_FOUND,
    JobNotReady: grpc.StatusCode.FAILED_PRECONDITION,
    NotJobOwner: grpc.StatusCode.PERMISSION_DENIED,
    SiteMismatch: grpc.StatusCode.PERMISSION_DENIED,
    NodeShuttingDown: grpc.StatusCode.UNAVAILABLE,
    TrustedSitesUnavailable: grpc.StatusCode.UNAVAILABLE,
    AuditError: grpc.StatusCode.UNAVAILABLE,  # nothing is done or handed out without its audit entry
}


def status_for(exc: MegaPortraitError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_FOR_ERROR:
            return STATUS_FOR_ERROR[cls]
    return grpc.StatusCode.INTERNAL


def _refuse(context: grpc.ServicerContext, exc: MegaPortraitError) -> None:
    """Abort the RPC with the error's code and reason (context.abort raises)."""
    code = status_for(exc)
    log.info("refused: %s %s", code.name, exc.reason)
    context.set_trailing_metadata(((REASON_METADATA_KEY, exc.reason),))
    context.abort(code, f"{exc.reason}: {exc}")


def _peer(context: grpc.ServicerContext) -> str:
    names = context.auth_context().get("x509_common_name") or []
    if not names:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "no_client_certificate: a CA-signed client certificate is required")
    return names[0].decode()


def _params(text: str) -> dict:
    if not text:
        return {}
    try:
        params = json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"params_json is not valid JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise InvalidRequest(f"params_json must encode a JSON object, got {type(params).__name__}")
    return params


def job_status(row: JobRow, existing: bool = False) -> pb.JobStatus:
    return pb.JobStatus(
        job_id=row.job_id, state=_STATE[row.state], stage=row.stage, fraction=row.fraction, backend=row.backend,
        error_reason=row.error_reason, error_message=row.error_message, existing=existing,
        created_at=row.created_at, updated_at=row.updated_at,
    )


def _confirmation(c: DeletionConfirmation) -> pb.DeletionConfirmation:
    return pb.DeletionConfirmation(statement=c.statement, signature=c.signature, signer_fingerprint=c.signer_fingerprint, job_ids=list(c.job_ids))


def _checkpoint_message(cp: Checkpoint) -> pb.AuditCheckpoint:
    return pb.AuditCheckpoint(size=cp.size, head=cp.head, ts=cp.ts, key_id=cp.key_id, sig=cp.sig)


class RenderService(pb_grpc.RenderNodeServicer):
    """gRPC methods; each one converts, calls the node, and maps refusals.

    Every job status, result and deletion confirmation carries the node's latest audit checkpoint (witnessed by the site).
    """

    def __init__(self, node: RenderNode) -> None:
        self.node = node

    def _witnessed(self, reply):  # type: ignore[no-untyped-def]
        cp = self.node.audit_checkpoint()
        if cp is not None:
            reply.audit_checkpoint.CopyFrom(_checkpoint_message(cp))
        return reply

    def GetNodeInfo(self, request, context):
        pub = self.node.identity.public()
        return pb.NodeInfo(
            api_version=API_VERSION, node_id=pub.node_id, hpke_suite=HPKE_SUITE_NAME, hpke_public_key=pub.hpke.to_bytes(),
            hpke_fingerprint=pub.hpke.fingerprint(), signing_public_key=pub.signing.public_bytes_raw(),
            signing_fingerprint=ed25519_fingerprint(pub.signing), backends=list(self.node.registry.names()),
            default_backend=self.node.default_backend,
        )

    def SubmitJob(self, request, context):
        owner = _peer(context)
        stages = (
            StageSwitches(identity=request.stages.identity, shading=request.stages.shading, harmonize=request.stages.harmonize)
            if request.HasField("stages") else StageSwitches()
        )
        try:
            req = SubmitRequest(
                job_id=request.job_id, sealed_payload=request.sealed_payload, consent_ref=request.consent_ref,
                template_image=request.template_image, backend=request.backend, stages=stages, seed=request.seed,
                params=_params(request.params_json),
            )
            row, existing = self.node.submit(req, owner)
        except MegaPortraitError as exc:
            _refuse(context, exc)
        return self._witnessed(job_status(row, existing))

    def GetJob(self, request, context):
        try:
            return self._witnessed(job_status(self.node.get(request.job_id, _peer(context))))
        except MegaPortraitError as exc:
            _refuse(context, exc)

    def StreamProgress(self, request, context):
        owner = _peer(context)
        last = None
        version = self.node.version
        while context.is_active() and not self.node.stopping:
            try:
                row = self.node.get(request.job_id, owner)
            except MegaPortraitError as exc:
                _refuse(context, exc)
            current = (row.state, row.stage, round(row.fraction, 4))
            if current != last:
                last = current
                yield pb.ProgressUpdate(job_id=row.job_id, state=_STATE[row.state], stage=row.stage, fraction=row.fraction, error_reason=row.error_reason)
            if row.terminal:
                return
            version = self.node.wait_for_change(version, timeout=0.5)

    def FetchResult(self, request, context):
        try:
            png, metadata = self.node.result(request.job_id, _peer(context))
        except MegaPortraitError as exc:
            _refuse(context, exc)
        return self._witnessed(pb.RenderResult(job_id=request.job_id, png=png, metadata_json=json.dumps(metadata, sort_keys=True, default=str),
                                               png_sha256=sha256_hex(png)))  # fmt: skip

    def CancelJob(self, request, context):
        try:
            row = self.node.cancel(request.job_id, _peer(context))
        except MegaPortraitError as exc:
            _refuse(context, exc)
        if row.state in (SUCCEEDED, FAILED):
            _refuse(context, JobNotReady(f"job {row.job_id!r} already {row.state}; delete it instead", reason=f"job_{row.state}"))
        return self._witnessed(job_status(row))

    def DeleteJobs(self, request, context):
        try:
            return self._witnessed(_confirmation(self.node.delete_jobs(list(request.job_ids), _peer(context))))
        except MegaPortraitError as exc:
            _refuse(context, exc)

    def DeletePerson(self, request, context):
        try:
            return self._witnessed(_confirmation(self.node.delete_person(request.person_ref, _peer(context))))
        except MegaPortraitError as exc:
            _refuse(context, exc)


# --------------------------------------------------------------------------------------------- transport


class _DecodeGuard(grpc.ServerInterceptor):
    """Answer a request that is not a valid protobuf message with INVALID_ARGUMENT (gRPC's own answer is INTERNAL),
    and log it: method, size and decoder error, never the bytes."""

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        decode, method = handler.request_deserializer, handler_call_details.method

        def parse(raw: bytes, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
            try:
                return decode(raw)
            except DecodeError as exc:
                log.warning("refused: INVALID_ARGUMENT request_undecodable on %s (%d bytes): %s", method, len(raw), exc)
                context.set_trailing_metadata(((REASON_METADATA_KEY, "request_undecodable"),))
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request_undecodable: the request is not a valid {method} message")

        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            def unary(raw, context):  # type: ignore[no-untyped-def]
                return behavior(parse(raw, context), context)

            return grpc.unary_unary_rpc_method_handler(unary, response_serializer=handler.response_serializer)
        behavior = handler.unary_stream

        def stream(raw, context):  # type: ignore[no-untyped-def]
            request = parse(raw, context)
            yield from behavior(request, context)

        return grpc.unary_stream_rpc_method_handler(stream, response_serializer=handler.response_serializer)



@dataclass(frozen=True, repr=False)
class TLSFiles:
    """PEM bytes for one end of a mutual-TLS connection: the CA that signs the peer, our certificate and key."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def from_dir(cls, directory: str | Path, name: str) -> "TLSFiles":
        """`directory/ca.pem`, `directory/<name>.pem`, `directory/<name>.key` (as written by `shared.pki.init_pki`)."""
        d = Path(directory)
        try:
            return cls((d / "ca.pem").read_bytes(), (d / f"{name}.pem").read_bytes(), (d / f"{name}.key").read_bytes())
        except OSError as exc:
            raise KeyFileError(f"{d}: missing TLS file ({exc.strerror or exc}: {exc.filename}); run `megaportrait pki init`") from exc


def start_server(node: RenderNode, listen: str, tls: TLSFiles, *, threads: int = 8) -> tuple[grpc.Server, int]:
    """Serve `node` on `listen` ("host:port"; port 0 picks a free one) requiring CA-signed client certificates.

    Returns (server, bound port). Stop with `server.stop(grace)` and then `node.stop()`.
    """
    server = grpc.server(
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
        interceptors=[_DecodeGuard()],
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    pb_grpc.add_RenderNodeServicer_to_server(RenderService(node), server)
    creds = grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)], root_certificates=tls.ca_pem, require_client_auth=True)
    port = server.add_secure_port(listen, creds)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    server.start()
    log.info("render node %s listening on port %d (mutual TLS)", node.identity.node_id, port)
    return server, port


def start_health(node: RenderNode, listen: str):
    """Serve `/healthz` (the node's `health_checks`) and `/metrics` (its registry) on `listen` ("host:port").

    Give the node a registry from `shared.service_health.new_registry("render-node")` so `/metrics` also carries the
    build info and process metrics. Returns the `service_health.HealthServer` (stop it before `node.stop()`).
    """
    from megaportrait.shared import service_health

    return service_health.start(listen, node.metrics.registry, service="render-node", checks=node.health_checks())


def client_channel(target: str, tls: TLSFiles | None = None, *, ca_pem: bytes | None = None) -> grpc.Channel:
    """A channel to a render node: with `tls` it presents a client certificate; with only `ca_pem` it presents
    none (and the node refuses it)."""
    if tls is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=tls.ca_pem, private_key=tls.key_pem, certificate_chain=tls.cert_pem)
    elif ca_pem is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    else:
        raise ValueError("a render node channel needs TLS: pass tls (mutual) or at least ca_pem")
    return grpc.secure_channel(
        target, creds,
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )


def stub(channel: grpc.Channel) -> pb_grpc.RenderNodeStub:
    return pb_grpc.RenderNodeStub(channel)
