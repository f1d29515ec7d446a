"""The site's retention sweeper: expired photos, face crops (the federation's crop cache too), personal adapters and
ended consent receipts are deleted, cannot be read back and are audited; everything else at the site is untouched.

Sites are built from the real photos in ../shared/data copied into a temp folder; the crop cache is the one the
federation's own intake (`federation.load_site_crops`) writes for those photos. File ages are set with os.utime and
the sweeper's clock is the test's. The CLI tests run `megaportrait client ...` in-process (typer's CliRunner) on the
real clock, so their ages are relative to now.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors
from typer.testing import CliRunner

from megaportrait.client import federation
from megaportrait.client.retention import CROP_CACHE_GLOB, CropCacheStore, adapter_store, open_site_retention
from megaportrait.shared import audit
from megaportrait.shared.cli import app
from megaportrait.shared.config import PolicySettings
from megaportrait.shared.policy import PolicyError

REPO = Path(__file__).resolve().parents[2]
DAY = timedelta(days=1)
SITE = "alpha"
ACTOR = f"retention:site:{SITE}"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _set_age(path: Path, created: datetime) -> None:
    os.utime(path, (created.timestamp(), created.timestamp()))


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` but the consent folder (ledger and audit log change on every sweep) -> sha256."""
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*"))
            if p.is_file() and "consent" not in p.relative_to(root).parts}


@pytest.fixture(scope="module")
def crop_cache(tmp_path_factory, people) -> tuple[str, bytes]:
    """(file name, bytes) of the crop cache the federation's intake writes for the site's photos (built once)."""
    data = tmp_path_factory.mktemp("cache-build") / "photos"
    state = data.parent / "federation"
    state.mkdir()
    _copy_photos(data, people)
    crops = federation.load_site_crops(federation.SiteConfig(SITE, data, state), 64)
    assert sorted(set(crops.person)) == ["person-a", "person-b"] and len(crops) == 3  # every photo accepted
    (cache,) = state.glob(CROP_CACHE_GLOB)
    return cache.name, cache.read_bytes()


def _copy_photos(data: Path, people) -> dict[str, Path]:
    photos = {"a0": (people["obama"][0], "person-a"), "a1": (people["obama"][1], "person-a"),
              "b0": (people["biden"][0], "person-b")}
    out = {}
    for key, (src, person) in photos.items():
        (data / person).mkdir(parents=True, exist_ok=True)
        out[key] = data / person / src.name
        shutil.copy(src, out[key])
    return out


class Site:
    """A site folder (data, state, consent) with its files aged relative to `t0`."""

    def __init__(self, root: Path, people, crop_cache: tuple[str, bytes]) -> None:
        self.root, self.t0 = root, datetime.now(timezone.utc).replace(microsecond=0)
        self.data, self.state = root / "photos", root / "federation"
        self.state.mkdir(parents=True)
        self.photos = _copy_photos(self.data, people)
        self.notes = self.data / "person-a" / "notes.txt"  # not a photo: not the sweeper's
        self.notes.write_text("operator's note")
        self.cache = self.state / crop_cache[0]
        self.cache.write_bytes(crop_cache[1])
        rng = np.random.default_rng(0)
        adapters = adapter_store(self.state)
        self.adapters = {ref: adapters.root / adapters.put(ref, "adapter-r1.safetensors", save_safetensors(
            {"lora_A": rng.standard_normal((4, 32), dtype=np.float32)}, metadata={"person_ref": ref})).item_id
            for ref in ("person-a", "person-b")}
        self.consent = federation.SiteConsent.in_folder(root / "consent")
        federation.record_federated_consent(self.consent, SITE, ["person-a", "person-b"], actor="test")
        # what else a site keeps: none of it is the sweeper's, however old
        others = [self.state / "privacy-ledger.json", self.state / "global-adapter.npz", self.state / "supernode.log",
                  self.state / "outbox" / "outbox.jsonl", self.state / "outbox" / "1-00000.bin"]
        for p in others:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"site state " + p.name.encode())
        np.savez(self.state / "global-adapter.npz", np.zeros((4, 32), np.float32), server_round=np.int64(3))
        ages = {self.photos["a0"]: 31, self.photos["a1"]: 29, self.photos["b0"]: 2, self.notes: 400, self.cache: 30,
                self.adapters["person-a"]: 366, self.adapters["person-b"]: 364, **{p: 1000 for p in others}}
        for path, days in ages.items():
            _set_age(path, self.t0 - days * DAY)
        self.policy_dir = REPO / "policies"

    def settings(self, **overrides) -> PolicySettings:
        paths = {"consent_file": self.policy_dir / "consent.yaml", "retention_file": self.policy_dir / "retention.yaml",
                 "consent_ledger": self.consent.ledger, "audit_key": self.consent.key,
                 "audit_log": self.consent.audit_log}
        return PolicySettings(**(paths | overrides))

    def settings_file(self, **overrides) -> Path:
        path = self.root / "site.yaml"
        lines = [f"  {k}: {v}" for k, v in self.settings(**overrides).model_dump(include={
            "consent_file", "retention_file", "consent_ledger", "audit_key", "audit_log"}).items()]
        path.write_text("policy:\n" + "\n".join(lines) + "\n")
        return path

    def entries(self, action: str | None = None) -> list[audit.AuditEntry]:
        return [e for e in audit.read_entries(self.consent.audit_log) if action is None or e.action == action]

    def log_verifies(self) -> bool:
        return audit.verify(self.consent.audit_log, audit.load_signing_key(self.consent.key).public_key()).ok


