"""The render node as a real gRPC server on loopback (mutual TLS), and the sites' portrait jobs against it.

The node is the project's `RenderNode` behind `server.render.service.start_server`, with its own keys, job store and
trusted-site keys; each site talks to it over its own client certificate from a demo CA, learns the node's HPKE key
from `GetNodeInfo`, checks consent, seals the payload (face crops for the classic backend, the personal adapter for
the diffusion backend), submits, follows progress, fetches the portrait and scores it at the site.

Identity score: SFace cosine of the portrait's face to the mean embedding of the person's *other* photos (the
payload carries only the first usable photo, so the rest are held out); None for a person with one photo.
"""
from __future__ import annotations

import inspect
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .roster import TemplateInfo
from .settings import DemoSettings
from .sites import ACTOR, PersonState, Site

log = logging.getLogger("megaportrait.demo")

NODE_ID = "render-node-demo"
TIMEOUT_S = 600
VARIANTS = {
    "identity": ("identity only (naive paste)", (True, False, False)),
    "identity+shading": ("identity + shading", (True, True, False)),
    "full": ("full (identity + shading + harmonize)", (True, True, True)),
}
TINY_DIFFUSION_PARAMS = {"resolution": 64, "scheduler": "ddim"}


@dataclass
class RunningNode:
    """A started render node and its gRPC server; `client(site)` opens a channel with that site's certificate."""

    node: object  # RenderNode
    server: object  # grpc.Server
    port: int
    tls: dict
    state_dir: Path
    audit: object | None
    audit_public_key_file: Path | None = None
    hpke_public: object = None
    signing_public: object = None
    node_info: dict = field(default_factory=dict)
    channels: list = field(default_factory=list)
    stopped: bool = False

    def client(self, site_id: str):
        from megaportrait.server.render.service import client_channel, stub

        channel = client_channel(f"localhost:{self.port}", self.tls[site_id])
        self.channels.append(channel)
        return stub(channel)

    def stop(self) -> None:
        if self.stopped:
            return
        for ch in self.channels:
            ch.close()
        self.server.stop(None)
        self.node.stop()
        if self.audit is not None:
            self.audit.close()
        self.stopped = True


def start_render_node(sites: list[Site], work: Path, notes: list[str]) -> RunningNode:
    """Issue the demo PKI, create the node's keys, trust each site's key, and serve on 127.0.0.1 (a free port)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from megaportrait.protos import render_pb2 as pb
    from megaportrait.server.render.backends import default_registry
    from megaportrait.server.render.node import NodeIdentity, RenderNode
    from megaportrait.server.render.payloads import TrustedSites
    from megaportrait.server.render.service import TLSFiles, start_server
    from megaportrait.shared import pki
    from megaportrait.shared.audit import AuditLog, generate_signing_key
    from megaportrait.shared.config import RenderSettings
    from megaportrait.shared.crypto import HpkePublicKey

    pki_dir = work / "pki"
    ca = pki.create_ca("MegaPortrait demo CA")
    ca.save(pki_dir, "ca")
    server_cred = pki.issue_certificate(ca, "render-node", role="server", dns_names=("localhost",),
                                        ip_addresses=("127.0.0.1",))
    server_cred.save(pki_dir, "render-node")
    tls = {"server": TLSFiles(ca.cert_pem, server_cred.cert_pem, server_cred.key_pem)}
    for site in sites:
        cred = pki.issue_certificate(ca, site.site_id, role="client")
        cred.save(pki_dir, site.site_id)
        tls[site.site_id] = TLSFiles(ca.cert_pem, cred.cert_pem, cred.key_pem)

    state = work / "render-node"
    NodeIdentity.generate(NODE_ID).save(state)
    trusted = TrustedSites()
    for site in sites:
        trusted.add(site.site_id, site.key.public_key(), state / "trusted_sites")
    kwargs = {"registry": default_registry(RenderSettings(state_dir=state)), "default_backend": "classic", "workers": 1}
    audit, audit_pub = None, None
    if "audit" in inspect.signature(RenderNode.__init__).parameters:
        audit = AuditLog(state / "audit.jsonl", generate_signing_key(state / "keys" / "audit.key"),
                         component=f"render-node:{NODE_ID}", checkpoint_every=100)
        audit_pub = state / "keys" / "audit.key.pub"
        kwargs["audit"] = audit
    else:
        notes.append("this version of the render node keeps no audit log of its own (RenderNode takes no audit "
                     "log); its deletions are proven by its signed deletion statements instead")
    node = RenderNode.from_state_dir(state, **kwargs)
    node.start()
    server, port = start_server(node, "127.0.0.1:0", tls["server"])
    running = RunningNode(node=node, server=server, port=port, tls=tls, state_dir=state, audit=audit,
                          audit_public_key_file=audit_pub)
    info = running.client(sites[0].site_id).GetNodeInfo(pb.NodeInfoRequest(), timeout=TIMEOUT_S)
    running.hpke_public = HpkePublicKey.from_bytes(info.hpke_public_key)
    if running.hpke_public.fingerprint() != info.hpke_fingerprint:
        raise RuntimeError("render node's HPKE key does not match its fingerprint")
    running.signing_public = Ed25519PublicKey.from_public_bytes(info.signing_public_key)
    running.node_info = {"node_id": info.node_id, "api_version": info.api_version, "backends": list(info.backends),
                         "port": port, "hpke_suite": info.hpke_suite, "hpke_fingerprint": info.hpke_fingerprint}
    return running


# --- jobs ----------------------------------------------------------------------------------------------------


@dataclass
class RenderRecord:
    """One render job and what the site measured on its result (pixels dropped if the person is revoked)."""

    site: str
    person: str
    ref: str
    template: str
    variant: str
    backend: str
    job_id: str
    state: str = ""
    error: str = ""
    seconds: float | None = None  # rendering on the node (its backend's own stage timings)
    turnaround_s: float = 0.0  # submit to portrait fetched, queueing behind the other jobs included
    identity: float | None = None
    identity_payload: float | None = None
    face_found: bool = False
    ita_person: float | None = None
    ita_template: float | None = None
    ita_output: float | None = None
    tone_kept: bool | None = None
    fallbacks: list[str] = field(default_factory=list)
    png_sha256: str = ""
    pixels: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("pixels", "metadata")}


@dataclass
class Refusal:
    """A render the site refused before sealing anything (consent), with the error's reason and message."""

    site: str
    person: str
    ref: str
    purpose: str
    reason: str
    message: str


