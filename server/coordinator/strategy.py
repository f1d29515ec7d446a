"""The coordinator's strategy: Flower's own pieces, wrapped, plus a thin outer layer for budgets and checkpoints.

    SiteBudgetStrategy(                                   <- ours: budget query/refusal, epsilon ledger,
        DifferentialPrivacyClientSideFixedClipping(          checkpoint per round, dropouts never veto a round
            FedAvg | FedMedian | FedTrimmedAvg, ...))     <- Flower's: client-side clipping + server-side noise

Why Flower's *legacy* strategy API (`flwr.server.strategy`): in flwr 1.42 secure aggregation exists only as
`flwr.server.workflow.SecAggPlusWorkflow`, which drives a legacy `Strategy` through a `LegacyContext`; the
Message-API strategies (`flwr.serverapp.strategy`) have no SecAgg+ counterpart. One strategy stack then serves runs
with and without SecAgg+ (the latter use Flower's `DefaultWorkflow` fit workflow).

Robust strategies (median, trimmed mean) need every site's update in the clear, so they cannot be combined with
secure aggregation; `build_strategy` refuses that combination.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetPropertiesIns,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import MessageTypeLegacy
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Strategy,
)
from flwr.serverapp import Grid

from megaportrait.shared.errors import ConfigError

from .budget import BudgetLedger

log = logging.getLogger("megaportrait.coordinator.strategy")

AGGREGATORS = ("fedavg", "fedmedian", "fedtrimmedavg")


class BoundedGrid(Grid):
    """A Grid whose `send_and_receive` waits at most `timeout` seconds unless told otherwise, so a site that
    dies mid-round costs the round `timeout` seconds and its contribution, never the whole run."""

    def __init__(self, grid: Grid, timeout: float) -> None:
        self._grid = grid
        self.timeout = float(timeout)

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=self.timeout if timeout is None else timeout)


def build_strategy(run_config: dict[str, Any], initial_arrays: list[np.ndarray], min_sites: int
                   ) -> DifferentialPrivacyClientSideFixedClipping:
    """Flower's aggregator named by `strategy`, wrapped in client-side fixed clipping with server-side noise."""
    name = str(run_config.get("strategy", "fedavg")).lower()
    if name not in AGGREGATORS:
        raise ConfigError(f"strategy {name!r} is not one of {', '.join(AGGREGATORS)}")
    if name != "fedavg" and bool(run_config.get("secure-aggregation", True)):
        raise ConfigError(f"strategy {name!r} needs each site's update in the clear; it cannot run with "
                          "secure-aggregation = true (use fedavg, or turn secure aggregation off)")
    common = dict(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=min_sites, min_evaluate_clients=0,
                  min_available_clients=min_sites, initial_parameters=ndarrays_to_parameters(initial_arrays),
                  fit_metrics_aggregation_fn=site_metrics_summary)
    if name == "fedavg":
        inner: Strategy = FedAvg(**common)
    elif name == "fedmedian":
        inner = FedMedian(**common)
    else:
        inner = FedTrimmedAvg(**common, beta=float(run_config.get("trim-beta", 0.2)))
    return DifferentialPrivacyClientSideFixedClipping(
        inner, noise_multiplier=float(run_config.get("server-noise-multiplier", 0.1)),
        clipping_norm=float(run_config.get("clipping-norm", 1.0)), num_sampled_clients=min_sites)


