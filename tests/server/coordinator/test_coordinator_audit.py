"""The coordinator's own audit log: written by the ServerApp on Flower's simulation engine, verified, tamper-evident.

Three simulated sites hold real photos, all with federated-training consent; site-c's epsilon on record is already
over the per-site budget (its ledger entry is seeded), so it is refused every round. Round 1 runs; the coordinator
is started again and resumes from that checkpoint for round 2. Its log must hold the run starts, the resume, each
round's outcome with the adapter and checkpoint hashes, the refusals, and verify; an edited entry must be caught.
"""
from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch
from typer.testing import CliRunner

from megaportrait.client import federation
from megaportrait.server.coordinator import auditing
from megaportrait.server.coordinator.checkpoint import checkpoint_dir, load_checkpoint
from megaportrait.server.coordinator.deployment import simulate
from megaportrait.shared import audit
from megaportrait.shared.cli import app as cli

pytestmark = pytest.mark.slow

RUN = {"secure-aggregation": False, "local-steps": 1, "min-sites": 2}
PERSONS = {"site-a": "person-template-a", "site-b": "person-biden", "site-c": "person-template-c"}


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory, people, templates):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("coordinator-audit")
    photos = {"site-a": templates[:1], "site-b": people["biden"][:1], "site-c": templates[1:2]}
    sites_dir, consent_dir = root / "photos", root / "consent"
    for site, person in PERSONS.items():
        (sites_dir / site / person).mkdir(parents=True)
        for f in photos[site]:
            shutil.copy(f, sites_dir / site / person / f.name)
        federation.record_federated_consent(federation.SiteConsent.in_folder(consent_dir / site), site, [person],
                                            actor="test")
    state = root / "coordinator"
    state.mkdir()
    (state / "budget.json").write_text(json.dumps({"budget_per_site": 64.0, "sites": {
        "site-c": {"epsilon": 150.0, "rounds": [], "refused": []}}}))
    runs = [simulate(sites_dir, state, site_state_dir=root / "site-state", consent=consent_dir,
                     run_config={**RUN, "num-server-rounds": rounds}) for rounds in (1, 2)]
    log_path, key_path = auditing.audit_paths(state)
    return {"state": state, "log": log_path, "key": key_path, "runs": runs, "photos": photos}


def _entries(coordinator, action: str) -> list[audit.AuditEntry]:
    return [e for e in audit.read_entries(coordinator["log"]) if e.action == action]


def test_the_log_and_its_key_live_in_the_state_dir(coordinator):
    assert [r.status["round"] for r in coordinator["runs"]] == [1, 2]
    assert coordinator["log"].is_file() and coordinator["log"].parent == coordinator["state"] / "audit"
    assert stat.S_IMODE(os.stat(coordinator["key"]).st_mode) == 0o600
    pub = coordinator["key"].with_name("signing.key.pub").read_text().strip()
    assert pub == audit.public_key_hex(audit.load_signing_key(coordinator["key"]))
    entries = list(audit.read_entries(coordinator["log"]))
    assert {e.component for e in entries} == {"coordinator"}
    assert [e.action for e in entries] == [
        "run.start", "budget.refuse", "round.aggregate", "run.finish",
        "run.start", "run.resume", "budget.refuse", "round.aggregate", "run.finish"]


def test_run_start_and_resume_are_recorded(coordinator):
    starts = _entries(coordinator, "run.start")
    assert len(starts) == 2
    for e, rounds in zip(starts, (1, 2)):
        assert e.outcome == "ok" and e.policy == e.detail["config_sha256"] and e.policy in e.data
        assert e.detail["strategy"] == "fedavg" and e.detail["clipping"] == "fixed"
        assert e.detail["min_sites"] == 2 and e.detail["rounds"] == rounds
        assert e.detail["epsilon_budget_per_site"] == 64.0 and e.detail["secure_aggregation"] is False
        assert e.detail["noise_multiplier"] > 0 and e.detail["clipping_norm"] > 0
    assert starts[0].policy != starts[1].policy  # num-server-rounds differs: another config version
    (resume,) = _entries(coordinator, "run.resume")
    round1 = checkpoint_dir(coordinator["state"]) / "round-0001.npz"
    assert resume.detail["round"] == 1 and resume.detail["checkpoint_sha256"] == auditing.file_sha256(round1)
    assert resume.detail["adapter_sha256"] == auditing.adapter_sha256(load_checkpoint(coordinator["state"], 1).arrays)


