"""Under DP every site weighs the same: the aggregate is the plain mean of the sites' clipped updates (plus noise of
stddev z * C / n for the n sites aggregated), whatever each site's number of examples, in the clear and under
SecAgg+ (where the weighting happens at the sites, inside the masked sum).

The first tests drive the coordinator's strategy directly; the last ones run whole rounds through Flower's own
workflows (`DefaultWorkflow`, `SecAggPlusWorkflow`) and the sites' real mod stack (`secaggplus_mod` around our
`clipping_mod`) over an in-process grid, with stub sites whose "training" adds a known update.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from megaportrait.server.coordinator.budget import BudgetLedger
from megaportrait.server.coordinator.strategy import SiteBudgetStrategy, build_strategy

GLOBAL = [np.array([0.5, -0.25, 0.1, 0.0], np.float32), np.full((2, 3), 0.2, np.float32)]
# Site "big" (900 crops) moves the adapter by norm 3 (clipped to 1); site "small" (3 crops) by norm 0.5 (kept).
UPDATES = {"big": [np.array([3.0, 0.0, 0.0, 0.0], np.float32), np.zeros((2, 3), np.float32)],
           "small": [np.array([0.0, 0.3, 0.0, 0.4], np.float32), np.zeros((2, 3), np.float32)]}
EXAMPLES = {"big": 900, "small": 3}
CLIPPED = {"big": [np.array([1.0, 0.0, 0.0, 0.0], np.float32), np.zeros((2, 3), np.float32)],
           "small": UPDATES["small"]}
PLAIN_MEAN = [g + (a + b) / 2 for g, a, b in zip(GLOBAL, CLIPPED["big"], CLIPPED["small"])]
EXAMPLE_WEIGHTED = [g + (900 * a + 3 * b) / 903 for g, a, b in zip(GLOBAL, CLIPPED["big"], CLIPPED["small"])]


class _Proxy:
    def __init__(self, node_id: int) -> None:
        self.node_id, self.cid = node_id, str(node_id)


def _fit_res(arrays, weight, **metrics) -> FitRes:
    return FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(arrays), num_examples=weight,
                  metrics=dict(metrics))


def _site_results(weights: dict[str, int]) -> list:
    """The two sites' clipped replies, as the coordinator gets them in the clear, sent with `weights`."""
    return [(_Proxy(i), _fit_res([g + u for g, u in zip(GLOBAL, CLIPPED[site])], weights[site],
                                 **{"site-id": site, "epsilon": 1.0, "n-examples": EXAMPLES[site], "declined": 0}))
            for i, site in enumerate(("big", "small"), start=1)]


def _strategy(tmp_path, *, noise: float = 0.0, mode: str = "fixed", norm: float = 1.0, min_sites: int = 2,
              arrays=GLOBAL, secure_aggregation: bool = False, grid: Any = None, **kw) -> SiteBudgetStrategy:
    config = {"secure-aggregation": secure_aggregation, "server-noise-multiplier": noise, "clipping": mode,
              "clipping-norm": norm, "clipped-count-stddev": 1.0 if mode == "adaptive" else "auto"}
    inner = build_strategy(config, arrays, min_sites)
    return SiteBudgetStrategy(inner, grid=grid, ledger=BudgetLedger(tmp_path / "budget.json", 10.0),
                              min_sites=min_sites, secure_aggregation=secure_aggregation, **kw)


def _assert_arrays_close(got, want, atol):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=atol)


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_the_aggregate_is_the_plain_mean_of_the_clipped_updates_whatever_the_example_counts(tmp_path, mode):
    rounds = []
    strategy = _strategy(tmp_path, mode=mode, on_round=lambda *a: rounds.append(a))
    # Sites that still report their example counts as weights (an older client): re-weighted in the clear.
    results = _site_results(EXAMPLES)
    results[0][1].metrics["norm_bit"] = True  # for adaptive clipping: big was clipped, small was not
    results[1][1].metrics["norm_bit"] = False
    parameters, metrics = strategy.aggregate_fit(1, results, [])
    _assert_arrays_close(parameters_to_ndarrays(parameters), PLAIN_MEAN, atol=1e-6)
    # ... which is not what the aggregator (Flower's FedAvg, weighting by num_examples) makes of the same replies:
    flower, _ = strategy.inner.strategy.aggregate_fit(1, results, [])
    _assert_arrays_close(parameters_to_ndarrays(flower), EXAMPLE_WEIGHTED, atol=1e-6)
    assert np.abs(parameters_to_ndarrays(flower)[0] - PLAIN_MEAN[0]).max() > 0.4
    # The true counts are reported, not used as weights; the DP record says what was done.
    report = strategy.rounds[1]
    assert report["examples"] == EXAMPLES and report["non_unit_weights"] == EXAMPLES
    assert metrics["n-examples"] == 903 and metrics["sites"] == 2
    dp = rounds[0][3]
    assert dp["weighting"] == "unweighted" and dp["sites_aggregated"] == 2 and dp["noise_stddev"] == 0.0
    assert dp["clipping_norm"] == pytest.approx(1.0)