def job_id_for(*parts: str) -> str:
    """A job id from its parts, in the node's id alphabet ([A-Za-z0-9._:-], at most 128 chars)."""
    text = "-".join(parts)
    return re.sub(r"[^A-Za-z0-9._:-]", "_", text)[:128]


def _classic_payload(person: PersonState):
    from megaportrait.shared.face_analysis import mean_embedding
    from megaportrait.shared.records import FaceCropSet

    first = person.accepted[0]
    return FaceCropSet(person_ref=person.ref, crops=(first.crop,),
                       mean_embedding=mean_embedding([first.face.embedding]),
                       embedder=first.face.embedder)


def _consent_ref(sealed: bytes) -> str:
    """The consent receipt id the sealing function bound into the payload's signed header."""
    from megaportrait.shared.payload_format import Envelope

    return Envelope.parse(sealed).header.consent_ref


def _submit(client, job_id: str, sealed: bytes, consent_ref: str, template: TemplateInfo, backend: str,
            switches: tuple[bool, bool, bool], seed: int, params: dict):
    from megaportrait.protos import render_pb2 as pb

    return client.SubmitJob(pb.SubmitJobRequest(
        job_id=job_id, backend=backend, sealed_payload=sealed, consent_ref=consent_ref,
        template_image=template.path.read_bytes(), seed=seed, params_json=json.dumps(params),
        stages=pb.StageSwitches(identity=switches[0], shading=switches[1], harmonize=switches[2])), timeout=TIMEOUT_S)


def witness(site: Site):
    """Where the site keeps the render node's audit checkpoints that come with its replies (`shared.audit.WitnessStore`)."""
    from megaportrait.shared.audit import WitnessStore

    return WitnessStore(site.root / "witness")


def _collect(client, site: Site, person: PersonState, rec: RenderRecord, analyzer, started: float) -> None:
    """Follow the job to its end, fetch the portrait, store it at the site and score it."""
    from megaportrait.protos import render_pb2 as pb
    from megaportrait.shared.face_analysis import cosine, mean_embedding
    from megaportrait.shared.imaging import decode_png
    from megaportrait.shared.portrait_metrics import output_face, tone_kept
    from megaportrait.shared.records import sha256_hex

    last = None
    for update in client.StreamProgress(pb.JobRef(job_id=rec.job_id), timeout=TIMEOUT_S):
        last = update
    rec.state = pb.JobState.Name(last.state).removeprefix("JOB_STATE_").lower() if last else "unknown"
    if last is None or last.state != pb.JOB_STATE_SUCCEEDED:
        status = client.GetJob(pb.JobRef(job_id=rec.job_id), timeout=TIMEOUT_S)
        witness(site).keep_reply(status)
        rec.error = f"{status.error_reason}: {status.error_message}"
        site.audit.append("render.result", actor=ACTOR, outcome="failed", person=person.ref,
                          detail={"job": rec.job_id, "reason": status.error_reason})
        return
    result = client.FetchResult(pb.JobRef(job_id=rec.job_id), timeout=TIMEOUT_S)
    witness(site).keep_reply(result)
    rec.turnaround_s = time.perf_counter() - started
    if sha256_hex(result.png) != result.png_sha256:
        raise RuntimeError(f"job {rec.job_id}: portrait bytes do not match their hash")
    rec.png_sha256 = result.png_sha256
    rec.metadata = json.loads(result.metadata_json)
    stage_seconds = rec.metadata.get("seconds")
    if isinstance(stage_seconds, dict):
        rec.seconds = float(sum(v for v in stage_seconds.values() if isinstance(v, (int, float))))
    rec.pixels = decode_png(result.png)
    item = site.outputs.put(person.ref, f"{rec.job_id[-100:]}.png", result.png)
    ita = rec.metadata.get("ita") or {}
    rec.ita_person, rec.ita_template, rec.ita_output = ita.get("person"), ita.get("template"), ita.get("output")
    rec.identity_payload = rec.metadata.get("identity_score")
    rec.fallbacks = list(rec.metadata.get("fallbacks", []))
    face = output_face(analyzer, rec.pixels)
    rec.face_found = face is not None and face.embedding is not None
    held_out = [a.face.embedding for a in person.accepted[1:]]
    if rec.face_found and held_out:
        rec.identity = cosine(face.embedding, mean_embedding(held_out))
    if rec.ita_person is not None and rec.ita_template is not None:
        rec.tone_kept = tone_kept(rec.ita_output, rec.ita_person, rec.ita_template)
    site.audit.append("render.result", actor=ACTOR, person=person.ref, data=[item.digest],
                      detail={"job": rec.job_id, "backend": rec.backend, "variant": rec.variant})


