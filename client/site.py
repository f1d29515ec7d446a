"""A customer site as one object: its signing key, audit log, consent ledger and the per-person stores it keeps.

`open_site(settings)` opens the site a settings file (`site.yaml`) describes, for the CLI and the staff console;
`open_site_at(layout, ...)` opens one whose folders the caller lays out (the demo). Every store answers the
revocation protocol (`delete_person` / `find_person`), so revoking a person deletes through all of them: source
photos, intake crops, the federation's crop cache, personal adapters, collected portraits and staged payloads.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megaportrait.shared.errors import ConfigError
from megaportrait.shared.retention import FileStore

JOBS_FILE = "render_jobs.sqlite"


class NamedFileStore(FileStore):
    """A FileStore reported under its own name (a second store of one data kind: revocation keys by name)."""

    def __init__(self, root: Path, kind: str, name: str) -> None:
        super().__init__(root, kind)
        self.name = name


class CropCacheRevocation:
    """The federation's crop cache (`<dir>/crops-*.npz`, one file for all people of a site) seen by revocation:
    deleting a person deletes every cache file holding a row of theirs (the next round rebuilds it from the photos
    still consented); `find_person` reads the files back."""

    name = "face_crop_cache"

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)

    def _holding(self, person_ref: str) -> list[Path]:
        from megaportrait.client.retention import CROP_CACHE_GLOB, CropCacheStore

        out = []
        for path in sorted(self.cache_dir.glob(CROP_CACHE_GLOB)):
            people = CropCacheStore.people(path)
            if people is None or person_ref in people:  # an unreadable cache may hold anyone: it goes too
                out.append(path)
        return out

    def delete_person(self, person_ref: str) -> list[str]:
        gone = []
        for path in self._holding(person_ref):
            gone.append(hashlib.sha256(path.read_bytes()).hexdigest())
            path.unlink()
        return gone

    def find_person(self, person_ref: str) -> list[str]:
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in self._holding(person_ref)]


@dataclass(frozen=True)
class SiteLayout:
    """Where a site keeps each thing. `extra_stores`: more (name, root, kind) person stores that revocation must
    clear (the demo's staging folder for the federation)."""

    root: Path
    photos: Path
    crops: Path
    adapters: Path
    portraits: Path
    payloads: Path
    crop_cache: Path
    jobs: Path
    key: Path
    audit_log: Path
    ledger: Path
    consent_policy: Path
    extra_stores: tuple[tuple[str, Path, str], ...] = ()

    @classmethod
    def from_settings(cls, settings: Any) -> "SiteLayout":
        """The layout `site.yaml` describes: photos in `site.data_dir/<person>/` (what the SuperNode trains on),
        everything else derived in `site.state_dir`, key/log/ledger where the `policy` section puts them."""
        s, p = settings.site, settings.policy
        state = Path(s.state_dir)
        return cls(root=state, photos=Path(s.data_dir), crops=state / "crops", adapters=state / "adapters",
                   portraits=state / "portraits", payloads=state / "payloads", crop_cache=state, jobs=state / JOBS_FILE,
                   key=Path(p.audit_key), audit_log=Path(p.audit_log), ledger=Path(p.consent_ledger),
                   consent_policy=Path(p.consent_file))


@dataclass
class Site:
    """One customer site, open: key, audit log, consent ledger and stores. Close it (or use `with`)."""

    site_id: str
    layout: SiteLayout
    key: Any  # Ed25519PrivateKey
    audit: Any  # AuditLog
    ledger: Any  # ConsentLedger
    photos: FileStore
    crops: FileStore
    adapters: FileStore
    portraits: FileStore
    payloads: FileStore
    crop_cache: CropCacheRevocation
    extra: list[FileStore] = field(default_factory=list)
    _jobs: Any = None

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def key_path(self) -> Path:
        return self.layout.key

    @property
    def public_key_path(self) -> Path:
        return Path(f"{self.layout.key}.pub")

    @property
    def stores(self) -> list:
        """Every store holding something derived from a person's photos, in the order revocation clears them."""
        return [self.photos, self.crops, self.adapters, self.portraits, self.payloads, *self.extra, self.crop_cache]

    @property
    def witness(self):
        """The render node's and the coordinator's audit checkpoints this site keeps (`shared.audit.WitnessStore`)."""
        from megaportrait.shared.audit import WITNESS_DIR, WitnessStore

        return WitnessStore(self.root / WITNESS_DIR)

    @property
    def jobs(self):
        """The site's book of render jobs (`client.render_requests.JobBook`), opened on first use."""
        if self._jobs is None:
            from megaportrait.client.render_requests import JobBook

            self._jobs = JobBook(self.layout.jobs)
        return self._jobs

    def people(self) -> list[str]:
        """Person refs the site knows: anyone with a consent receipt or a photo folder."""
        refs = {r for r, in self.ledger._db_exec("SELECT DISTINCT person_ref FROM receipts")}
        if self.photos.root.is_dir():
            refs |= {d.name for d in self.photos.root.iterdir() if d.is_dir()}
        return sorted(refs)

    def close(self) -> None:
        if self._jobs is not None:
            self._jobs.close()
        self.ledger.close()
        self.audit.close()

    def __enter__(self) -> "Site":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_site_at(site_id: str, layout: SiteLayout, *, create_key: bool = False, checkpoint_every: int = 100) -> Site:
    """Open (creating folders and the ledger as needed) the site laid out as `layout`. The signing key must exist
    unless `create_key` (ConfigError naming the command that makes one)."""
    from megaportrait.client.retention import SiteFileStore
    from megaportrait.shared.audit import AuditLog, generate_signing_key, load_signing_key
    from megaportrait.shared.consent import ConsentLedger
    from megaportrait.shared.policy import load_consent_policy

    if not layout.consent_policy.is_file():
        raise ConfigError(f"consent policy {layout.consent_policy} not found (policy.consent_file)")
    policy = load_consent_policy(layout.consent_policy)
    if layout.key.is_file():
        try:
            key = load_signing_key(layout.key)
        except ValueError as exc:
            raise ConfigError(f"{layout.key} (policy.audit_key) is not a readable signing key: {exc}") from exc
    elif create_key:
        key = generate_signing_key(layout.key)
    else:
        raise ConfigError(f"no signing key at {layout.key} (policy.audit_key): make one with `megaportrait audit "
                          f"keygen {layout.key}`, and give {layout.key}.pub to the render node operator "
                          "(`megaportrait render-node trust-site`)")
    audit = AuditLog(layout.audit_log, key, component=f"site:{site_id}", checkpoint_every=checkpoint_every)
    ledger = ConsentLedger(layout.ledger, site=site_id, key=key, policy=policy, audit=audit)
    return Site(site_id=site_id, layout=layout, key=key, audit=audit, ledger=ledger,
                photos=SiteFileStore(layout.photos, "source_photos"),
                crops=NamedFileStore(layout.crops, "face_crops", "face_crops"),
                adapters=SiteFileStore(layout.adapters, "personal_adapters"),
                portraits=NamedFileStore(layout.portraits, "outputs", "portraits"),
                payloads=NamedFileStore(layout.payloads, "render_payloads", "staged_payloads"),
                crop_cache=CropCacheRevocation(layout.crop_cache),
                extra=[NamedFileStore(root, kind, name) for name, root, kind in layout.extra_stores])


def open_site(settings: Any) -> Site:
    """The site `settings` (a loaded `site.yaml`) describes."""
    return open_site_at(settings.site.site_id, SiteLayout.from_settings(settings))