def test_recorded_noise_stddev_is_z_times_norm_over_the_sites_actually_aggregated(tmp_path):
    size = 200_000
    zero = [np.zeros(size, np.float32)]
    rounds = []
    strategy = _strategy(tmp_path, noise=1.0, norm=0.5, arrays=zero, on_round=lambda *a: rounds.append(a))
    # Three sites sampled and admitted; one declines at training, so two are aggregated: n = 2, not 3.
    strategy.inner.num_sampled_clients = 3
    results = [(_Proxy(1), _fit_res(zero, 1, **{"site-id": "a", "epsilon": 1.0, "n-examples": 500})),
               (_Proxy(2), _fit_res(zero, 1, **{"site-id": "b", "epsilon": 1.0, "n-examples": 2})),
               (_Proxy(3), _fit_res(zero, 0, **{"site-id": "c", "epsilon": 0.0, "n-examples": 0, "declined": 1,
                                                 "decline-reason": "no_consented_person"}))]
    parameters, _ = strategy.aggregate_fit(1, results, [])
    dp = rounds[0][3]
    assert dp["sites_aggregated"] == 2 and dp["noise_stddev"] == pytest.approx(1.0 * 0.5 / 2)
    assert strategy.inner.history[-1]["noise_stddev"] == dp["noise_stddev"]
    assert float(parameters_to_ndarrays(parameters)[0].std()) == pytest.approx(dp["noise_stddev"], rel=0.02)
    assert "non_unit_weights" not in strategy.rounds[1]


# --- whole rounds through Flower's workflows and the sites' mods -------------------------------------------------


class LoopbackGrid:
    """A Flower `Grid` that hands each message straight to the destination node's ClientApp, in this process."""

    def __init__(self, nodes: dict[int, tuple[Any, Any]]) -> None:
        from flwr.supercore.run import Run

        self.nodes = nodes  # node id -> (ClientApp, the node's Context, kept across messages as a SuperNode does)
        self._run = Run.create_empty(run_id=7)

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
        replies = []
        for msg in messages:
            app, context = self.nodes[msg.metadata.dst_node_id]
            replies.append(app(copy.deepcopy(msg), context))  # each node gets its own copy, as over the wire
        return replies


def _stub_site_app(site: str, *, flowers_clipping_only: bool = False, updates: dict | None = None) -> Any:
    """A ClientApp whose "training" adds the site's known update; its mods are the real ones (client/federation.py's
    SecAgg+ and clipping mods), or, for an older site, Flower's `fixedclipping_mod` alone (weights by example count)."""
    from flwr.client import NumPyClient
    from flwr.client.mod import fixedclipping_mod
    from flwr.clientapp import ClientApp

    from megaportrait.client import federation

    class StubSite(NumPyClient):
        def get_properties(self, config):
            return {"site-id": site, "epsilon": 0.0, "epsilon-next": 1.0, "n-examples": EXAMPLES.get(site, 10),
                    "declined": 0, "decline-reason": ""}

        def fit(self, parameters, config):
            metrics = {"site-id": site, "epsilon": 1.0, "n-examples": EXAMPLES.get(site, 10), "declined": 0,
                       "decline-reason": ""}
            return [p + u for p, u in zip(parameters, (updates or UPDATES)[site])], EXAMPLES.get(site, 10), metrics

    clipping = fixedclipping_mod if flowers_clipping_only else federation.clipping_mod
    return ClientApp(client_fn=lambda context: StubSite().to_client(),
                     mods=[federation.optional_secaggplus_mod, clipping])