def site_metrics_summary(metrics: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Round metrics: number of sites, examples, and the largest site epsilon (never an average of epsilons)."""
    return {"sites": len(metrics), "n-examples": sum(n for n, _ in metrics),
            "max-site-epsilon": max((float(m.get("epsilon", 0.0)) for _, m in metrics), default=0.0)}


class SiteBudgetStrategy(Strategy):
    """Outermost layer around Flower's strategy stack.

    Before each round it asks every sampled site (a GET_PROPERTIES message, answered by the site's accountant) for
    its site id, epsilon so far and epsilon after one more round, and drops the sites the `BudgetLedger` refuses;
    with fewer than `min_sites` left the round is skipped. After aggregation it records each site's reported
    epsilon and calls `on_round` (the checkpoint). Sites that dropped out mid-round are logged, not counted as
    failures, so the round completes with the others. `round_offset` numbers rounds across a resume.
    """

    def __init__(self, inner: DifferentialPrivacyClientSideFixedClipping, *, grid: Grid, ledger: BudgetLedger,
                 min_sites: int, round_offset: int = 0, fit_config: dict[str, Scalar] | None = None,
                 query_timeout: float = 60.0,
                 on_round: Callable[[int, list[np.ndarray], list[str]], None] | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.grid = grid
        self.ledger = ledger
        self.min_sites = min_sites
        self.round_offset = round_offset
        self.fit_config = dict(fit_config or {})
        self.query_timeout = query_timeout
        self.on_round = on_round
        self.node_sites: dict[int, str] = {}
        self.rounds: dict[int, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"SiteBudgetStrategy({self.inner!r}, budget={self.ledger.budget})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def query_sites(self, node_ids: list[int], server_round: int) -> dict[int, dict[str, Scalar]]:
        """node id -> the site's budget answer; sites that do not answer in time are missing."""
        config = {"local-steps": self.fit_config.get("local-steps", 0), "server-round": server_round}
        content = compat.getpropertiesins_to_recorddict(GetPropertiesIns(config=config))
        messages = [Message(content=content, dst_node_id=nid, message_type=MessageTypeLegacy.GET_PROPERTIES,
                            group_id=f"budget-{server_round}") for nid in node_ids]
        answers: dict[int, dict[str, Scalar]] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.query_timeout):
            if reply.has_error():
                log.warning("budget query: node %s answered with an error: %s", reply.metadata.src_node_id,
                            reply.error.reason)
                continue
            answers[reply.metadata.src_node_id] = compat.recorddict_to_getpropertiesres(reply.content).properties
        return answers

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        absolute = server_round + self.round_offset
        sampled = self.inner.configure_fit(absolute, parameters, client_manager)
        answers = self.query_sites([proxy.node_id for proxy, _ in sampled], absolute)
        admitted: list[tuple[ClientProxy, FitIns]] = []
        report: dict[str, Any] = {"sampled": len(sampled), "admitted": [], "refused": [], "silent": []}
        for proxy, fit_ins in sampled:
            answer = answers.get(proxy.node_id)
            if answer is None:
                report["silent"].append(proxy.node_id)
                continue
            site = str(answer["site-id"])
            self.node_sites[proxy.node_id] = site
            self.ledger.observe(site, float(answer["epsilon"]))
            if not self.ledger.admits(site, float(answer["epsilon-next"]), absolute):
                report["refused"].append(site)
                continue
            fit_ins.config.update(self.fit_config)
            fit_ins.config.update({"server-round": absolute, "epsilon-budget": self.ledger.budget})
            admitted.append((proxy, fit_ins))
            report["admitted"].append(site)
        self.rounds[absolute] = report
        if len(admitted) < self.min_sites:
            log.warning("round %d skipped: %d site(s) within budget and answering, %d needed (refused: %s, silent: %d)",
                        absolute, len(admitted), self.min_sites, report["refused"], len(report["silent"]))
            return []
        # The central noise is calibrated to the number of sites actually asked to train this round.
        self.inner.num_sampled_clients = len(admitted)
        log.info("round %d: %d site(s) admitted %s, refused %s", absolute, len(admitted), report["admitted"],
                 report["refused"])
        return admitted

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        absolute = server_round + self.round_offset
        report = self.rounds.setdefault(absolute, {})
        report["trained"] = []
        for proxy, fit_res in results:
            site = str(fit_res.metrics.get("site-id", self.node_sites.get(proxy.node_id, proxy.node_id)))
            self.ledger.record_round(site, float(fit_res.metrics.get("epsilon", 0.0)), absolute)
            report["trained"].append(site)
        report["failures"] = len(failures)
        if failures:
            log.warning("round %d: %d site(s) failed or dropped out; aggregating the %d that answered", absolute,
                        len(failures), len(results))
        if len(results) < self.min_sites:
            log.warning("round %d: only %d result(s), %d needed; global adapter unchanged", absolute, len(results),
                        self.min_sites)
            return None, {}
        parameters, metrics = self.inner.aggregate_fit(absolute, results, [])
        if parameters is not None and self.on_round is not None:
            self.on_round(absolute, parameters_to_ndarrays(parameters), sorted(report["trained"]))
        return parameters, metrics

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                           ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []  # sites hold no evaluation data: the global adapter is judged by the personalised results

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None