def test_each_round_names_its_sites_noise_adapter_and_checkpoint(coordinator):
    rounds = _entries(coordinator, "round.aggregate")
    assert [e.detail["round"] for e in rounds] == [1, 2]
    for e in rounds:
        r = e.detail["round"]
        ckpt = load_checkpoint(coordinator["state"], r)
        file_hash = auditing.file_sha256(checkpoint_dir(coordinator["state"]) / f"round-{r:04d}.npz")
        assert e.outcome == "ok"
        assert e.detail["admitted"] == e.detail["aggregated"] == ckpt.sites == ["site-a", "site-b"]
        assert e.detail["refused"] == {"site-c": {"epsilon_next": 150.0, "budget": 64.0}}
        assert e.detail["declined"] == {} and e.detail["failures"] == 0
        assert e.detail["dp"]["noise_stddev"] > 0
        assert e.detail["dp"]["noise_stddev"] == pytest.approx(ckpt.meta["dp"]["noise_stddev"])
        assert e.detail["adapter_sha256"] == auditing.adapter_sha256(ckpt.arrays)
        assert e.detail["checkpoint_sha256"] == file_hash
        assert e.data == (e.detail["adapter_sha256"], file_hash)
    assert rounds[0].detail["adapter_sha256"] != rounds[1].detail["adapter_sha256"]


def test_budget_refusals_are_refused_entries(coordinator):
    refusals = _entries(coordinator, "budget.refuse")
    assert [(e.outcome, e.actor, e.detail["round"]) for e in refusals] == [
        ("refused", "site:site-c", 1), ("refused", "site:site-c", 2)]
    assert all(e.detail["epsilon_next"] == 150.0 and e.detail["budget"] == 64.0 for e in refusals)


def test_no_personal_data_in_the_log(coordinator):
    text = coordinator["log"].read_text()
    for person in PERSONS.values():
        assert person not in text
    for files in coordinator["photos"].values():
        for f in files:
            assert f.name not in text and f.stem not in text
    assert all(e.person == "" for e in audit.read_entries(coordinator["log"]))


def test_the_log_verifies_and_the_cli_agrees(coordinator):
    pub = coordinator["key"].with_name("signing.key.pub")
    report = audit.verify(coordinator["log"], pub)
    assert report.ok and report.entries == 9 and report.last_checkpoint_size == 9, report.summary()
    result = CliRunner().invoke(cli, ["audit", "verify", str(coordinator["log"]), "--public-key", str(pub)])
    assert result.exit_code == 0, result.output
    assert "OK: 9 entries" in result.output


def test_an_edited_entry_is_caught(coordinator, tmp_path):
    log = tmp_path / "audit.jsonl"
    shutil.copy(coordinator["log"], log)
    shutil.copy(f"{coordinator['log']}.checkpoints", f"{log}.checkpoints")
    lines = log.read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if json.loads(line)["action"] == "budget.refuse")
    entry = json.loads(lines[n])
    entry["detail"]["epsilon_next"] = 50.0  # pretend site-c was within budget
    lines[n] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    log.write_text("\n".join(lines) + "\n")
    pub = coordinator["key"].with_name("signing.key.pub")
    report = audit.verify(log, pub)
    assert not report.ok and [(p.kind, p.line) for p in report.problems] == [("edited", n + 1)]
    result = CliRunner().invoke(cli, ["audit", "verify", str(log), "--public-key", str(pub)])
    assert result.exit_code == 1 and "edited" in result.output


def test_skipped_and_dropped_rounds_are_failed_entries(tmp_path):
    log = auditing.CoordinatorAudit.open(tmp_path, run_id=7, run_config={"min-sites": 2})
    log.round_outcome(3, {"admitted": ["site-a"], "refused": {}, "declined": {"site-b": "no_consented_person"}},
                      reason="too_few_sites")
    log.round_outcome(4, {"admitted": ["site-a", "site-b"]}, reason="non_unit_weights")
    log.close()
    log_path, key_path = auditing.audit_paths(tmp_path)
    skip, drop = audit.read_entries(log_path)
    assert (skip.action, skip.outcome, skip.detail["reason"], skip.actor) == ("round.skip", "failed", "too_few_sites",
                                                                              "run:7")
    assert (drop.action, drop.outcome, drop.detail["reason"]) == ("round.drop", "failed", "non_unit_weights")
    assert audit.verify(log_path, f"{key_path}.pub").ok