@pytest.fixture()
def task_identity(monkeypatch):
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_task_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _run_round(tmp_path, *, secure_aggregation: bool, old_site: str | None = None, noise: float = 1e-6,
               sites: tuple[str, ...] = ("big", "small"), updates: dict | None = None, arrays=GLOBAL,
               min_sites: int = 2):
    """One federated round of the stub sites through app.py's workflow; returns (strategy, checkpoints). The
    default noise multiplier is tiny (distributed DP refuses none) so that the mean can be checked."""
    from flwr.app import Context, RecordDict
    from flwr.server import LegacyContext, ServerConfig

    from megaportrait.server.coordinator.app import build_workflow

    nodes = {}
    for node_id, site in enumerate(sites, start=101):
        nodes[node_id] = (_stub_site_app(site, flowers_clipping_only=site == old_site, updates=updates),
                          Context(run_id=7, node_id=node_id, node_config={}, state=RecordDict(), run_config={}))
    grid = LoopbackGrid(nodes)
    rounds = []
    strategy = _strategy(tmp_path, grid=grid, secure_aggregation=secure_aggregation, noise=noise, arrays=arrays,
                         min_sites=min_sites, on_round=lambda *a: rounds.append(a))
    server = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(context=server, config=ServerConfig(num_rounds=1), strategy=strategy)
    build_workflow({"secure-aggregation": secure_aggregation, "min-sites": min_sites, "round-timeout": 30.0})(grid,
                                                                                                         legacy)
    return strategy, rounds


@pytest.mark.parametrize("secure_aggregation", [False, True], ids=["clear", "secagg+"])
def test_a_whole_round_aggregates_the_plain_mean(tmp_path, task_identity, secure_aggregation):
    strategy, rounds = _run_round(tmp_path, secure_aggregation=secure_aggregation)
    assert len(rounds) == 1
    _, arrays, sites, dp = rounds[0]
    assert sites == ["big", "small"] and dp["sites_aggregated"] == 2 and dp["weighting"] == "unweighted"
    # SecAgg+ quantises each site's parameters to 2**22 levels over [-8, 8]: a few 1e-6 of error per element.
    _assert_arrays_close(arrays, PLAIN_MEAN, atol=2e-5 if secure_aggregation else 1e-5)
    report = strategy.rounds[1]
    assert report["examples"] == EXAMPLES and "non_unit_weights" not in report  # the sites sent weight 1


def test_under_secagg_a_site_weighting_its_masked_update_by_example_count_voids_the_round(tmp_path, task_identity):
    """An older site (Flower's clipping mod, weight = its example count) masks a weighted update into the secure
    sum: that sum is not the unweighted mean the noise covers, so the round is dropped. In the clear the
    coordinator re-weights it instead."""
    strategy, rounds = _run_round(tmp_path, secure_aggregation=True, old_site="big")
    assert rounds == [] and strategy.rounds[1]["dropped"] == "non_unit_weights"
    assert strategy.rounds[1]["non_unit_weights"] == {"big": EXAMPLES["big"]}

    (tmp_path / "clear").mkdir()
    strategy, rounds = _run_round(tmp_path / "clear", secure_aggregation=False, old_site="big")
    _assert_arrays_close(rounds[0][1], PLAIN_MEAN, atol=1e-5)


# --- distributed DP under SecAgg+: the coordinator's unmasked view carries the full noise --------------------------

BIG = 100_000


