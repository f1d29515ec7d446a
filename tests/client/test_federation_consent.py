"""Consent, checked by every site in every round, and adaptive clipping, on Flower's simulation engine.

Three simulated sites hold real photos (../shared/data people, a template portrait, skimage's astronaut) in person
folders named by person_ref, and each has its own consent ledger: site-a's two people and site-b's two consented
to federated training, site-c's one person never did. Round 1 runs; then person-obama at site-a revokes; the
coordinator is started again (a second run, resuming from the round-1 checkpoint) for round 2. The run uses
adaptive clipping from a norm far below any update, so every update is clipped and the norm must grow.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megaportrait.client import federation
from megaportrait.server.coordinator.checkpoint import load_checkpoint
from megaportrait.server.coordinator.deployment import simulate
from megaportrait.shared import audit

pytestmark = pytest.mark.slow

# A weak federation noise (z = 0.1, so that the noised clipped count stays readable with two sites) under a loose
# privacy policy written by the fixture: this test is about consent and clipping, not budgets.
RUN = {"secure-aggregation": False, "local-steps": 1, "min-sites": 2, "clipping": "adaptive", "clipping-norm": 1e-4,
       "server-noise-multiplier": 0.1}
REVOKED = "person-obama"


@pytest.fixture(scope="module")
def rounds(tmp_path_factory, people, templates, astronaut):
    from PIL import Image

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("consent-rounds")
    sites_dir = root / "photos"
    plan = {"site-a": {REVOKED: people["obama"][:2], "person-template": templates[:1]},
            "site-b": {"person-biden": people["biden"][:1]}, "site-c": {"person-nobody": templates[1:2]}}
    for site, persons in plan.items():
        for person, files in persons.items():
            (sites_dir / site / person).mkdir(parents=True)
            for f in files:
                shutil.copy(f, sites_dir / site / person / f.name)
    (sites_dir / "site-b" / "person-astronaut").mkdir()
    Image.fromarray(astronaut).save(sites_dir / "site-b" / "person-astronaut" / "astronaut.png")
    consent_dir = root / "consent"
    granted = {"site-a": [REVOKED, "person-template"], "site-b": ["person-biden", "person-astronaut"], "site-c": []}
    for site, refs in granted.items():
        federation.record_federated_consent(federation.SiteConsent.in_folder(consent_dir / site), site, refs,
                                            actor="test")
    state, site_state = root / "coordinator", root / "site-state"
    policy = root / "privacy.yaml"
    policy.write_text("version: 1\ndelta: 1.0e-5\naccountant: rdp\nbudgets:\n  per_photo: 1000.0\n"
                      "  per_person: 1000.0\n  per_site: 1000.0\n")
    RUN["privacy-policy"] = str(policy)
    first = simulate(sites_dir, state, site_state_dir=site_state, consent=consent_dir,
                     run_config={**RUN, "num-server-rounds": 1})
    with federation.SiteConsent.in_folder(consent_dir / "site-a").open("site-a") as ledger:
        ledger.revoke(REVOKED, by="test")
    second = simulate(sites_dir, state, site_state_dir=site_state, consent=consent_dir,
                      run_config={**RUN, "num-server-rounds": 2})
    return {"sites_dir": sites_dir, "consent": consent_dir, "site_state": site_state, "first": first,
            "second": second}


def entries(rounds, site: str, action: str) -> list[audit.AuditEntry]:
    return [e for e in audit.read_entries(rounds["consent"] / site / "audit.jsonl") if e.action == action]


def photo_hashes(folder: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def test_both_runs_finish_and_sites_report_their_accountant_epsilon(rounds):
    first, second = rounds["first"], rounds["second"]
    assert first.status["state"] == "finished" and first.status["round"] == 1
    assert second.status["state"] == "finished" and second.status["round"] == 2
    assert load_checkpoint(second.state_dir).meta["resumed_from"] == 1
    for site in ("site-a", "site-b"):
        ledger = federation.SitePrivacyLedger(rounds["site_state"] / site / federation.LEDGER_FILE)
        assert [r["round"] for r in ledger.rounds] == [1, 2]
        assert second.budget["sites"][site]["epsilon"] == pytest.approx(ledger.epsilon())


def test_a_revoked_person_is_out_of_the_next_round(rounds):
    revoked = photo_hashes(rounds["sites_dir"] / "site-a" / REVOKED)
    kept = photo_hashes(rounds["sites_dir"] / "site-a" / "person-template")
    trained = {e.detail["round"]: e for e in entries(rounds, "site-a", "federation.train") if e.outcome == "ok"}
    assert sorted(trained) == [1, 2]
    used_1, used_2 = set(trained[1].data), set(trained[2].data)
    assert revoked <= used_1 and kept <= used_1  # round 1 trained on both people (the check below can fail)
    assert not revoked & used_2 and used_2 == kept
    assert (trained[1].detail["people"], trained[2].detail["people"]) == (2, 1)
    assert trained[2].detail["excluded_people"] == 1
    # The exact counts stay at the site (its privacy ledger); the coordinator only gets power-of-ten buckets.
    ledger = federation.SitePrivacyLedger(rounds["site_state"] / "site-a" / federation.LEDGER_FILE)
    examples_1, examples_2 = (r["n_examples"] for r in ledger.rounds if r["kind"] == "global")
    assert examples_1 == len(used_1) and examples_2 == len(used_2) == examples_1 - len(revoked)
    for run, r in ((rounds["first"], "1"), (rounds["second"], "2")):
        exact = examples_1 if r == "1" else examples_2
        assert run.status["round_reports"][r]["examples"]["site-a"] == federation.examples_bucket(exact)
    # the consent checks of round 2 refused the person (audited), and no crop of theirs is left in the cache
    refusals = [e for e in entries(rounds, "site-a", "consent.check") if e.person == REVOKED and e.outcome == "refused"]
    assert refusals and {e.detail["reason"] for e in refusals} == {"consent_revoked"}
    for cache in (rounds["site_state"] / "site-a").glob("crops-*.npz"):
        with np.load(cache) as z:
            assert REVOKED not in set(z["person"].tolist())


def test_a_site_with_nobody_consented_declines_every_round(rounds):
    reports = {**rounds["first"].status["round_reports"], **rounds["second"].status["round_reports"]}
    for r in ("1", "2"):
        assert reports[r]["declined"] == {"site-c": "no_consented_person"}
        assert sorted(reports[r]["admitted"]) == ["site-a", "site-b"]
        assert sorted(load_checkpoint(rounds["second"].state_dir, round=int(r)).sites) == ["site-a", "site-b"]
    assert not (rounds["site_state"] / "site-c" / federation.LEDGER_FILE).exists()  # never released anything
    assert rounds["second"].budget["sites"]["site-c"]["rounds"] == []
    declines = entries(rounds, "site-c", "federation.train")
    assert [(e.outcome, e.detail["stage"], e.detail["reason"], e.detail["round"]) for e in declines] == \
        [("refused", "budget-query", "no_consented_person", 1), ("refused", "budget-query", "no_consented_person", 2)]


def test_adaptive_clipping_norm_grows_over_rounds_and_survives_the_restart(rounds):
    state = rounds["second"].state_dir
    dp1, dp2 = (load_checkpoint(state, round=r).meta["dp"] for r in (1, 2))
    assert dp1["clipping"] == dp2["clipping"] == "adaptive"
    assert dp1["clipping_norm"] == pytest.approx(RUN["clipping-norm"])
    # every update is far above 1e-4, so every site reports its update clipped and the norm goes up each round
    assert dp1["clipped_fraction"] > 0.5 and dp2["clipped_fraction"] > 0.5
    assert dp1["next_clipping_norm"] > dp1["clipping_norm"]
    assert dp2["clipping_norm"] == pytest.approx(dp1["next_clipping_norm"])  # the resumed run took it over
    assert dp2["next_clipping_norm"] > dp2["clipping_norm"]


def _cut(log: Path, keep: int) -> None:
    """The attack: keep the first `keep` entries of a log and empty its own checkpoint file."""
    lines = log.read_text().splitlines()
    log.write_text("".join(line + "\n" for line in lines[:keep]))
    Path(f"{log}.checkpoints").write_text("")


def test_sites_and_coordinator_witness_each_other_and_catch_a_truncated_log(rounds, tmp_path):
    """Each round, the coordinator's checkpoint goes to the sites with their instructions and each site's comes back
    in its metrics; cutting either side's log and its checkpoint file is then caught by `audit verify --witness`."""
    from typer.testing import CliRunner

    from megaportrait.server.coordinator.app import WITNESS_DIR
    from megaportrait.server.coordinator.auditing import audit_paths
    from megaportrait.shared.cli import app

    coordinator_log, coordinator_key = audit_paths(rounds["second"].state_dir)
    runner = CliRunner()
    cases = []
    coordinator_witness = rounds["second"].state_dir / WITNESS_DIR
    for site in ("site-a", "site-b", "site-c"):  # site-c declines every round: its declines are witnessed too
        site_log, site_pub = rounds["consent"] / site / "audit.jsonl", str(rounds["consent"] / site / "site.key.pub")
        kept = audit.WitnessStore(coordinator_witness).checkpoints(audit.load_public_key(site_pub))
        assert len(kept) >= 2, site  # from its budget answers and round metrics, both rounds
        cases.append((site_log, site_pub, coordinator_witness, max(c.size for c in kept)))
    site_witness = rounds["site_state"] / "site-a" / federation.WITNESS_DIR
    kept = audit.WitnessStore(site_witness).checkpoints(audit.load_public_key(f"{coordinator_key}.pub"))
    assert [c.size for c in kept] == sorted(c.size for c in kept) and len(kept) == 2  # rounds 1 and 2
    cases.append((coordinator_log, f"{coordinator_key}.pub", site_witness, max(c.size for c in kept)))
    for log, pub, witness, witnessed_size in cases:
        copy = tmp_path / log.parent.name / log.name
        copy.parent.mkdir(parents=True)
        shutil.copy(log, copy)
        _cut(copy, 1)
        assert runner.invoke(app, ["audit", "verify", str(copy), "-k", pub]).exit_code == 0  # alone, it looks fine
        res = runner.invoke(app, ["audit", "verify", str(copy), "-k", pub, "--witness", str(witness)])
        assert res.exit_code == 1 and f"seqs 1..{witnessed_size - 1} missing" in res.output, res.output
