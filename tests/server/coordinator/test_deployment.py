"""The deployment engine for real: one `flower-superlink` and three `flower-supernode` processes on loopback, TLS
on every connection (certificates from shared/pki.py), SuperNode authentication with registered keys.

Scenarios share one federation (starting it costs ~15 s):
1. two SecAgg+ rounds; in round 2 site-c's SuperNode is SIGKILLed once it has received its training request (its
   key shares are out), and the round completes with the other two (SecAgg+ recovers the dead site's masks from
   its neighbours' shares);
2. the coordinator (the `flwr-serverapp` process) is SIGKILLed after round 1, and a new run resumes from the
   round-1 checkpoint;
3. a budget below the sites' next-round epsilon: every site is refused, nothing trains.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import ssl
from pathlib import Path

import numpy as np
import pytest

from megaportrait.client.federation import LEDGER_FILE, SitePrivacyLedger
from megaportrait.server.coordinator.checkpoint import load_checkpoint
from megaportrait.server.coordinator.deployment import LocalFederation, serverapp_processes

pytestmark = pytest.mark.slow

SITES = ("site-a", "site-b", "site-c")


def outbox_entries(fed: LocalFederation, site: str) -> list[dict]:
    index = fed.site_state_dir(site) / "outbox" / "outbox.jsonl"
    return [json.loads(line) for line in index.read_text().splitlines()] if index.is_file() else []


@pytest.fixture(scope="module")
def federation(tmp_path_factory, people, templates, astronaut):
    from PIL import Image

    root = tmp_path_factory.mktemp("deployment")
    photos = root / "photos"
    for site, person, files in (("site-a", "obama", people["obama"]), ("site-b", "biden", people["biden"])):
        (photos / site / person).mkdir(parents=True)
        for f in files:
            shutil.copy(f, photos / site / person / f.name)
    (photos / "site-b" / "astronaut").mkdir()
    Image.fromarray(astronaut).save(photos / "site-b" / "astronaut" / "astronaut.png")
    for i, f in enumerate(templates[3:6]):
        (photos / "site-c" / f"template-{i}").mkdir(parents=True)
        shutil.copy(f, photos / "site-c" / f"template-{i}" / f.name)
    fed = LocalFederation(sites={s: photos / s for s in SITES}, root=root / "federation")
    with fed:
        yield fed


@pytest.fixture(scope="module")
def secagg_run_with_dropout(federation):
    fed = federation
    run_id = fed.run({"num-server-rounds": 2, "secure-aggregation": True, "round-timeout": 300.0,
                      "state-dir": str(fed.root / "coordinator-a")})

    def site_c_got_round2_training_request():
        # SecAgg+ sends three train messages before unmasking: setup, share_keys, collect_masked_vectors. The third
        # reaching site-c means its key shares were delivered and it is now training: kill it there.
        log = fed.supernodes["site-c"].log_text()
        return len(re.findall(rf"\[RUN {run_id}, ROUND 2\][^\n]*\n[^\n]*Receiving: train message", log)) >= 3

    fed.wait_for(site_c_got_round2_training_request, 600, "site-c's round-2 training request")
    fed.supernodes["site-c"].kill()
    status_path = fed.root / "coordinator-a" / "status.json"
    fed.wait_for(lambda: status_path.is_file() and json.loads(status_path.read_text())["state"] == "finished",
                 600, "the end of the run")
    fed.start_site("site-c")  # back for the next scenarios (same key, same registration)
    return {"run_id": run_id, "state_dir": fed.root / "coordinator-a", "status": json.loads(status_path.read_text())}


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


def test_two_rounds_over_tls_change_the_global_adapter_and_track_site_epsilon(federation, secagg_run_with_dropout):
    run = secagg_run_with_dropout
    assert run["status"]["state"] == "finished" and run["status"]["round"] == 2
    initial, final = load_checkpoint(run["state_dir"], round=0), load_checkpoint(run["state_dir"])
    assert final.round == 2
    assert max(float(np.abs(a - b).max()) for a, b in zip(final.arrays, initial.arrays)) > 1e-4
    budget = json.loads((run["state_dir"] / "budget.json").read_text())["sites"]
    for site in SITES:
        ledger = SitePrivacyLedger(federation.site_state_dir(site) / LEDGER_FILE)
        assert ledger.epsilon() > 0
        # the coordinator's figure is the site accountant's own
        assert budget[site]["epsilon"] == pytest.approx(ledger.epsilon())
    assert budget["site-a"]["rounds"] == [1, 2] and budget["site-b"]["rounds"] == [1, 2]


def test_a_site_killed_mid_round_leaves_the_round_to_the_others(federation, secagg_run_with_dropout):
    run = secagg_run_with_dropout
    assert sorted(load_checkpoint(run["state_dir"], round=1).sites) == list(SITES)
    assert sorted(load_checkpoint(run["state_dir"], round=2).sites) == ["site-a", "site-b"]
    # site-c was killed after sharing its keys and before training: it released nothing in round 2
    assert len(SitePrivacyLedger(federation.site_state_dir("site-c") / LEDGER_FILE).history) == 1
    budget = json.loads((run["state_dir"] / "budget.json").read_text())["sites"]
    assert budget["site-c"]["rounds"] == [1]


def test_coordinator_killed_after_round_one_resumes_from_its_checkpoint(federation, secagg_run_with_dropout):
    fed = federation
    state_dir = fed.root / "coordinator-b"
    config = {"num-server-rounds": 2, "secure-aggregation": False, "round-timeout": 300.0,
              "epsilon-budget-per-site": 100.0, "state-dir": str(state_dir)}
    first_run = fed.run(config)
    fed.wait_for(lambda: (c := load_checkpoint(state_dir)) is not None and c.round == 1, 300, "round 1")
    coordinators = fed.wait_for(lambda: serverapp_processes(fed.superlink), 10, "the serverapp process")
    for process in coordinators:
        process.send_signal(signal.SIGKILL)
    status = json.loads((state_dir / "status.json").read_text())
    assert status["state"] == "running" and status["round"] == 1  # it died mid-run
    second_run = fed.run(config)
    fed.wait_for(lambda: json.loads((state_dir / "status.json").read_text()).get("run_id") == str(second_run)
                 and json.loads((state_dir / "status.json").read_text())["state"] == "finished", 300, "resumed run")
    one, two = load_checkpoint(state_dir, round=1), load_checkpoint(state_dir, round=2)
    assert one.meta["run_id"] == str(first_run) and two.meta["run_id"] == str(second_run)
    assert two.meta["resumed_from"] == 1
    assert any(not np.allclose(a, b) for a, b in zip(one.arrays, two.arrays))


def test_sites_over_budget_are_refused_and_nothing_trains(federation, secagg_run_with_dropout):
    fed = federation
    state_dir = fed.root / "coordinator-c"
    histories = {s: len(SitePrivacyLedger(fed.site_state_dir(s) / LEDGER_FILE).history) for s in SITES}
    run_id = fed.run({"num-server-rounds": 1, "secure-aggregation": False, "round-timeout": 300.0,
                      "epsilon-budget-per-site": 1.0, "state-dir": str(state_dir)})
    fed.wait_for(lambda: (state_dir / "status.json").is_file()
                 and json.loads((state_dir / "status.json").read_text())["state"] == "finished", 240, "refusals")
    budget = json.loads((state_dir / "budget.json").read_text())["sites"]
    assert sorted(budget) == list(SITES)
    for site in SITES:
        assert budget[site]["refused"] and budget[site]["refused"][0]["epsilon_next"] > 1.0
        assert len(SitePrivacyLedger(fed.site_state_dir(site) / LEDGER_FILE).history) == histories[site]
    assert load_checkpoint(state_dir).round == 0 and run_id
