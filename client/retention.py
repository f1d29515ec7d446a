"""The customer site's retention sweeper (policies/retention.yaml): what it deletes, and how each deletion is proved.

The site's stores (`site_sweeper` builds one sweeper over all of them):

- `source_photos`: the photos the federation trains on, `<data-dir>/<person_ref>/...` (`federation.person_photos`);
- `face_crops`: the federation's crop cache, `<state-dir>/crops-*.npz` (`federation.load_site_crops`). One file
  holds several people's crops, all cut when the file was written, so an expired file is deleted whole and the
  next round rebuilds it from the photos still kept and consented;
- `personal_adapters`: `<state-dir>/adapters/<person_ref>/*.safetensors` (`client personalise` writes them there);
- `consent_receipts`: ledger receipts that ended (expired or revoked) longer ago than consent.yaml's
  `site_retention_of_receipts`.

Age counts from a file's mtime (a receipt's from when it ended). Each deletion is read back (`is_gone`) and audited
by `RetentionSweeper`; a file whose data would stay readable through another hard link or a symlink's target is
left in place and reported as failed. `SiteSweeper` then reads the sweep's own entries back from the audit log, checking hash and signature.
Nothing else in the site's folders (privacy ledger, global adapter, outbox, logs) is touched.
"""
from __future__ import annotations

import hashlib
import json
import stat
import zipfile
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from megaportrait.shared.audit import AuditEntry, AuditLog, entry_hash
from megaportrait.shared.errors import ConfigError
from megaportrait.shared.policy import Policies
from megaportrait.shared.retention import FileStore, RetainedItem, RetentionSweeper, RetentionViolation, SweepReport

ADAPTERS_DIR = "adapters"
"""Per-person adapters under the site's state folder: `<state-dir>/adapters/<person_ref>/`."""
RECEIPTS_KIND = "consent_receipts"
CROP_CACHE_GLOB = "crops-*.npz"


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unlink_only_copy(path: Path) -> None:
    """Unlink `path`, unless its data would stay readable elsewhere (other hard links, or the target of a symlink):
    then RetentionViolation, and the file stays, so every sweep reports it until the other copy is dealt with."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise RetentionViolation("it is a symbolic link: deleting it would leave the file it points to")
    if st.st_nlink > 1:
        raise RetentionViolation(f"{st.st_nlink - 1} other hard link(s) to it would keep its data readable")
    path.unlink()


class SitePhotoStore:
    """`source_photos`: the photos `federation.person_photos` finds in the site's data folder (person folders named
    by person_ref; a photo directly in the folder has no person). Other files there are not the sweeper's."""

    kind = "source_photos"

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        if not self.data_dir.is_dir():
            raise ConfigError(f"site data folder {self.data_dir} does not exist (the photos, one folder per person)")

    def list(self, kind: str) -> list[RetainedItem]:
        from megaportrait.client.federation import person_photos

        if kind != self.kind:
            return []
        out = []
        for person, paths in person_photos(self.data_dir).items():
            for p in paths:
                try:
                    out.append(RetainedItem(kind, str(p.relative_to(self.data_dir)), _mtime(p), _sha256_file(p),
                                            "" if person == "_" else person))
                except FileNotFoundError:
                    continue  # removed while listing (e.g. by the operator)
        return out

    def delete(self, item: RetainedItem) -> None:
        path = self.data_dir / item.item_id
        _unlink_only_copy(path)
        if path.parent != self.data_dir:
            try:
                path.parent.rmdir()
            except OSError:
                pass  # the person's other files remain

    def is_gone(self, item: RetainedItem) -> bool:
        try:
            return _sha256_file(self.data_dir / item.item_id) != item.digest
        except FileNotFoundError:
            return True


