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
    dp = build_strategy({"strategy": "fedmedian", "secure-aggregation": False, "clipping-norm": 0.5,
                         "server-noise-multiplier": 0.0}, arrays, 2)
    assert type(dp.strategy).__name__ == "FedMedian" and dp.clipping_norm == 0.5
    with pytest.raises(ConfigError):
        build_strategy({"strategy": "krum"}, arrays, 2)


# --- clipping and the outer strategy, without Flower running ---------------------------------------------------


class _Proxy:
    def __init__(self, node_id: int) -> None:
        self.node_id, self.cid = node_id, str(node_id)


def _fit_res(arrays, n, **metrics):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    return FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(arrays), num_examples=n,
                  metrics=dict(metrics))


def _adaptive(wrapper_cls=None, **cfg):
    from megaportrait.server.coordinator.strategy import ClientSideAdaptiveClipping

    config = {"clipping": "adaptive", "secure-aggregation": False, "server-noise-multiplier": 0.0,
              "clipping-norm": 1.0, **cfg}
    strategy = build_strategy(config, [np.zeros(3, np.float32)], 3)
    assert isinstance(strategy, ClientSideAdaptiveClipping)
    if wrapper_cls is not None:  # the same settings in another wrapper class (Flower's own, for comparison)
        strategy = wrapper_cls(strategy.strategy, noise_multiplier=0.0, num_sampled_clients=3,
                               initial_clipping_norm=strategy.clipping_norm, clipped_count_stddev=0.0)
    return strategy


def test_adaptive_clipping_grows_the_norm_when_updates_are_clipped_and_shrinks_it_when_not():
    arrays = [np.zeros(3, np.float32)]
    grow = _adaptive()
    grow.aggregate_fit(1, [(_Proxy(i), _fit_res(arrays, 1, norm_bit=True)) for i in range(3)], [])
    assert grow.clipping_norm == pytest.approx(np.exp(0.2 * (1.0 - 0.5)))  # every update clipped: norm up
    shrink = _adaptive(**{"clipping-target-quantile": 0.25})
    shrink.aggregate_fit(1, [(_Proxy(i), _fit_res(arrays, 1, norm_bit=False)) for i in range(3)], [])
    assert shrink.clipping_norm == pytest.approx(np.exp(0.2 * (0.0 - 0.25)))  # none clipped: norm down
    assert shrink.history[0]["clipping_norm"] == 1.0 and shrink.history[0]["next_clipping_norm"] < 1.0


def _track(strategy, update_norms, rounds=80):
    """Rounds in which site i's update has norm update_norms[i]; the bit is what adaptiveclipping_mod sends."""
    arrays = [np.zeros(3, np.float32)]
    for r in range(1, rounds + 1):
        results = [(_Proxy(i), _fit_res(arrays, 1, norm_bit=bool(norm > strategy.clipping_norm)))
                   for i, norm in enumerate(update_norms)]
        strategy.aggregate_fit(r, results, [])
    return strategy.clipping_norm


def test_adaptive_clipping_tracks_the_target_quantile_of_update_norms():
    from flwr.server.strategy import DifferentialPrivacyClientSideAdaptiveClipping

    norms = [1.0, 2.0, 4.0]  # median 2: half the updates clipped at a norm between 2 and 4 (or 1 and 2)
    ours = _track(_adaptive(**{"clipping-norm": 0.01}), norms)
    assert 1.0 <= ours <= 4.0
    # Flower 1.42's wrapper, same start and settings, runs away from the updates (its bit/rule sign mismatch); when
    # this assertion fails, Flower has fixed it and ClientSideAdaptiveClipping can go.
    flowers = _track(_adaptive(DifferentialPrivacyClientSideAdaptiveClipping, **{"clipping-norm": 0.01}), norms)
    assert flowers < 0.01


def test_adaptive_clipping_noises_the_aggregate_with_the_norm_the_sites_clipped_to():
    size = 200_000
    strategy = _adaptive(**{"server-noise-multiplier": 1.0, "clipped-count-stddev": 1000.0})
    used = strategy.clipping_norm
    results = [(_Proxy(i), _fit_res([np.zeros(size, np.float32)], 1, norm_bit=True)) for i in range(3)]
    parameters, _ = strategy.aggregate_fit(1, results, [])
    from flwr.common import parameters_to_ndarrays

    noise_std = float(parameters_to_ndarrays(parameters)[0].std())
    assert strategy.clipping_norm != pytest.approx(used, rel=0.02)  # the norm moved by more than the test's slack
    assert noise_std == pytest.approx(strategy.noise_multiplier * used / 3, rel=0.02)


def test_declined_replies_are_left_out_of_the_aggregate_and_the_checkpoint(tmp_path):
    from megaportrait.server.coordinator.strategy import SiteBudgetStrategy

    inner = build_strategy({"secure-aggregation": False, "server-noise-multiplier": 0.0}, [np.zeros(4, np.float32)],
                           2)
    rounds = []
    strategy = SiteBudgetStrategy(inner, grid=None, ledger=BudgetLedger(tmp_path / "budget.json", 10.0),
                                  min_sites=2, on_round=lambda *a: rounds.append(a))
    results = [(_Proxy(1), _fit_res([np.ones(4, np.float32)], 2, **{"site-id": "a", "epsilon": 1.0})),
               (_Proxy(2), _fit_res([np.full(4, 3.0, np.float32)], 2, **{"site-id": "b", "epsilon": 1.5})),
               (_Proxy(3), _fit_res([np.full(4, 50.0, np.float32)], 0, **{
                   "site-id": "c", "epsilon": 0.5, "declined": 1, "decline-reason": "no_consented_person"}))]
    from flwr.common import parameters_to_ndarrays

    parameters, _ = strategy.aggregate_fit(1, results, [])
    np.testing.assert_allclose(parameters_to_ndarrays(parameters)[0], 2.0)
    report = strategy.rounds[1]
    assert report["trained"] == ["a", "b"] and report["examples"] == {"a": 2, "b": 2}
    assert report["declined_at_training"] == {"c": "no_consented_person"}
    assert rounds[0][0] == 1 and rounds[0][2] == ["a", "b"] and rounds[0][3]["sites_aggregated"] == 2
    assert strategy.ledger.sites["c"].rounds == [] and strategy.ledger.sites["a"].rounds == [1]
    # with one site left after the decline, the round does not count
    parameters, _ = strategy.aggregate_fit(2, results[1:], [])
    assert parameters is None and len(rounds) == 1


def test_clipping_mode_is_checked():
    with pytest.raises(ConfigError, match="clipping"):
        build_strategy({"clipping": "sometimes", "secure-aggregation": False}, [np.zeros(3, np.float32)], 2)
    with pytest.raises(ConfigError, match="adaptive clipping"):  # Flower's own check, named in our terms
        build_strategy({"clipping": "adaptive", "secure-aggregation": False, "server-noise-multiplier": 1.0,
                        "clipped-count-stddev": 0.1}, [np.zeros(3, np.float32)], 2)
