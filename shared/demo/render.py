"""The render node as a real gRPC server on loopback (mutual TLS), and the sites' portrait jobs against it.

The node is the project's `RenderNode` behind `server.render.service.start_server`, with its own keys, job store and
trusted-site keys; each site talks to it over its own client certificate from a demo CA through the site's own
render requests (`client.render_requests`): node keys checked against node_public.json, consent checked, payload
sealed (face crops for the classic backend, the personal adapter for the diffusion backend) and staged, submitted,
followed, the portrait fetched, checked, saved and scored at the site.

Identity score: SFace cosine of the portrait's face to the mean embedding of the person's *other* photos (the
payload carries only the first usable photo, so the rest are held out); None for a person with one photo.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from megaportrait.client.render_payloads import classic_payload
from megaportrait.client.render_requests import submit_render, wait_for_portrait

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
    connections: dict = field(default_factory=dict)
    stopped: bool = False

    def connection(self, site_id: str):
        """The site's `client.render_requests.NodeConnection` (its own client certificate), opened once; the node's
        keys are checked against its node_public.json as a site would."""
        from megaportrait.client.render_requests import open_connection
        from megaportrait.shared.crypto import NodePublicKeys

        if site_id not in self.connections:
            self.connections[site_id] = open_connection(
                f"localhost:{self.port}", self.tls[site_id], NodePublicKeys.load(self.state_dir / "node_public.json"),
                timeout_s=TIMEOUT_S)
        return self.connections[site_id]

    def client(self, site_id: str):
        """The site's gRPC stub (for the demo's outside checks)."""
        return self.connection(site_id).stub

    def stop(self) -> None:
        if self.stopped:
            return
        for conn in self.connections.values():
            conn.close()
        self.server.stop(None)
        self.node.stop()
        if self.audit is not None:
            self.audit.close()
        self.stopped = True


def start_render_node(sites: list[Site], work: Path, notes: list[str]) -> RunningNode:
    """Issue the demo PKI, create the node's keys, trust each site's key, and serve on 127.0.0.1 (a free port)."""
    from megaportrait.protos import render_pb2 as pb
    from megaportrait.server.render.backends import default_registry
    from megaportrait.server.render.node import NodeIdentity, RenderNode
    from megaportrait.server.render.payloads import TrustedSites
    from megaportrait.server.render.service import TLSFiles, start_server
    from megaportrait.shared import pki
    from megaportrait.shared.audit import AuditLog, generate_signing_key
    from megaportrait.shared.config import RenderSettings

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
    running.hpke_public = running.connection(sites[0].site_id).hpke_public
    running.signing_public = running.connection(sites[0].site_id).signing_public
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


def _request(person: PersonState, template: TemplateInfo, backend: str, switches: tuple[bool, bool, bool],
             seed: int, params: dict):
    from megaportrait.client.render_requests import RenderRequest
    from megaportrait.shared.records import StageSwitches

    return RenderRequest(person_ref=person.ref, template_name=template.name, template=template.path.read_bytes(),
                         backend=backend, stages=StageSwitches(*switches), seed=seed, params=params)


def _collect(site: Site, node: RunningNode, person: PersonState, rec: RenderRecord, analyzer, started: float) -> None:
    """Follow the job to its end, fetch and check the portrait and save it at the site
    (`client.render_requests.wait_for_portrait`), then copy the site's figures into the record."""
    from megaportrait.shared.imaging import decode_png

    held_out = [a.face.embedding for a in person.accepted[1:]]
    job, portrait = wait_for_portrait(site.site, node.connection(site.site_id), rec.job_id, analyzer=analyzer,
                                      held_out=held_out, actor=ACTOR)
    rec.state = "succeeded" if job.state == "collected" else job.state
    rec.error = job.error
    if portrait is None:
        return
    rec.turnaround_s = time.perf_counter() - started
    rec.png_sha256 = hashlib.sha256(portrait.png).hexdigest()
    rec.metadata = portrait.metadata
    stage_seconds = rec.metadata.get("seconds")
    if isinstance(stage_seconds, dict):
        rec.seconds = float(sum(v for v in stage_seconds.values() if isinstance(v, (int, float))))
    rec.pixels = decode_png(portrait.png)
    f = portrait.figures
    rec.ita_person, rec.ita_template, rec.ita_output = f["ita_person"], f["ita_template"], f["ita_output"]
    rec.identity_payload, rec.identity, rec.face_found = f["identity_payload"], f["identity"], bool(f["face_found"])
    rec.tone_kept, rec.fallbacks = f["tone_kept"], f["fallbacks"]


def render_portraits(sites: list[Site], node: RunningNode, templates: list[TemplateInfo], settings: DemoSettings,
                     analyzer, *, advance: Callable[[], None] | None = None
                     ) -> tuple[list[RenderRecord], list[Refusal]]:
    """Classic renders of every consenting person with a usable photo onto every template (ablations too when
    `settings.ablations`), through the site's own render requests (`client.render_requests`: consent checked,
    sealed, staged, submitted). Sites submit everything first, then collect in order while the node works."""
    from megaportrait.shared.consent import ConsentError
    from megaportrait.shared.payload_format import CLASSIC_CROP_PURPOSE

    variants = list(VARIANTS) if settings.ablations else ["full"]
    queued: list[tuple[Site, PersonState, RenderRecord, float]] = []
    refusals: list[Refusal] = []
    for site in sites:
        conn = node.connection(site.site_id)
        for person in site.people:
            if not person.accepted:
                continue
            payload = classic_payload(person.ref, person.accepted)
            try:
                for template in templates:
                    for variant in variants:
                        rec = RenderRecord(site=site.site_id, person=person.name, ref=person.ref,
                                           template=template.name, variant=variant, backend="classic",
                                           job_id=job_id_for(site.site_id, person.ref, template.name, variant))
                        started = time.perf_counter()
                        submit_render(site.site, conn, _request(person, template, "classic", VARIANTS[variant][1],
                                                                settings.seed, {}),
                                      payload, job_id=rec.job_id, actor=ACTOR)
                        queued.append((site, person, rec, started))
            except ConsentError as exc:
                refusals.append(Refusal(site.site_id, person.name, person.ref, CLASSIC_CROP_PURPOSE, exc.reason,
                                        str(exc)))
    records = []
    for site, person, rec, started in queued:
        _collect(site, node, person, rec, analyzer, started)
        records.append(rec)
        if advance:
            advance()
    return records, refusals


def render_diffusion(site: Site, person: PersonState, adapter, node: RunningNode, template: TemplateInfo,
                     settings: DemoSettings, analyzer) -> RenderRecord:
    """One diffusion-backend render with the person's sealed adapter, on the tiny in-code model (random weights:
    it shows the adapter payload path, not a portrait)."""
    rec = RenderRecord(site=site.site_id, person=person.name, ref=person.ref, template=template.name, variant="full",
                       backend="diffusion", job_id=job_id_for(site.site_id, person.ref, template.name, "diffusion"))
    steps = settings.diffusion_steps
    short = {} if steps >= 6 else {"strength": 0.67}  # so img2img stages still run a step or two
    params = {**TINY_DIFFUSION_PARAMS, "identity": {"steps": steps}, "shading": {"steps": steps, **short},
              "harmonize": {"steps": steps, **short}}
    started = time.perf_counter()
    submit_render(site.site, node.connection(site.site_id),
                  _request(person, template, "diffusion", (True, True, True), settings.seed, params), adapter,
                  job_id=rec.job_id, actor=ACTOR)
    _collect(site, node, person, rec, analyzer, started)
    return rec
