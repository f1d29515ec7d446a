"""Budget ledger and checkpoints: the coordinator's two pieces of state that must survive a crash."""
from __future__ import annotations

import numpy as np
import pytest

from megaportrait.server.coordinator.budget import BudgetLedger
from megaportrait.server.coordinator.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_compatible,
    load_checkpoint,
    save_checkpoint,
)
from megaportrait.server.coordinator.strategy import build_strategy
from megaportrait.shared.errors import ConfigError


def test_ledger_refuses_a_site_whose_next_round_exceeds_the_budget(tmp_path):
    ledger = BudgetLedger(tmp_path / "budget.json", budget_per_site=6.0)
    assert ledger.admits("site-a", 4.7, server_round=1)
    ledger.record_round("site-a", 4.7, server_round=1)
    assert not ledger.admits("site-a", 7.1, server_round=2)
    assert ledger.admits("site-b", 5.9, server_round=2)
    # A restarted coordinator reads the same ledger and keeps refusing.
    again = BudgetLedger(tmp_path / "budget.json", budget_per_site=6.0)
    assert again.spent("site-a") == pytest.approx(4.7)
    assert again.sites["site-a"].rounds == [1]
    assert again.sites["site-a"].refused[0]["epsilon_next"] == pytest.approx(7.1)


def test_ledger_never_lowers_a_sites_epsilon(tmp_path):
    ledger = BudgetLedger(tmp_path / "budget.json", budget_per_site=10.0)
    ledger.record_round("site-a", 8.0, server_round=1)
    ledger.observe("site-a", 1.0)  # a site that lost its own ledger does not get its budget back
    assert ledger.spent("site-a") == pytest.approx(8.0)
    assert ledger.admits("site-a", 2.0, server_round=2)  # projected at max(2.0, 8.0) = 8 <= 10
    ledger2 = BudgetLedger(tmp_path / "b2.json", budget_per_site=7.5)
    ledger2.observe("site-a", 8.0)
    assert not ledger2.admits("site-a", 2.0, server_round=2)  # on record already over budget


def test_checkpoint_round_trip_and_latest_pointer(tmp_path):
    names = ["a.lora_A", "a.lora_B"]
    arrays0 = [np.zeros((4, 8), np.float32), np.ones((8, 4), np.float32)]
    save_checkpoint(tmp_path, Checkpoint(round=0, arrays=arrays0, names=names, base_model_sha256="abc"))
    arrays1 = [a + 0.5 for a in arrays0]
    save_checkpoint(tmp_path, Checkpoint(round=1, arrays=arrays1, names=names, base_model_sha256="abc",
                                         sites=["site-a", "site-b"], meta={"run_id": "7"}))
    latest = load_checkpoint(tmp_path)
    assert latest.round == 1 and latest.sites == ["site-a", "site-b"] and latest.meta["run_id"] == "7"
    np.testing.assert_array_equal(latest.arrays[1], arrays1[1])
    np.testing.assert_array_equal(load_checkpoint(tmp_path, round=0).arrays[0], arrays0[0])
    check_compatible(latest, names, "abc")
    with pytest.raises(CheckpointError):
        check_compatible(latest, names, "other-base")
    with pytest.raises(CheckpointError):
        check_compatible(latest, names[:1], "abc")
    assert load_checkpoint(tmp_path / "empty") is None


def test_robust_strategies_are_refused_with_secure_aggregation():
    arrays = [np.zeros(3, np.float32)]
    with pytest.raises(ConfigError, match="secure-aggregation"):
        build_strategy({"strategy": "fedmedian", "secure-aggregation": True}, arrays, 2)
    dp = build_strategy({"strategy": "fedmedian", "secure-aggregation": False, "clipping-norm": 0.5}, arrays, 2)
    assert type(dp.strategy).__name__ == "FedMedian" and dp.clipping_norm == 0.5
    with pytest.raises(ConfigError):
        build_strategy({"strategy": "krum"}, arrays, 2)
