"""Retention: delete each kind of data once it is older than policies/retention.yaml allows, and prove it is gone.

A `RetentionSweeper` walks stores that expose `list(kind)`, `delete(item)` and `is_gone(item)`; after deleting an
item it reads it back (`is_gone`) and audits the outcome. Every component builds one sweeper over its own stores
and runs it at start-up and every `sweep.interval` (`run_every`).

`FileStore` is the site's store for per-person files (source photos, crops, adapters): `<root>/<person_ref>/<name>`.
It serves both the sweeper and revocation (`delete_person` / `find_person`).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol, Sequence

from .audit import AuditLog
from .errors import MegaPortraitError
from .policy import DATA_KINDS, RetentionPolicy

log = logging.getLogger("megaportrait.retention")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RetentionViolation(MegaPortraitError):
    """An item the policy says must be gone could still be read back after deletion."""

    reason = "retention_violation"


@dataclass(frozen=True)
class RetainedItem:
    """One stored thing the sweeper may delete. `digest` names it in the audit log; `person_ref` may be ""."""

    kind: str
    item_id: str
    created_at: datetime
    digest: str
    person_ref: str = ""


class RetentionStore(Protocol):
    """A store the sweeper can clean: list items of a kind, delete one, and check it is really gone."""

    def list(self, kind: str) -> Iterable[RetainedItem]: ...

    def delete(self, item: RetainedItem) -> None: ...

    def is_gone(self, item: RetainedItem) -> bool: ...


@dataclass
class SweepReport:
    """What one sweep did: per kind, the digests deleted; and the items that failed (still readable or errored)."""

    at: datetime
    deleted: dict[str, list[str]] = field(default_factory=dict)
    failed: list[tuple[RetainedItem, str]] = field(default_factory=list)
    kept: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def deleted_count(self) -> int:
        return sum(len(v) for v in self.deleted.values())


class RetentionSweeper:
    """Deletes expired items from `stores` (data kind -> store) under `policy`, verifying and auditing each.

    `actor` names the sweeper in the audit log (e.g. "retention:site:alpha"). `clock` gives "now" when a sweep is
    not handed a time (default: the system clock, UTC); tests pass their own. `last_report` and `last_error` say how
    the latest sweep went (a health check reads them); `on_report` is called with each finished sweep's report.
    `extra_keep` (kind -> keep) adds kinds another policy rules, e.g. the site's consent receipts (consent.yaml's
    `site_retention_of_receipts`).
    """

    def __init__(
        self,
        policy: RetentionPolicy,
        stores: Mapping[str, RetentionStore],
        audit: AuditLog,
        *,
        actor: str = "retention-sweeper",
        clock: Callable[[], datetime] | None = None,
        on_report: Callable[[SweepReport], None] | None = None,
        extra_keep: Mapping[str, timedelta] | None = None,
    ) -> None:
        self.extra_keep = dict(extra_keep or {})
        clash = [k for k in self.extra_keep if k in DATA_KINDS]
        if clash:
            raise ValueError(f"extra_keep {clash}: these kinds are ruled by the retention policy")
        unknown = [k for k in stores if k not in DATA_KINDS and k not in self.extra_keep]
        if unknown:
            raise ValueError(f"no retention rule for data kind(s) {unknown}; known kinds: {', '.join(DATA_KINDS)}")
        self.policy, self.stores, self.audit, self.actor = policy, dict(stores), audit, actor
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.on_report = on_report
        self.last_report: SweepReport | None = None
        self.last_error: str = ""

    def _now(self, now: datetime | None) -> datetime:
        return _utc(now if now is not None else self.clock())

    def keep(self, kind: str) -> timedelta:
        """How long items of `kind` are kept (`extra_keep`, else the retention policy)."""
        return self.extra_keep[kind] if kind in self.extra_keep else self.policy.keep(kind)

    def expired(self, now: datetime | None = None) -> list[RetainedItem]:
        """Items older than their kind's `keep`, oldest first (nothing is deleted)."""
        now = self._now(now)
        out = []
        for kind, store in self.stores.items():
            keep = self.keep(kind)
            out.extend(i for i in store.list(kind) if now - _utc(i.created_at) >= keep)
        return sorted(out, key=lambda i: _utc(i.created_at))

    def sweep(self, now: datetime | None = None, *, progress: Callable[[int, int], None] | None = None) -> SweepReport:
        """Delete every expired item, read each back to check it is gone, audit each; one summary entry at the end.

        `progress(done, total)` is called after each item (the CLI shows a bar with it).
        """
        now = self._now(now)
        report = SweepReport(at=now)
        listed = {kind: list(store.list(kind)) for kind, store in self.stores.items()}
        items = sorted((i for kind, found in listed.items() for i in found if now - _utc(i.created_at) >= self.keep(kind)),
                       key=lambda i: _utc(i.created_at))  # fmt: skip
        report.kept = sum(len(found) for found in listed.values()) - len(items)
        policy = self.policy.version_hash
        for n, item in enumerate(items, start=1):
            store = self.stores[item.kind]
            try:
                store.delete(item)
                gone = store.is_gone(item)
                reason = "" if gone else "still readable after delete"
            except Exception as exc:  # noqa: BLE001 - one bad item must not stop the sweep; it is audited as failed
                gone, reason = False, f"{type(exc).__name__}: {exc}"[:200]
            detail = {"kind": item.kind, "age_s": int((now - _utc(item.created_at)).total_seconds()),
                      "keep_s": int(self.keep(item.kind).total_seconds())}  # fmt: skip
            if gone:
                report.deleted.setdefault(item.kind, []).append(item.digest)
                self.audit.append("retention.delete", actor=self.actor, person=item.person_ref, data=[item.digest], policy=policy, detail=detail)
            else:
                report.failed.append((item, reason))
                log.error("retention: %s %s not deleted: %s", item.kind, item.digest[:12], reason)
                self.audit.append("retention.delete", actor=self.actor, outcome="failed", person=item.person_ref,
                                  data=[item.digest], policy=policy, detail={**detail, "reason": reason})  # fmt: skip
            if progress:
                progress(n, len(items))
        self.audit.append("retention.sweep", actor=self.actor, outcome="ok" if report.ok else "failed", policy=policy,
                          detail={"deleted": report.deleted_count, "failed": len(report.failed), "kept": report.kept})  # fmt: skip
        self.last_report, self.last_error = report, ""
        if self.on_report:
            self.on_report(report)
        return report

    def sweep_logged(self, now: datetime | None = None) -> SweepReport | None:
        """`sweep`, for a background thread: an error that stops the whole sweep (a store cannot be listed, the
        audit log cannot be written) is logged, kept in `last_error` and audited where possible, never raised."""
        try:
            return self.sweep(now)
        except Exception as exc:  # noqa: BLE001 - the periodic sweeper must survive to try again next interval
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            log.exception("retention sweep by %s failed", self.actor)
            try:
                self.audit.append("retention.sweep", actor=self.actor, outcome="failed", policy=self.policy.version_hash,
                                  detail={"error": self.last_error})  # fmt: skip
            except Exception:  # noqa: BLE001 - the audit log itself may be what failed; already logged above
                log.exception("retention: cannot audit the failed sweep")
            return None

    def run_every(self, stop: threading.Event, *, on_startup: bool | None = None) -> threading.Thread:
        """Sweep now (if the policy says `on_startup`) and then every `sweep.interval` until `stop` is set.

        A sweep that fails as a whole is logged and audited (`sweep_logged`) and the next one runs on schedule.
        """
        rule = self.policy.rules.sweep
        first = rule.on_startup if on_startup is None else on_startup

        def loop() -> None:
            if first:
                self.sweep_logged()
            while not stop.wait(rule.interval.total_seconds()):
                self.sweep_logged()

        thread = threading.Thread(target=loop, name="retention-sweeper", daemon=True)
        thread.start()
        return thread


