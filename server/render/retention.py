"""The render node's side of policies/retention.yaml: what its retention sweeper may delete, and how.

Two rules apply to a job (see `RenderJobRetention`):

- `render_payloads` (keep e.g. 1d, counted from submission): the sealed payload and the template. A finished job's
  inputs are crypto-shredded (`JobStore.shred_inputs`: the result is re-keyed and the old data key destroyed); a job
  still queued or running that old is deleted whole (a running one is cancelled).
- `outputs` (keep e.g. 7d, counted from when the job finished): everything left of a finished job, deleted whole
  with its data key (crypto-shredding), leaving a tombstone.

The sweeper (`shared.retention.RetentionSweeper`) reads each deletion back and audits it in the node's log.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from megaportrait.shared.policy import Policies, load_policies
from megaportrait.shared.retention import RetainedItem

from .jobs import TERMINAL, JobNotFound, JobStore

SHIPPED_POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
"""The policies in this checkout (policies/consent.yaml, policies/retention.yaml): a node built without explicit
policies loads these; `render-node serve` loads the files its settings name (`policy.consent_file`, `.retention_file`)."""

NODE_KINDS = ("render_payloads", "outputs")


def load_node_policies(consent_file: str | Path | None = None, retention_file: str | Path | None = None) -> Policies:
    """Both policies, validated (PolicyError names the file and line at fault); defaults: `SHIPPED_POLICY_DIR`."""
    return load_policies(consent_file or SHIPPED_POLICY_DIR / "consent.yaml", retention_file or SHIPPED_POLICY_DIR / "retention.yaml")


def _time(text: str) -> datetime:
    t = datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


class RenderJobRetention:
    """The job store as the sweeper sees it, for the kinds `render_payloads` and `outputs` (see the module docstring).

    `delete_jobs(job_ids, reason)` destroys whole jobs; the node passes its own (it also cancels running renders);
    default: `store.delete`.
    """

    def __init__(self, store: JobStore, *, delete_jobs: Callable[[list[str], str], object] | None = None) -> None:
        self.store = store
        self._delete_jobs = delete_jobs or store.delete

    def list(self, kind: str) -> list[RetainedItem]:
        if kind == "render_payloads":
            return [RetainedItem(kind, r.job_id, _time(r.created_at), r.payload_sha256, r.person_ref) for r in self.store.jobs_holding_inputs()]
        if kind == "outputs":
            rows = [self.store.find(j) for j in self.store.ids_in_state(*TERMINAL)]
            return [RetainedItem(kind, r.job_id, _time(r.updated_at), r.result_sha256 or r.payload_sha256, r.person_ref) for r in rows if r]
        return []

    def delete(self, item: RetainedItem) -> None:
        row = self.store.find(item.item_id)
        if row is None:
            return  # already deleted whole (e.g. by an earlier item of this sweep, or by the site)
        if item.kind == "render_payloads" and row.terminal:
            self.store.shred_inputs(item.item_id)
        else:
            self._delete_jobs([item.item_id], "retention")

    def is_gone(self, item: RetainedItem) -> bool:
        """True when the item's data cannot be read back from the store."""
        if item.kind == "render_payloads":
            try:
                self.store.load_inputs(item.item_id)
            except JobNotFound:
                return True
            return False
        return self.store.find(item.item_id) is None and not self.store.holds_data(item.item_id)