@pytest.fixture()
def site(tmp_path, people, crop_cache) -> Site:
    return Site(tmp_path / "site", people, crop_cache)


def _sweeper(site: Site, clock):
    return open_site_retention(site.settings(), site_id=SITE, data_dir=site.data, state_dir=site.state,
                               component=f"site:{SITE}", clock=clock)


def test_expired_site_data_is_deleted_cannot_be_read_back_and_is_audited(site):
    before = _snapshot(site.root)
    with np.load(site.cache) as z:
        cached_people = set(z["person"].tolist())
    assert cached_people == {"person-a", "person-b"}  # one cache file holds both people
    crop_digests = CropCacheStore.people(site.cache)
    expired = {site.photos["a0"], site.cache, site.adapters["person-a"]}

    with _sweeper(site, lambda: site.t0) as sweeper:
        report = sweeper.sweep()
        audited = sweeper.last_audited

    assert report.ok and report.deleted_count == 4
    assert report.deleted["source_photos"] == [before["photos/person-a/" + site.photos["a0"].name]]
    assert sorted(report.deleted["face_crops"]) == sorted(crop_digests.values())  # both people's crops: one file
    assert report.deleted["personal_adapters"] == [before[str(site.adapters["person-a"].relative_to(site.root))]]
    assert "consent_receipts" not in report.deleted  # both receipts are live
    for path in expired:
        with pytest.raises(FileNotFoundError):
            path.read_bytes()
    with pytest.raises(FileNotFoundError):
        np.load(site.cache)
    assert not site.adapters["person-a"].parent.exists()  # the person's emptied adapter folder went too
    # nothing else changed, byte for byte: unexpired photos and adapters, the note, the site's other state
    assert _snapshot(site.root) == {k: v for k, v in before.items() if site.root / k not in expired}

    deletes = site.entries("retention.delete")
    assert {(e.detail["kind"], e.person, e.data[0]) for e in deletes} == {
        ("source_photos", "person-a", report.deleted["source_photos"][0]),
        ("face_crops", "person-a", crop_digests["person-a"]), ("face_crops", "person-b", crop_digests["person-b"]),
        ("personal_adapters", "person-a", report.deleted["personal_adapters"][0])}
    assert all(e.outcome == "ok" and e.actor == ACTOR for e in deletes)
    (summary,) = site.entries("retention.sweep")
    assert summary.detail == {"deleted": 4, "failed": 0, "kept": report.kept} and summary.outcome == "ok"
    assert [e.seq for e in audited] == [e.seq for e in deletes] + [summary.seq]  # read back after the sweep
    assert site.log_verifies()