class CropCacheStore:
    """`face_crops` in the federation's crop cache (`<state-dir>/crops-*.npz`): one item per person per file, whose
    digest is over that person's crop rows. Deleting any of them deletes the whole file (it is rebuilt next round);
    an unreadable or empty file is one item with no person."""

    kind = "face_crops"

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        if not self.state_dir.is_dir():
            raise ConfigError(f"site state folder {self.state_dir} does not exist")

    @staticmethod
    def people(path: Path) -> dict[str, str] | None:
        """person_ref -> digest of that person's rows in the file; None when the file cannot be read as a cache."""
        try:
            with np.load(path, allow_pickle=False) as z:
                pixels, person = z["pixels"], z["person"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        out = {}
        for ref in sorted(set(person.tolist())):
            rows = np.ascontiguousarray(pixels[person == ref])
            out[str(ref)] = hashlib.sha256(str(ref).encode() + b"\0" + rows.tobytes()).hexdigest()
        return out

    def list(self, kind: str) -> list[RetainedItem]:
        if kind != self.kind:
            return []
        out = []
        for path in sorted(self.state_dir.glob(CROP_CACHE_GLOB)):
            try:
                created = _mtime(path)
                people = self.people(path)
                if not people:
                    out.append(RetainedItem(kind, path.name, created, _sha256_file(path), ""))
                    continue
            except FileNotFoundError:
                continue  # a round replaced it while listing
            out.extend(RetainedItem(kind, path.name, created, digest, ref) for ref, digest in people.items())
        return out

    def delete(self, item: RetainedItem) -> None:
        _unlink_only_copy(self.state_dir / item.item_id)

    def is_gone(self, item: RetainedItem) -> bool:
        path = self.state_dir / item.item_id
        try:
            people = self.people(path) if item.person_ref else None
            if people is None:
                return _sha256_file(path) != item.digest
        except FileNotFoundError:
            return True
        return people.get(item.person_ref) != item.digest


class SiteFileStore(FileStore):
    """`FileStore` whose delete reports data still readable through other hard links or a symlink's target."""

    def delete(self, item: RetainedItem) -> None:
        path = self.root / item.item_id
        _unlink_only_copy(path)
        try:
            path.parent.rmdir()
        except OSError:
            pass  # the person's other files remain


def adapter_store(state_dir: str | Path) -> SiteFileStore:
    """The site's per-person adapters, `<state-dir>/adapters/<person_ref>/` (created if missing)."""
    return SiteFileStore(Path(state_dir) / ADAPTERS_DIR, "personal_adapters")


class ReceiptStore:
    """Consent receipts in the site's ledger; an item's age counts from when the receipt ended, its digest is the
    receipt id."""

    kind = RECEIPTS_KIND

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger

    def list(self, kind: str) -> list[RetainedItem]:
        if kind != self.kind:
            return []
        return [RetainedItem(kind, rid, ended, rid, person) for rid, person, ended in self.ledger.receipt_ends()]

    def delete(self, item: RetainedItem) -> None:
        self.ledger.delete_receipt(item.item_id)

    def is_gone(self, item: RetainedItem) -> bool:
        return not self.ledger.has_receipt(item.item_id)


class SiteSweeper(RetentionSweeper):
    """The site's sweeper: after each sweep it reads its own entries back from the audit log (hash and signature
    checked) and raises RetentionViolation if a deletion's entry or the summary is missing. `last_audited` holds
    the entries read back; `ledger` is the site's ConsentLedger."""

    def __init__(self, *args: Any, ledger: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ledger = ledger
        self.last_audited: list[AuditEntry] = []

    def sweep(self, now: datetime | None = None, *, progress: Callable[[int, int], None] | None = None) -> SweepReport:
        start = self.audit.path.stat().st_size if self.audit.path.is_file() else 0
        report = super().sweep(now, progress=progress)
        self.last_audited = read_back_audit(self.audit, start, report, self.actor)
        return report


def read_back_audit(audit: AuditLog, offset: int, report: SweepReport, actor: str) -> list[AuditEntry]:
    """The `retention.*` entries `actor` wrote to `audit` after byte `offset`, each hash- and signature-checked;
    RetentionViolation unless every digest in `report.deleted` has an ok `retention.delete` entry and the sweep's
    summary entry is there."""
    from cryptography.exceptions import InvalidSignature

    with open(audit.path, "rb") as fh:
        if offset:
            fh.seek(offset - 1)
            if fh.read(1) != b"\n":
                fh.readline()  # the size was read mid-line: start at the next entry
        lines = fh.read().splitlines()
    entries, deleted, summary = [], Counter(), False
    for raw in lines:
        if not raw.strip():
            continue
        entry = AuditEntry.from_json(json.loads(raw))
        if entry.actor != actor or not entry.action.startswith("retention."):
            continue
        if entry_hash(entry.body()) != entry.hash:
            raise RetentionViolation(f"{audit.path}: entry seq {entry.seq} does not match its hash")
        try:
            audit.public_key.verify(bytes.fromhex(entry.sig), bytes.fromhex(entry.hash))
        except (InvalidSignature, ValueError):
            raise RetentionViolation(f"{audit.path}: entry seq {entry.seq} fails its signature check") from None
        entries.append(entry)
        if entry.action == "retention.delete" and entry.outcome == "ok":
            deleted.update(entry.data)
        summary = summary or entry.action == "retention.sweep"
    missing = Counter(d for digests in report.deleted.values() for d in digests) - deleted
    if missing or not summary:
        what = f"{sum(missing.values())} deletion(s)" if missing else "the sweep summary"
        raise RetentionViolation(f"{audit.path}: {what} of {actor} cannot be read back from the audit log")
    return entries


def site_sweeper(state_dir: str | Path, policies: Policies, audit: AuditLog, *, data_dir: str | Path, ledger: Any,
                 site_id: str, clock: Callable[[], datetime] | None = None,
                 on_report: Callable[[SweepReport], None] | None = None) -> SiteSweeper:
    """The site's sweeper over its photos (`data_dir`), crop cache and adapters (`state_dir`) and the receipts in
    `ledger` (a ConsentLedger opened under `policies.consent`); audited in `audit` as `retention:site:<site_id>`."""
    if ledger.policy.version_hash != policies.consent.version_hash:
        raise ConfigError(f"the consent ledger was opened under consent policy {ledger.policy.path} "
                          f"({ledger.policy.version_hash[:12]}), the sweeper was given {policies.consent.path} "
                          f"({policies.consent.version_hash[:12]})")
    stores = {"source_photos": SitePhotoStore(data_dir), "face_crops": CropCacheStore(state_dir),
              "personal_adapters": adapter_store(state_dir), RECEIPTS_KIND: ReceiptStore(ledger)}
    return SiteSweeper(policies.retention, stores, audit, actor=f"retention:site:{site_id}", clock=clock,
                       on_report=on_report, ledger=ledger,
                       extra_keep={RECEIPTS_KIND: ledger.policy.rules.site_retention_of_receipts})


@contextmanager
def open_site_retention(policy: Any, *, site_id: str, data_dir: str | Path, state_dir: str | Path, component: str,
                        clock: Callable[[], datetime] | None = None) -> Iterator[SiteSweeper]:
    """`site_sweeper` with the files a site's settings name (`policy`: the `policy` section of Settings): both policy
    files (PolicyError names the file and line at fault), the audit log and key, the consent ledger. The ledger and
    key must exist (ConfigError otherwise); both are closed on exit."""
    from megaportrait.shared.audit import load_signing_key
    from megaportrait.shared.consent import ConsentLedger
    from megaportrait.shared.policy import load_policies

    policies = load_policies(policy.consent_file, policy.retention_file)
    for what, path, setting, hint in (
            ("signing key", policy.audit_key, "policy.audit_key", "`megaportrait audit keygen` makes one"),
            ("consent ledger", policy.consent_ledger, "policy.consent_ledger", "record consent at the site first")):
        if not Path(path).is_file():
            raise ConfigError(f"no {what} at {path} ({setting}): {hint}, or fix the setting")
    try:
        key = load_signing_key(policy.audit_key)
    except ValueError as exc:
        raise ConfigError(f"{policy.audit_key} (policy.audit_key) is not a readable signing key: {exc}") from exc
    audit = AuditLog(policy.audit_log, key, component=component)
    ledger = None
    try:
        ledger = ConsentLedger(policy.consent_ledger, site=site_id, key=key, policy=policies.consent, audit=audit)
        yield site_sweeper(state_dir, policies, audit, data_dir=data_dir, ledger=ledger, site_id=site_id, clock=clock)
    finally:
        if ledger is not None:
            ledger.close()
        audit.close()


def describe_failures(report: SweepReport) -> list[str]:
    """One line per item a sweep could not delete verifiably: kind, person, digest and reason."""
    return [f"{item.kind} {item.person_ref or '-'} sha256 {item.digest[:12]}: {reason}"
            for item, reason in report.failed]