def render_portraits(sites: list[Site], node: RunningNode, templates: list[TemplateInfo], settings: DemoSettings,
                     analyzer, *, advance: Callable[[], None] | None = None
                     ) -> tuple[list[RenderRecord], list[Refusal]]:
    """Classic renders of every consenting person with a usable photo onto every template (ablations too when
    `settings.ablations`). Sites submit everything first, then collect in order while the node works."""
    from megaportrait.client.payload import seal_face_crops
    from megaportrait.shared.consent import ConsentError
    from megaportrait.shared.payload_format import CLASSIC_CROP_PURPOSE

    variants = list(VARIANTS) if settings.ablations else ["full"]
    queued: list[tuple[object, Site, PersonState, RenderRecord, float]] = []
    refusals: list[Refusal] = []
    for site in sites:
        client = node.client(site.site_id)
        for person in site.people:
            if not person.accepted:
                continue
            payload = _classic_payload(person)
            try:
                for template in templates:
                    for variant in variants:
                        rec = RenderRecord(site=site.site_id, person=person.name, ref=person.ref,
                                           template=template.name, variant=variant, backend="classic",
                                           job_id=job_id_for(site.site_id, person.ref, template.name, variant))
                        # Checks the person's consent in the site's ledger (audited) and binds the receipt.
                        sealed = seal_face_crops(payload, ledger=site.ledger, job_id=rec.job_id,
                                                 recipient=node.hpke_public, site_id=site.site_id, site_key=site.key,
                                                 actor=ACTOR)
                        consent_ref = _consent_ref(sealed)
                        site.audit.append("payload.seal", actor=ACTOR, person=person.ref,
                                          data=[payload.crops[0].source_sha256],
                                          detail={"job": rec.job_id, "kind": "face_crops", "consent": consent_ref})
                        started = time.perf_counter()
                        witness(site).keep_reply(_submit(client, rec.job_id, sealed, consent_ref, template, "classic",
                                                         VARIANTS[variant][1], settings.seed, {}))
                        queued.append((client, site, person, rec, started))
            except ConsentError as exc:
                refusals.append(Refusal(site.site_id, person.name, person.ref, CLASSIC_CROP_PURPOSE, exc.reason,
                                        str(exc)))
    records = []
    for client, site, person, rec, started in queued:
        _collect(client, site, person, rec, analyzer, started)
        records.append(rec)
        if advance:
            advance()
    return records, refusals


def render_diffusion(site: Site, person: PersonState, adapter, node: RunningNode, template: TemplateInfo,
                     settings: DemoSettings, analyzer) -> RenderRecord:
    """One diffusion-backend render with the person's sealed adapter, on the tiny in-code model (random weights:
    it shows the adapter payload path, not a portrait)."""
    from megaportrait.client.payload import seal_adapter

    client = node.client(site.site_id)
    rec = RenderRecord(site=site.site_id, person=person.name, ref=person.ref, template=template.name, variant="full",
                       backend="diffusion", job_id=job_id_for(site.site_id, person.ref, template.name, "diffusion"))
    sealed = seal_adapter(adapter, ledger=site.ledger, job_id=rec.job_id, recipient=node.hpke_public,
                          site_id=site.site_id, site_key=site.key, actor=ACTOR)
    consent_ref = _consent_ref(sealed)
    site.audit.append("payload.seal", actor=ACTOR, person=person.ref, data=list(adapter.photo_sha256),
                      detail={"job": rec.job_id, "kind": "lora_adapter", "consent": consent_ref})
    steps = settings.diffusion_steps
    short = {} if steps >= 6 else {"strength": 0.67}  # so img2img stages still run a step or two
    params = {**TINY_DIFFUSION_PARAMS, "identity": {"steps": steps}, "shading": {"steps": steps, **short},
              "harmonize": {"steps": steps, **short}}
    started = time.perf_counter()
    witness(site).keep_reply(_submit(client, rec.job_id, sealed, consent_ref, template, "diffusion", (True, True, True),
                                     settings.seed, params))
    _collect(client, site, person, rec, analyzer, started)
    return rec
