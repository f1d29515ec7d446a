"""A site's own pieces, without Flower running: its privacy ledger and where it finds its photos."""
from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from megaportrait.client import federation


def test_site_ledger_composes_releases_with_the_opacus_accountant(tmp_path):
    from opacus.accountants import RDPAccountant

    ledger = federation.SitePrivacyLedger(tmp_path / "ledger.json", "rdp", 1e-5)
    assert ledger.epsilon() == 0.0
    projected = ledger.epsilon([(2.0, 1.0, 4)])
    eps1 = ledger.record(2.0, 1.0, 4, run="r", round=1)
    assert eps1 == pytest.approx(projected)
    eps2 = ledger.record(2.0, 0.5, 4, run="r", round=2)
    reference = RDPAccountant()
    reference.history = [(2.0, 1.0, 4), (2.0, 0.5, 4)]
    assert eps2 == pytest.approx(reference.get_epsilon(1e-5))
    assert eps1 < eps2
    reloaded = federation.SitePrivacyLedger(tmp_path / "ledger.json")
    assert reloaded.epsilon() == pytest.approx(eps2) and [r["round"] for r in reloaded.rounds] == [1, 2]


def test_planned_sample_rate_matches_the_loader_train_lora_builds():
    assert federation.planned_sample_rate(4, 4) == 1.0
    assert federation.planned_sample_rate(3, 4) == 1.0  # batch shrinks to the data
    assert federation.planned_sample_rate(10, 4) == pytest.approx(1 / 3)


def _context(node_config, run_config):
    return Context(run_id=1, node_id=2, node_config=node_config, state=RecordDict(), run_config=run_config)


def test_site_folders_from_node_config_or_simulation_partition(tmp_path):
    photos = tmp_path / "photos"
    for site in ("site-x", "site-y"):
        (photos / site / "person").mkdir(parents=True)
    deployed = federation.site_from_context(_context(
        {"data-dir": str(photos / "site-y"), "state-dir": str(tmp_path / "state-y")}, {}))
    assert deployed.site_id == "site-y" and deployed.state_dir.is_dir()
    simulated = federation.site_from_context(_context(
        {"partition-id": 1, "num-partitions": 2}, {"sim-sites-dir": str(photos), "sim-state-dir": str(tmp_path / "s")}))
    assert simulated.site_id == "site-y" and simulated.state_dir == tmp_path / "s" / "site-y"
    with pytest.raises(federation.SiteError, match="state-dir"):
        federation.site_from_context(_context({"data-dir": str(photos / "site-x")}, {}))
    with pytest.raises(federation.SiteError, match="no site folder"):
        federation.site_from_context(_context({"partition-id": 5}, {"sim-sites-dir": str(photos)}))
    with pytest.raises(federation.SiteError, match="no site data"):
        federation.site_from_context(_context({}, {}))
