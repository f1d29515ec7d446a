"""Revoking one person's consent end to end, and verifying every component's audit log.

Revocation is the site's own (`client.revocation.revoke`): receipts revoked, the person's data deleted from every
site store (and checked unreadable), the render node asked over gRPC to delete their jobs (it destroys the per-job
keys) and its signed statement verified with the node's key. The demo then checks the consequences from the outside: the stores
hold nothing of the person, the node answers NOT_FOUND for their old jobs while another person's job is still
there, and the site refuses the person's next render.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from megaportrait.client.revocation import Revocation

from .render import RenderRecord, RunningNode
from .sites import ACTOR, Site

log = logging.getLogger("megaportrait.demo")


@dataclass(kw_only=True)
class RevocationOutcome(Revocation):
    """What the site's revocation did (`client.revocation.Revocation`) and what the demo's checks after it found
    (each check: (what, passed, detail))."""

    site: str
    person: str
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.complete and all(passed for _, passed, _ in self.checks)


def revoke_one(site: Site, person_name: str, node: RunningNode, records: list[RenderRecord]) -> RevocationOutcome:
    """Revoke `person_name` at `site` everywhere and check the result from the site's side."""
    import grpc
    from megaportrait.client.revocation import revoke
    from megaportrait.protos import render_pb2 as pb
    from megaportrait.shared.consent import ConsentRevoked
    from megaportrait.shared.payload_format import CLASSIC_CROP_PURPOSE

    person = site.person(person_name)
    client = node.client(site.site_id)
    done = revoke(site.site, person.ref, node.connection(site.site_id), by="subject")
    out = RevocationOutcome(**vars(done), site=site.site_id, person=person.name)
    conf = done
    out.checks.append(("nothing of the person is readable in any site store",
                       not any(out.still_readable.values()),
                       ", ".join(f"{k}: {v}" for k, v in out.still_readable.items())))
    mine = [r for r in records if r.ref == person.ref]
    out.checks.append(("the node's signed statement names every job of the person and destroyed their keys",
                       sorted(conf.node_jobs_deleted) == sorted(r.job_id for r in mine)
                       and conf.node_all_keys_destroyed and conf.node_statement_verified,
                       f"{len(out.node_jobs_deleted)} job(s) in the statement, {len(mine)} submitted"))
    if mine:
        try:
            client.FetchResult(pb.JobRef(job_id=mine[0].job_id), timeout=60)
            out.checks.append(("the node no longer serves the person's portraits", False, "FetchResult still answered"))
        except grpc.RpcError as err:
            out.checks.append(("the node no longer serves the person's portraits",
                               err.code() == grpc.StatusCode.NOT_FOUND, f"{err.code().name}: {err.details()}"))
    other = next((r for r in records if r.ref != person.ref and r.site == site.site_id and r.state == "succeeded"),
                 None)
    if other is not None:
        try:
            client.FetchResult(pb.JobRef(job_id=other.job_id), timeout=60)
            out.checks.append(("another person's portrait at the same site is untouched", True, other.person))
        except grpc.RpcError as err:
            out.checks.append(("another person's portrait at the same site is untouched", False,
                               f"{err.code().name}: {err.details()}"))
    try:
        site.ledger.require(person.ref, CLASSIC_CROP_PURPOSE, actor=ACTOR)
        out.checks.append(("the person's next render is refused by the site", False, "consent check passed"))
    except ConsentRevoked as exc:
        out.checks.append(("the person's next render is refused by the site", True, f"{exc.reason}: {exc}"))
    return out


@dataclass
class AuditOutcome:
    """One component's audit log after verification."""

    component: str
    path: Path
    public_key_file: Path
    entries: int
    checkpoints: int
    ok: bool
    problems: list[str]
    actions: dict[str, int]
    refused: int


def verify_logs(logs: list[tuple[str, object, Path]], witnesses: Sequence[Path] = ()) -> list[AuditOutcome]:
    """Close (checkpoint) and verify each (component, AuditLog, public key file): chain, signatures and checkpoints,
    with the public key file alone (as an auditor would), and against the checkpoints kept in `witnesses` (folders
    of `shared.audit.WitnessStore`, e.g. each site's copy of the render node's)."""
    from megaportrait.shared.audit import WitnessStore, load_public_key, read_entries, verify

    out = []
    for component, audit_log, public_key_file in logs:
        audit_log.close()
        key = load_public_key(Path(public_key_file))
        kept = [cp for folder in witnesses for cp in WitnessStore(folder).checkpoints(key)]
        report = verify(audit_log.path, key, trusted_checkpoints=kept)
        actions: dict[str, int] = {}
        refused = 0
        for entry in read_entries(audit_log.path):
            actions[entry.action] = actions.get(entry.action, 0) + 1
            refused += entry.outcome != "ok"
        out.append(AuditOutcome(component=component, path=audit_log.path, public_key_file=Path(public_key_file),
                                entries=report.entries,
                                checkpoints=report.checkpoints, ok=report.ok,
                                problems=[str(p) for p in report.problems], actions=actions, refused=refused))
    return out