def test_the_next_sweep_takes_what_expired_since_and_the_rebuilt_cache_is_kept(site):
    now = {"t": site.t0}
    a1, adapter_b = _sha(site.photos["a1"]), _sha(site.adapters["person-b"])
    with _sweeper(site, lambda: now["t"]) as sweeper:
        sweeper.sweep()
        # the next round rebuilds the crop cache from the photos still there (the federation's own intake)
        crops = federation.load_site_crops(federation.SiteConfig(SITE, site.data, site.state), 64)
        (rebuilt,) = site.state.glob(CROP_CACHE_GLOB)
        _set_age(rebuilt, site.t0 + DAY)
        assert _sha(site.photos["b0"]) in crops.photo_sha256 and len(crops) == 2  # a0's crop is not back
        now["t"] = site.t0 + 2 * DAY
        report = sweeper.sweep()
    assert report.ok
    assert report.deleted == {"source_photos": [a1], "personal_adapters": [adapter_b]}
    assert not site.photos["a1"].exists() and not site.adapters["person-b"].exists()  # 31 and 366 days old now
    assert site.photos["b0"].is_file() and rebuilt.is_file() and site.notes.is_file()
    assert len(site.entries("retention.sweep")) == 2 and site.log_verifies()


def test_ended_consent_receipts_are_purged_after_the_consent_policy_keeps_them(site):
    with _sweeper(site, lambda: site.t0) as sweeper:
        old = sweeper.ledger.grant("person-gone", ["render"], granted_by="subject", actor="test",
                                   at=site.t0 - 7 * 365 * DAY)  # ended 90 days later: over 6 years ago
        recent = sweeper.ledger.grant("person-recent", ["render"], granted_by="subject", actor="test",
                                      at=site.t0 - 5 * 365 * DAY)
        report = sweeper.sweep()
        assert report.deleted["consent_receipts"] == [old.receipt_id]
        assert not sweeper.ledger.has_receipt(old.receipt_id) and sweeper.ledger.receipts("person-gone") == []
        assert sweeper.ledger.has_receipt(recent.receipt_id)
    (entry,) = [e for e in site.entries("retention.delete") if e.detail["kind"] == "consent_receipts"]
    assert (entry.person, entry.data, entry.outcome) == ("person-gone", (old.receipt_id,), "ok")
    assert site.log_verifies()


def test_an_unreadable_crop_cache_file_is_one_item_deleted_whole_when_expired(site, crop_cache):
    partial = site.state / "crops-0123456789abcdef.tmp.npz"  # what a crash mid-write leaves
    partial.write_bytes(crop_cache[1][:200])
    young = site.state / "crops-fedcba9876543210.tmp.npz"
    young.write_bytes(crop_cache[1][:300])
    _set_age(partial, site.t0 - 40 * DAY)
    _set_age(young, site.t0 - DAY)
    with _sweeper(site, lambda: site.t0) as sweeper:
        report = sweeper.sweep()
    assert report.ok and hashlib.sha256(crop_cache[1][:200]).hexdigest() in report.deleted["face_crops"]
    assert not partial.exists() and young.read_bytes() == crop_cache[1][:300]
    assert any(e.person == "" and e.detail["kind"] == "face_crops" for e in site.entries("retention.delete"))


def test_a_photo_a_hard_link_would_keep_readable_is_left_and_reported_until_the_link_goes(site):
    backup = site.root / "backup-a0.jpg"
    os.link(site.photos["a0"], backup)
    with _sweeper(site, lambda: site.t0) as sweeper:
        report = sweeper.sweep()
        (item, reason), = report.failed
        assert (item.kind, item.person_ref) == ("source_photos", "person-a") and "1 other hard link" in reason
        assert site.photos["a0"].is_file() and backup.is_file()  # not claimed gone: both stay, the sweep says why
        (failed,) = [e for e in site.entries("retention.delete") if e.outcome == "failed"]
        assert failed.detail["reason"].endswith("1 other hard link(s) to it would keep its data readable")
        assert site.entries("retention.sweep")[-1].outcome == "failed"
        assert sweeper.sweep().failed  # reported again on every sweep
        backup.unlink()  # the operator deals with the other copy
        report = sweeper.sweep()
    assert report.ok and report.deleted == {"source_photos": [item.digest]} and not site.photos["a0"].exists()
    assert site.log_verifies()


