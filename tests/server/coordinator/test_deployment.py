"""The deployment engine for real: one `flower-superlink` and three `flower-supernode` processes on loopback, TLS
on every connection (certificates from shared/pki.py), SuperNode authentication with registered keys, each site's
consent ledger named in its node config.

One federation and one three-round SecAgg+ job serve every test (a run costs minutes on two shared cores):
1. run A trains round 1 with all three sites; its coordinator (the `flwr-serverapp` process) is SIGKILLed as soon
   as the round-1 checkpoint is written, before round 2 can train;
2. run B (same run config) resumes from that checkpoint and trains round 2; site-c's SuperNode is SIGKILLed once
   it has received its round-2 training request (its key shares are out), and the round completes with the other
   two (SecAgg+ recovers the dead site's masks from its neighbours' shares);
3. round 3 would take site-a and site-b past the per-photo budget of the run's privacy policy (set between their
   epsilon after two rounds and after three): each site enforces its own budget and declines at the budget query,
   nothing trains, the run ends at round 2.

Every site holds at most four crops, so each round's DP-SGD release has sample rate 1 at every site and the
budget can be placed from the accountant alone. The run config keeps the sites' work small (one local step).
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import socket
import ssl
import time

import numpy as np
import pytest

from megaportrait.client.federation import LEDGER_FILE, SiteConsent, SitePrivacyLedger, \
    identity_settings_from_run_config, record_federated_consent
from megaportrait.server.coordinator.checkpoint import load_checkpoint
from megaportrait.server.coordinator.deployment import LocalFederation, default_run_config, serverapp_processes

pytestmark = pytest.mark.slow

SITES = ("site-a", "site-b", "site-c")
RUN = {"num-server-rounds": 3, "secure-aggregation": True, "local-steps": 1, "round-timeout": 120.0}


def epsilon_after(rounds: int, steps: int) -> float:
    """A site's epsilon after `rounds` releases of `steps` DP-SGD steps at sample rate 1, from Opacus' accountant
    (as `SitePrivacyLedger.epsilon` composes them)."""
    from opacus.accountants import create_accountant

    settings = identity_settings_from_run_config({**default_run_config(), **RUN})
    accountant = create_accountant(settings.accountant)
    accountant.history = [(settings.noise_multiplier, 1.0, steps)] * rounds
    return float(accountant.get_epsilon(settings.delta))


def ledger_of(fed: LocalFederation, site: str) -> SitePrivacyLedger:
    return SitePrivacyLedger(fed.site_state_dir(site) / LEDGER_FILE)


def read_status(state_dir) -> dict:
    path = state_dir / "status.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@pytest.fixture(scope="module")
def federation(tmp_path_factory, people, templates, astronaut):
    from PIL import Image

    root = tmp_path_factory.mktemp("deployment")
    photos = root / "photos"
    plan = {"site-a": {"person-obama": people["obama"][:2]}, "site-b": {"person-biden": people["biden"][:1]},
            "site-c": {"person-template": templates[3:4]}}
    for site, persons in plan.items():
        for person, files in persons.items():
            (photos / site / person).mkdir(parents=True)
            for f in files:
                shutil.copy(f, photos / site / person / f.name)
    (photos / "site-b" / "person-astronaut").mkdir()
    Image.fromarray(astronaut).save(photos / "site-b" / "person-astronaut" / "astronaut.png")
    consent = {}
    for site in SITES:
        consent[site] = SiteConsent.in_folder(root / "consent" / site)
        record_federated_consent(consent[site], site, sorted(p.name for p in (photos / site).iterdir()),
                                 actor="test")
    fed = LocalFederation(sites={s: photos / s for s in SITES}, root=root / "federation", consent=consent)
    with fed:
        yield fed


@pytest.fixture(scope="module")
def job(federation):
    """Runs A and B (see the module docstring); what the tests inspect afterwards."""
    fed = federation
    state_dir = fed.root / "coordinator"
    budget = (epsilon_after(2, RUN["local-steps"]) + epsilon_after(3, RUN["local-steps"])) / 2
    policy = fed.root / "privacy.yaml"  # the per-photo budget between two and three rounds; per site: 3 rounds fit
    policy.write_text(f"version: 1\ndelta: 1.0e-5\naccountant: rdp\nbudgets:\n  per_photo: {budget}\n"
                      "  per_person: 100.0\n  per_site: 100.0\n")
    config = {**RUN, "privacy-policy": str(policy), "state-dir": str(state_dir)}
    started = time.monotonic()
    run_a = fed.run(config)
    fed.wait_for(lambda: (c := load_checkpoint(state_dir)) is not None and c.round == 1, 420, "round 1", poll=0.2)
    coordinators = fed.wait_for(lambda: serverapp_processes(fed.superlink), 10, "the serverapp process", poll=0.2)
    for process in coordinators:
        process.send_signal(signal.SIGKILL)
    status_after_kill = read_status(state_dir)
    killed_coordinator_at = time.monotonic() - started
    # The operator's step after a coordinator crash: tell the SuperLink the dead run is over (else the sites keep
    # retrying its last messages until the SuperLink misses the dead process's heartbeat), then start a new run.
    fed.stop_run(run_a)
    run_b = fed.run(config)

    def site_c_got_round2_training_request() -> bool:
        # SecAgg+ sends three train messages before unmasking: setup, share_keys, collect_masked_vectors. The third
        # reaching site-c means its key shares were delivered and it is now training: kill it there. (Flower's
        # SecAgg+ workflow numbers its groups within the run: run B's first round, round 2 overall, is "ROUND 1".)
        log = fed.supernodes["site-c"].log_text()
        return len(re.findall(rf"\[RUN {run_b}, ROUND 1\][^\n]*\n[^\n]*Receiving: train message", log)) >= 3

    fed.wait_for(site_c_got_round2_training_request, 420, "site-c's round-2 training request", poll=0.2)
    fed.supernodes["site-c"].kill()
    killed_site_at = time.monotonic() - started
    fed.wait_for(lambda: read_status(state_dir).get("run_id") == str(run_b)
                 and read_status(state_dir)["state"] == "finished", 420, "the end of run B", poll=0.5)
    print(f"\ndeployment job: coordinator killed after {killed_coordinator_at:.0f} s, site-c after "
          f"{killed_site_at:.0f} s, both runs done after {time.monotonic() - started:.0f} s")
    return {"run_a": run_a, "run_b": run_b, "state_dir": state_dir, "budget": budget,
            "status_after_kill": status_after_kill, "status": read_status(state_dir)}


def test_superlink_serves_tls_with_our_ca_and_refuses_plain_text(federation):
    fed = federation
    context = ssl.create_default_context(cafile=str(fed.creds_dir / "ca.pem"))
    with socket.create_connection(("127.0.0.1", fed.port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            subject = dict(x[0] for x in tls.getpeercert()["subject"])
    assert subject["commonName"] == "superlink"
    with socket.create_connection(("127.0.0.1", fed.port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not raw.recv(64).startswith(b"HTTP/1.1 200")
    assert len(set(fed.node_ids.values())) == 3  # three registered (authenticated) SuperNodes


def test_two_rounds_over_tls_change_the_global_adapter_and_track_site_epsilon(federation, job):
    state_dir = job["state_dir"]
    assert job["status"]["state"] == "finished" and job["status"]["round"] == 2
    initial, one, two = (load_checkpoint(state_dir, round=r) for r in (0, 1, 2))
    for before, after in ((initial, one), (one, two)):
        assert max(float(np.abs(a - b).max()) for a, b in zip(after.arrays, before.arrays)) > 1e-4
    budget = json.loads((state_dir / "budget.json").read_text())["sites"]
    for site in SITES:
        ledger = ledger_of(federation, site)
        assert ledger.epsilon() > 0
        # the coordinator's figure is the site accountant's own
        assert budget[site]["epsilon"] == pytest.approx(ledger.epsilon())
    assert budget["site-a"]["rounds"] == [1, 2] and budget["site-b"]["rounds"] == [1, 2]
    for site in ("site-a", "site-b"):
        assert ledger_of(federation, site).epsilon() == pytest.approx(epsilon_after(2, RUN["local-steps"]))


def test_each_deployed_site_checked_consent_and_audited_what_it_trained_on(federation, job):
    from megaportrait.shared import audit

    for site, rounds in (("site-a", [1, 2]), ("site-b", [1, 2]), ("site-c", [1])):
        log = federation.consent[site].audit_log
        people = sorted(p.name for p in federation.sites[site].iterdir())
        checks = {(e.person, e.outcome) for e in audit.read_entries(log) if e.action == "consent.check"}
        assert checks == {(person, "ok") for person in people}
        trained = [e for e in audit.read_entries(log) if e.action == "federation.train" and e.outcome == "ok"]
        assert [e.detail["round"] for e in trained] == rounds
        photos = {hashlib.sha256(p.read_bytes()).hexdigest() for p in federation.sites[site].rglob("*") if p.is_file()}
        assert all(set(e.data) <= photos and e.data for e in trained)


def test_the_coordinator_audited_both_runs_in_its_state_dir(job):
    from megaportrait.server.coordinator.auditing import adapter_sha256, audit_paths
    from megaportrait.shared import audit

    log, key = audit_paths(job["state_dir"])
    report = audit.verify(log, f"{key}.pub")
    assert report.ok, report.summary()
    entries = list(audit.read_entries(log))
    assert {e.component for e in entries} == {"coordinator"}
    assert [e.action for e in entries].count("run.start") == 2
    (resume,) = [e for e in entries if e.action == "run.resume"]
    assert resume.actor == f"run:{job['run_b']}" and resume.detail["round"] == 1
    # run A was killed right after round 1's checkpoint (its round entry may or may not have been written);
    # run B resumed from it (audited above) and finished round 2
    last = [e for e in entries if e.action == "round.aggregate"][-1]
    assert last.detail["round"] == 2 and last.detail["aggregated"] == ["site-a", "site-b"]
    assert last.detail["adapter_sha256"] == adapter_sha256(load_checkpoint(job["state_dir"], round=2).arrays)
    assert entries[-1].action == "run.finish" and entries[-1].actor == f"run:{job['run_b']}"


def test_a_site_killed_mid_round_leaves_the_round_to_the_others(federation, job):
    state_dir = job["state_dir"]
    assert sorted(load_checkpoint(state_dir, round=1).sites) == list(SITES)
    assert sorted(load_checkpoint(state_dir, round=2).sites) == ["site-a", "site-b"]
    # site-c was killed after sharing its keys and before training: it released nothing in round 2
    assert [r["round"] for r in ledger_of(federation, "site-c").rounds] == [1]
    budget = json.loads((state_dir / "budget.json").read_text())["sites"]
    assert budget["site-c"]["rounds"] == [1]
    assert sorted(job["status"]["round_reports"]["2"]["admitted"]) == list(SITES)  # it was in the round when it died


def test_coordinator_killed_mid_run_resumes_from_its_checkpoint(federation, job):
    state_dir = job["state_dir"]
    assert job["status_after_kill"]["state"] == "running" and job["status_after_kill"]["round"] == 1
    assert job["status_after_kill"]["run_id"] == str(job["run_a"])
    one, two = load_checkpoint(state_dir, round=1), load_checkpoint(state_dir, round=2)
    assert one.meta["run_id"] == str(job["run_a"]) and two.meta["run_id"] == str(job["run_b"])
    assert two.meta["resumed_from"] == 1 and job["status"]["run_id"] == str(job["run_b"])
    assert any(not np.allclose(a, b) for a, b in zip(one.arrays, two.arrays))
    for site in SITES:  # the killed run trained round 1 only; the resumed run took over at round 2
        rounds = [(r["run"], r["round"]) for r in ledger_of(federation, site).rounds]
        assert [r for r in rounds if r[0] == str(job["run_a"])] == [(str(job["run_a"]), 1)]


def test_sites_over_budget_decline_and_nothing_trains(federation, job):
    """The sites read the run's privacy policy as their own: each declines round 3 itself (`privacy_budget`), before
    the coordinator would have to refuse it, and records the decline in its own audit log."""
    from megaportrait.shared import audit

    state_dir = job["state_dir"]
    report = job["status"]["round_reports"]["3"]
    assert report["admitted"] == [] and report["refused"] == []
    assert {s: report["declined"].get(s) for s in ("site-a", "site-b")} == {"site-a": "privacy_budget",
                                                                            "site-b": "privacy_budget"}
    budget = json.loads((state_dir / "budget.json").read_text())["sites"]
    for site in ("site-a", "site-b"):
        assert budget[site]["rounds"] == [1, 2] and budget[site]["epsilon"] < job["budget"]
        assert budget[site]["epsilon"] == pytest.approx(epsilon_after(2, RUN["local-steps"]))
        assert len(ledger_of(federation, site).history) == 2  # declined: no third release
        declines = [e for e in audit.read_entries(federation.consent[site].audit_log)
                    if e.action == "federation.train" and e.outcome == "refused"]
        assert declines and {e.detail["reason"] for e in declines} == {"privacy_budget"}, declines
    assert load_checkpoint(state_dir).round == 2