def _utc(t: datetime | None) -> datetime:
    if t is None:
        return datetime.now(timezone.utc)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


class FileStore:
    """Per-person files of one data kind under `root/<person_ref>/<name>`; creation time is the file's mtime.

    Serves the sweeper (`list`, `delete`, `is_gone`) and revocation (`delete_person`, `find_person`).
    """

    def __init__(self, root: str | Path, kind: str) -> None:
        if kind not in DATA_KINDS:
            raise ValueError(f"unknown data kind {kind!r}; known: {', '.join(DATA_KINDS)}")
        self.root, self.kind, self.name = Path(root), kind, kind
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, person_ref: str, name: str) -> Path:
        for part in (person_ref, name):
            if not _SAFE_NAME.match(part):
                raise ValueError(f"unsafe path part {part!r}: use letters, digits, '.', '_' and '-'")
        return self.root / person_ref / name

    def put(self, person_ref: str, name: str, data: bytes, *, created_at: datetime | None = None) -> RetainedItem:
        """Store bytes for a person; `created_at` (default now) becomes the file's mtime."""
        p = self._path(person_ref, name)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        t = _utc(created_at).timestamp()
        os.utime(p, (t, t))
        return self._item(p)

    def _item(self, p: Path) -> RetainedItem:
        created = datetime.fromtimestamp(p.stat().st_mtime, timezone.utc)
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        return RetainedItem(kind=self.kind, item_id=str(p.relative_to(self.root)), created_at=created, digest=digest, person_ref=p.parent.name)

    def read(self, item: RetainedItem) -> bytes:
        return (self.root / item.item_id).read_bytes()

    def list(self, kind: str) -> list[RetainedItem]:
        if kind != self.kind:
            return []
        return [self._item(p) for p in sorted(self.root.glob("*/*")) if p.is_file()]

    def delete(self, item: RetainedItem) -> None:
        p = self.root / item.item_id
        p.unlink(missing_ok=True)
        try:
            p.parent.rmdir()
        except OSError:
            pass  # other files of the person remain

    def is_gone(self, item: RetainedItem) -> bool:
        p = self.root / item.item_id
        try:
            p.read_bytes()
        except FileNotFoundError:
            return True
        return False

    def delete_person(self, person_ref: str) -> list[str]:
        self._path(person_ref, "x")  # refuses a person_ref that is not a plain name
        items = [i for i in self.list(self.kind) if i.person_ref == person_ref]
        for i in items:
            self.delete(i)
        return [i.digest for i in items]

    def find_person(self, person_ref: str) -> list[str]:
        d = self._path(person_ref, "x").parent
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*")) if p.is_file()] if d.is_dir() else []


def sweep_all(sweepers: Sequence[RetentionSweeper], now: datetime | None = None) -> list[SweepReport]:
    """Run several components' sweepers once (start-up, or the CLI)."""
    return [s.sweep(now) for s in sweepers]