@pytest.mark.parametrize("sites", [("big", "small"), ("big", "small", "third")], ids=["2-sites", "3-sites"])
def test_under_secagg_the_unmasked_sum_the_coordinator_sees_carries_the_full_noise(tmp_path, task_identity, sites):
    """Each site adds z * C / sqrt(min_sites) before masking; the coordinator adds nothing, so what it unmasks (the
    checkpointed mean) carries noise of stddev z * C * sqrt(n / min_sites) / n, never less than z * C / n."""
    zero = [np.zeros(BIG, np.float32)]
    step = np.zeros(BIG, np.float32)
    step[0] = 0.5  # a known clipped update (norm 0.5 < C = 1), the same at every site
    updates = {s: [step] for s in sites}
    z, n, n_min = 0.8, len(sites), 2
    strategy, rounds = _run_round(tmp_path, secure_aggregation=True, noise=z, sites=sites, updates=updates,
                                  arrays=zero, min_sites=n_min)
    _, arrays, _, dp = rounds[0]
    noise = arrays[0][1:]  # element 0 carries the update; the rest is noise alone
    expected = z * 1.0 * np.sqrt(n / n_min) / n
    assert float(noise.std()) == pytest.approx(expected, rel=0.03)
    assert float(noise.std()) >= 0.97 * z * 1.0 / n  # the full noise of the sum: stddev >= z * C
    assert abs(float(noise.mean())) < 5 * expected / np.sqrt(noise.size)
    assert dp["dp_mode"] == "distributed" and dp["noise_added_by"] == "sites"
    assert dp["effective_noise_multiplier"] == pytest.approx(z * np.sqrt(n / n_min))
    assert dp["noise_stddev"] == pytest.approx(expected)
    # The coordinator's own accountant recorded the round for every site at the multiplier the sum carried.
    for site in sites:
        assert strategy.ledger.sites[site].federation[0][0] == pytest.approx(z * np.sqrt(n / n_min))
        assert dp["site_epsilon"][site] == pytest.approx(strategy.ledger.site_epsilon(site))
        assert 0 < dp["site_epsilon"][site] < float("inf")


def test_with_the_sites_noise_switched_off_the_coordinator_would_see_the_exact_mean(tmp_path, task_identity,
                                                                                   monkeypatch):
    """The check above can fail: if the sites skip their share, the unmasked view has (almost) no noise."""
    from megaportrait.client import federation

    monkeypatch.setattr(federation, "add_distributed_noise", lambda arrays, config: arrays)
    zero = [np.zeros(BIG, np.float32)]
    step = np.zeros(BIG, np.float32)
    step[0] = 0.5
    _, rounds = _run_round(tmp_path, secure_aggregation=True, noise=0.8, arrays=zero,
                           updates={"big": [step], "small": [step]})
    assert float(rounds[0][1][0][1:].std()) < 1e-4


def test_central_dp_checks_every_update_norm_and_noises_the_sum_from_the_os_csprng(tmp_path, monkeypatch):
    from megaportrait.shared import dp_noise

    draws = []
    real = dp_noise.secure_standard_normal
    monkeypatch.setattr(dp_noise, "secure_standard_normal", lambda size: draws.append(size) or real(size))
    rounds = []
    strategy = _strategy(tmp_path, noise=0.5, on_round=lambda *a: rounds.append(a))
    strategy.inner.sent_arrays = GLOBAL
    results = _site_results({"big": 1, "small": 1})
    # A third site sends an update of norm 3 (it did not clip): left out, named in the DP record.
    results.append((_Proxy(3), _fit_res([g + u for g, u in zip(GLOBAL, UPDATES["big"])], 1,
                                        **{"site-id": "rogue", "epsilon": 1.0, "n-examples": 1, "declined": 0})))
    strategy.aggregate_fit(1, results, [])
    dp = rounds[0][3]
    assert dp["over_norm"] == {"rogue": pytest.approx(3.0)} and dp["sites_aggregated"] == 2
    assert dp["dp_mode"] == "central" and dp["noise_added_by"] == "coordinator"
    assert dp["noise_stddev"] == pytest.approx(0.5 * 1.0 / 2) and draws  # drawn from os.urandom
    assert "rogue" not in dp["site_epsilon"]


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg"])
def test_robust_aggregators_are_refused_under_dp(name):
    from megaportrait.shared.errors import ConfigError

    with pytest.raises(ConfigError, match="refused"):
        build_strategy({"strategy": name, "secure-aggregation": False, "server-noise-multiplier": 1.0}, GLOBAL, 2)
    build_strategy({"strategy": name, "secure-aggregation": False, "server-noise-multiplier": 0.0}, GLOBAL, 2)


def test_adaptive_clipping_is_refused_under_secagg():
    from megaportrait.shared.errors import ConfigError

    with pytest.raises(ConfigError, match="clipped bit"):
        build_strategy({"clipping": "adaptive", "secure-aggregation": True}, GLOBAL, 2)
