"""Privacy accounting in three units: every figure from an Opacus accountant; the coordinator refuses a run whose
planned per-site epsilon crosses the policy; the site's ledger composes global rounds and personal adapters and
declines a round that would cross its own budget; `client privacy` prints the three units."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from typer.testing import CliRunner

from megaportrait.client import federation
from megaportrait.server.coordinator.app import privacy_plan
from megaportrait.shared import accounting
from megaportrait.shared.cli import app
from megaportrait.shared.errors import ConfigError


def _policy(tmp_path, per_photo=64.0, per_person=8.0, per_site=8.0):
    path = tmp_path / "privacy.yaml"
    path.write_text(f"version: 1\ndelta: 1.0e-5\naccountant: rdp\nbudgets:\n  per_photo: {per_photo}\n"
                    f"  per_person: {per_person}\n  per_site: {per_site}\n")
    return path


def test_figures_come_from_opacus_and_each_unit_is_what_it_says():
    acc = RDPAccountant()
    acc.history = [(1.0, 1.0, 2)]
    assert accounting.epsilon([(1.0, 1.0, 2)], 1e-5) == pytest.approx(acc.get_epsilon(1e-5))
    global_rounds = [(2.0, 0.5, 4), (2.0, 0.5, 4)]
    fig = accounting.figures(global_rounds, [(1.0, 1.0, 30)], [(1.0, 1.0, 1)] * 2, 4, 1e-5)
    assert fig.per_photo == pytest.approx(accounting.epsilon(global_rounds + [(1.0, 1.0, 30)], 1e-5))
    assert fig.per_site == pytest.approx(7.077, abs=0.01)  # the shipped default: z = 1, two rounds
    group = accounting.epsilon([(0.5, 1.0, 4)] * 2, 1e-5)  # k = 4 photos: z / 4, no subsampling credit
    assert fig.per_person == pytest.approx(min(group, fig.per_site))
    assert math.isinf(accounting.epsilon([(0.0, 1.0, 1)], 1e-5))
    assert accounting.membership_bound(1.0, 1e-5, 0.01) == pytest.approx(math.e * 0.01 + 1e-5)


def test_the_shipped_run_config_plans_at_most_8_per_site_and_a_noisier_plan_is_refused(tmp_path):
    from megaportrait.server.coordinator.deployment import default_run_config

    plan = privacy_plan(default_run_config())
    assert plan["planned_site_epsilon"] <= 8.0
    print(f"shipped run config: planned per-site epsilon {plan['planned_site_epsilon']:.3f}")
    with pytest.raises(ConfigError, match="per_site budget 8"):
        privacy_plan({"num-server-rounds": 2, "server-noise-multiplier": 0.1})  # the old default: ~166
    with pytest.raises(ConfigError, match="epsilon-budget-per-site"):
        privacy_plan({"epsilon-budget-per-site": 10.0})
    loose = privacy_plan({"num-server-rounds": 5, "server-noise-multiplier": 0.5,
                          "privacy-policy": str(_policy(tmp_path, 64, 100, 100))})
    assert loose["planned_site_epsilon"] == pytest.approx(accounting.epsilon([(0.5, 1.0, 5)], 1e-5))


def test_the_site_ledger_composes_global_rounds_and_personal_adapters(tmp_path):
    ledger = federation.SitePrivacyLedger(tmp_path / "ledger.json")
    ledger.record(2.0, 1.0, 4, federation=(1.0, 1.0, 1), largest_person=3, round=1)
    only_global = ledger.epsilon()
    ledger.record_personal(1.0, 1.0, 30, person="abc")
    again = federation.SitePrivacyLedger(tmp_path / "ledger.json")  # survives a restart
    assert again.epsilon() == pytest.approx(accounting.epsilon([(2.0, 1.0, 4), (1.0, 1.0, 30)], 1e-5))
    assert again.epsilon() > only_global
    fig = again.figures()
    assert fig.largest_person == 3 and fig.per_site == pytest.approx(accounting.epsilon([(1.0, 1.0, 1)], 1e-5))


def test_a_site_declines_a_round_that_would_cross_its_own_budget(tmp_path):
    crops = federation.SiteCrops(np.zeros((4, 8, 8, 3), np.uint8), ("a", "b", "c", "d"), ("p", "p", "q", "q"))
    site = federation.SiteConfig("site-x", tmp_path, tmp_path / "state",
                                 privacy_policy=_policy(tmp_path, per_photo=64, per_person=100, per_site=8))
    site.state_dir.mkdir()
    client = federation.GlobalAdapterClient(site, {"local-steps": 1}, run_id=1)
    config = {"local-steps": 1, "federation-noise-multiplier": 1.0}
    assert client._over_budget(crops, config) == ""
    client.ledger.record(2.0, 1.0, 1, federation=(1.0, 1.0, 1))
    client.ledger.record(2.0, 1.0, 1, federation=(1.0, 1.0, 1))
    over = client._over_budget(crops, config)  # a third round at z = 1: per-site 9.2 > 8
    assert f"per_site epsilon {accounting.epsilon([(1.0, 1.0, 3)], 1e-5):.3g}" in over and "per_photo" not in over
    assert "per_site" in client._over_budget(crops, {"local-steps": 1, "federation-noise-multiplier": 0.0})


def test_what_leaves_the_site_is_coarse():
    assert [federation.examples_bucket(n) for n in (0, 1, 7, 10, 57, 999)] == [0, 1, 1, 10, 10, 100]
    assert "round-loss" not in federation.METRIC_KEYS


def test_client_privacy_prints_the_three_units(tmp_path):
    ledger = federation.SitePrivacyLedger(tmp_path / federation.LEDGER_FILE)
    ledger.record(2.0, 1.0, 4, federation=(1.0, 1.0, 1), largest_person=2)
    out = CliRunner().invoke(app, ["client", "privacy", "--state-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    for unit in ("per photo:", "per person:", "per site:", "budget 8"):
        assert unit in out.output
    data = json.loads(CliRunner().invoke(app, ["client", "privacy", "--state-dir", str(tmp_path), "--json"]).output)
    assert data["per_site"] == pytest.approx(accounting.epsilon([(1.0, 1.0, 1)], 1e-5))


def test_coordinator_status_prints_each_sites_three_units(tmp_path):
    from megaportrait.server.coordinator.budget import BudgetLedger

    ledger = BudgetLedger(tmp_path / "budget.json", 64.0)
    ledger.record_round("site-a", 3.5, 1)
    ledger.record_federation("site-a", 1.0, 1)
    ledger.record_federation("site-a", 1.0, 2)
    out = CliRunner().invoke(app, ["coordinator", "status", "--state-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    site = json.loads(out.output)["privacy"]["site-a"]
    assert site["per_photo"] == 3.5 and site["per_site"] == pytest.approx(7.077, abs=0.01)
    assert site["per_person_at_most"] == site["per_site"] and site["delta"] == 1e-5


def test_a_personal_adapter_is_composed_into_the_site_ledger_and_refused_over_budget(tmp_path, astronaut):
    import cv2

    from megaportrait.shared.config import IdentitySettings

    crops = [cv2.resize(astronaut[30:230, 150:350], (64, 64)) for _ in range(3)]
    hashes = ["a" * 64, "b" * 64, "c" * 64]
    settings = IdentitySettings(steps=2, noise_multiplier=1.0)
    global0, _, _ = federation.initial_global_arrays(settings, seed=0)
    ledger = federation.SitePrivacyLedger(tmp_path / federation.LEDGER_FILE)
    ledger.record(2.0, 1.0, 4)
    before = ledger.epsilon()
    with pytest.raises(federation.SiteError, match="per-photo epsilon") as info:
        federation.personalise_adapter(crops, settings, person_ref="p" * 64, global_arrays=global0,
                                       photo_sha256=hashes, privacy_ledger=ledger, per_photo_budget=before)
    assert info.value.reason == "privacy_budget" and ledger.personal == []
    adapter = federation.personalise_adapter(crops, settings, person_ref="p" * 64, global_arrays=global0,
                                             photo_sha256=hashes, privacy_ledger=ledger, per_photo_budget=64.0)
    again = federation.SitePrivacyLedger(tmp_path / federation.LEDGER_FILE)
    p = adapter.privacy
    assert again.personal == [(p.noise_multiplier, p.sample_rate, p.steps)]
    assert again.epsilon() == pytest.approx(accounting.epsilon([(2.0, 1.0, 4), again.personal[0]], 1e-5))
    assert again.epsilon() > before