def test_a_photo_that_is_a_symbolic_link_is_left_and_reported(site):
    target = site.root / "elsewhere.jpg"
    site.photos["a0"].rename(target)
    site.photos["a0"].symlink_to(target)
    _set_age(target, site.t0 - 40 * DAY)
    with _sweeper(site, lambda: site.t0) as sweeper:
        report = sweeper.sweep()
    (item, reason), = report.failed
    assert item.kind == "source_photos" and "symbolic link" in reason
    assert site.photos["a0"].is_symlink() and target.is_file()


# --- the commands ----------------------------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env={"MEGAPORTRAIT_CONFIG": None, **(env or {})})


def _flat(text: str) -> str:
    """Text of a typer error box without its frame and line breaks."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def _sweep_args(site: Site, config: Path) -> list[str]:
    return ["client", "sweep", "--site-id", SITE, "--data-dir", str(site.data), "--state-dir", str(site.state),
            "--config", str(config)]


def test_client_sweep_prints_what_it_deleted_and_exits_0(site):
    result = _cli(*_sweep_args(site, site.settings_file()))
    assert result.exit_code == 0, result.output
    assert "4 deleted, 0 failed" in result.stdout
    deleted = [ln.split() for ln in result.stdout.splitlines() if ln.strip().startswith("deleted")]
    assert sorted((d[1], d[3]) for d in deleted) == [("face_crops", "person-a"), ("face_crops", "person-b"),
                                                    ("personal_adapters", "person-a"), ("source_photos", "person-a")]
    assert site.photos["a0"].name not in result.output  # records are named by hash, never by file name
    assert "audit: 5 entries read back" in result.stdout
    assert not site.photos["a0"].exists() and site.photos["a1"].is_file() and site.log_verifies()


def test_client_sweep_exits_1_when_a_deletion_cannot_be_verified(site):
    os.link(site.photos["a0"], site.root / "backup-a0.jpg")
    result = _cli(*_sweep_args(site, site.settings_file()))
    assert result.exit_code == 1, result.output
    assert "1 deletion(s) could not be verified" in result.stderr and "hard link" in result.stderr
    assert "FAILED  source_photos" in result.stdout


def _corrupt_retention_policy(site: Site) -> tuple[Path, int]:
    text = (REPO / "policies" / "retention.yaml").read_text().splitlines()
    line = next(i for i, ln in enumerate(text, start=1) if "face_crops:" in ln) + 1
    assert text[line - 1].strip() == "keep: 30d"
    text[line - 1] = "    keep: 30 days"
    bad = site.root / "bad-retention.yaml"
    bad.write_text("\n".join(text) + "\n")
    return bad, line


def test_a_corrupt_policy_file_is_refused_with_file_and_line_and_nothing_is_deleted(site):
    bad, line = _corrupt_retention_policy(site)
    config = site.settings_file(retention_file=bad)
    before = _snapshot(site.root)
    with pytest.raises(PolicyError) as caught:
        with open_site_retention(site.settings(retention_file=bad), site_id=SITE, data_dir=site.data,
                                 state_dir=site.state, component="test"):
            pass
    assert (caught.value.path, caught.value.line) == (bad, line)
    result = _cli(*_sweep_args(site, config))
    assert result.exit_code == 2 and f"{bad}:{line}:" in result.stderr and "30 days" in result.stderr
    person = ["client", "personalise", str(site.data / "person-a"), "--state-dir", str(site.state), "--data-dir",
              str(site.data), "--person-ref", "person-a", "--site-id", SITE,
              "--config", str(config)]
    result = _cli(*person)
    assert result.exit_code == 2 and f"{bad}:{line}:" in result.stderr
    assert _snapshot(site.root) == before and site.entries("retention.delete") == []


def test_client_sweep_refuses_a_missing_ledger_or_data_folder(site):
    result = _cli(*_sweep_args(site, site.settings_file(consent_ledger=site.root / "nowhere.sqlite")))
    assert result.exit_code == 2 and "no consent ledger at" in result.stderr
    result = _cli("client", "sweep", "--site-id", SITE, "--data-dir", str(site.root / "typo"), "--state-dir",
                  str(site.state), "--config", str(site.settings_file()))
    assert result.exit_code == 2 and "site data folder" in result.stderr and "does not exist" in result.stderr
    assert site.photos["a0"].is_file()


def test_personalise_sweeps_at_start_up_before_anything_else(site):
    args = ["client", "personalise", str(site.data / "person-a"), "--state-dir", str(site.state), "--data-dir",
            str(site.data), "--person-ref", "person-a", "--config", str(site.settings_file())]
    outside = _cli("client", "personalise", str(site.root), *args[3:], env={"MEGAPORTRAIT_SITE_ID": SITE})
    assert outside.exit_code == 2 and "not covered by its retention sweeper" in _flat(outside.output)
    assert site.photos["a0"].is_file()
    # no global adapter yet (the site has not taken part in a round): the command stops there, after the sweep
    (site.state / "global-adapter.npz").unlink()
    result = _cli(*args, env={"MEGAPORTRAIT_SITE_ID": SITE})
    assert result.exit_code == 2 and "no global adapter" in result.stderr
    assert "4 deleted" in result.stdout and not site.photos["a0"].exists() and site.photos["a1"].is_file()
    assert [e.actor for e in site.entries("retention.sweep")] == [ACTOR] and site.log_verifies()


class _SupernodeDouble:
    """Stands in for the flower-supernode process (the real one is started in tests/deploy): while it 'runs' it
    drops an already-expired photo into the site and waits for the periodic sweep to delete it."""

    def __init__(self, site: Site, state_dir: Path) -> None:
        self.site, self.log_path = site, state_dir / "supernode.log"
        self.seen: dict[str, bool] = {}

    def wait(self) -> int:
        self.seen["a0_gone_at_start"] = not self.site.photos["a0"].exists()
        late = self.site.data / "person-b" / "late.jpg"
        shutil.copy(self.site.photos["b0"], late)
        _set_age(late, datetime.now(timezone.utc) - 40 * DAY)
        deadline = time.monotonic() + 20
        while late.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.seen["late_gone_while_running"] = not late.exists()
        return 0

    def stop(self) -> None:
        self.seen["stopped"] = True

    def run_until_interrupted(self) -> None:
        """As `ManagedProcess.run_until_interrupted`: wait, then stop."""
        try:
            self.wait()
        finally:
            self.stop()


def test_supernode_sweeps_at_start_up_and_every_interval_while_it_runs(site, monkeypatch):
    from megaportrait.server.coordinator import deployment

    fast = site.root / "retention-1s.yaml"
    fast.write_text((REPO / "policies" / "retention.yaml").read_text().replace("interval: 1h", "interval: 1s"))
    creds = site.root / "credentials"
    (creds / "sites").mkdir(parents=True)
    (creds / "sites" / SITE).write_bytes(b"placeholder: the SuperNode double never reads it")
    doubles: list[_SupernodeDouble] = []

    def start_supernode(site_id, credentials, *, state_dir, **kwargs):
        doubles.append(_SupernodeDouble(site, Path(state_dir)))
        return doubles[-1]

    monkeypatch.setattr(deployment, "start_supernode", start_supernode)
    config = site.settings_file(retention_file=fast)
    result = _cli("client", "supernode", "--site-id", SITE, "--data-dir", str(site.data), "--state-dir",
                  str(site.state), "--credentials", str(creds), "--config", str(config))
    assert result.exit_code == 0, result.output
    assert doubles[0].seen == {"a0_gone_at_start": True, "late_gone_while_running": True, "stopped": True}
    sweeps = site.entries("retention.sweep")
    assert len(sweeps) >= 2 and all(e.actor == ACTOR and e.outcome == "ok" for e in sweeps)
    assert not any(t.name == "retention-sweeper" for t in threading.enumerate())  # stopped with the command
    assert site.log_verifies()
