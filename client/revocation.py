"""Revoking a person's consent at the site, end to end, and saying what was deleted where.

`shared.consent.revoke_person` does the work: receipts revoked, the person's data deleted from every site store
(photos, intake crops, the federation's crop cache, personal adapters, collected portraits, staged payloads, the
job book), each read back and audited, and the render node asked to delete their jobs (it destroys the per-job
keys) with its signed statement verified against the node's key.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .site import Site

log = logging.getLogger("megaportrait.client.revocation")


@dataclass
class Revocation:
    """What revocation did: receipts, per-store items deleted and still readable, and the node's statement."""

    person_ref: str
    complete: bool
    pending: list[str]
    receipts_revoked: int
    site_deleted: dict[str, int]
    still_readable: dict[str, int]
    node: str = ""
    node_jobs_deleted: list[str] = field(default_factory=list)
    node_keys_destroyed: int = 0
    node_all_keys_destroyed: bool = False
    node_statement_verified: bool = False

    def lines(self) -> list[str]:
        """What was deleted where, for staff."""
        out = [f"consent: {self.receipts_revoked} receipt(s) revoked for {self.person_ref}"]
        for store, n in self.site_deleted.items():
            left = self.still_readable.get(store, 0)
            out.append(f"site  {store:<18} {n} deleted, {'nothing' if not left else left} readable after")
        if self.node:
            out.append(f"node  {self.node}: {len(self.node_jobs_deleted)} job(s) deleted, "
                       f"{self.node_keys_destroyed} key(s) destroyed; signed statement "
                       f"{'verified' if self.node_statement_verified else 'NOT verified'}")
        out.append("revocation complete" if self.complete else f"revocation INCOMPLETE: {', '.join(self.pending)}")
        return out


def revoke(site: Site, person_ref: str, conn: Any = None, *, by: str = "subject") -> Revocation:
    """Revoke `person_ref` everywhere: at the site, and at the render node when `conn` (a NodeConnection) is given.
    Returns the outcome; `complete` is False (and `pending` says what is owed) when a deletion could not be
    verified or the node did not confirm (`retry_pending_revocations` finishes the node's part later)."""
    from megaportrait.shared.consent import RevocationIncomplete, revoke_person

    from .render_requests import PersonDeleter

    stores = [*site.stores, site.jobs]
    node_key = conn.signing_public if conn is not None else None
    deleter = PersonDeleter(conn, site) if conn is not None else None
    try:
        result = revoke_person(person_ref, ledger=site.ledger, by=by, site_stores=stores, render_node=deleter,
                               render_node_key=node_key)
        pending: list[str] = []
    except RevocationIncomplete as exc:
        log.error("revocation of %s incomplete: %s", person_ref, ", ".join(exc.pending))
        result, pending = exc.result, list(exc.pending)
    if conn is None:
        pending.append("render node not contacted")
    conf = result.render_confirmation
    return Revocation(
        person_ref=person_ref, complete=result.complete and conn is not None, pending=pending,
        receipts_revoked=len(result.receipts_revoked),
        site_deleted={name: len(items) for name, items in result.site_deleted.items()},
        still_readable={s.name: len(s.find_person(person_ref)) for s in stores},
        node=conf.node if conf else "", node_jobs_deleted=list(conf.job_ids) if conf else [],
        node_keys_destroyed=conf.keys_destroyed if conf else 0, node_all_keys_destroyed=bool(conf) and conf.all_gone,
        node_statement_verified=conn is not None and site.ledger.render_confirmation(person_ref, node_key) is not None)
