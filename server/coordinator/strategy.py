"""The coordinator's strategy: Flower's own pieces, wrapped, plus a thin outer layer for budgets and checkpoints.

    SiteBudgetStrategy(                                   <- ours: budget query/refusal, declines, epsilon ledger,
        ClientSideFixedClipping                              checkpoint per round, dropouts never veto a round
        | ClientSideAdaptiveClipping(                     <- Flower's client-side clipping + server-side noise
            FedAvg | FedMedian | FedTrimmedAvg, ...))        (every site weight 1; adaptive: two more fixes)

Clipping is always client-side (`clipping = "fixed"` or `"adaptive"` in the run config): a site clips its own
update before anything leaves it, so the coordinator never holds an unclipped update, and SecAgg+ (which only
shows the coordinator a sum) works with both. Flower's server-side clipping wrappers would need every raw update
at the coordinator; they are not offered.

Why Flower's *legacy* strategy API (`flwr.server.strategy`): in flwr 1.42 secure aggregation exists only as
`flwr.server.workflow.SecAggPlusWorkflow`, which drives a legacy `Strategy` through a `LegacyContext`; the
Message-API strategies (`flwr.serverapp.strategy`) have no SecAgg+ counterpart. One strategy stack then serves runs
with and without SecAgg+ (the latter use Flower's `DefaultWorkflow` fit workflow).

Every site weighs the same. The federation's noise has stddev z * C on the *sum* of the n clipped updates (z * C / n
on their unweighted mean), accounted with sensitivity C (one site's update added or removed) by the coordinator's
own accountant (budget.py, `shared.accounting`). Under SecAgg+ the noise is distributed: each site adds
z * C / sqrt(min_sites) before masking (client/federation.py) and the coordinator adds nothing, so it never sees an
un-noised sum; without SecAgg+ the coordinator checks every update's norm against C and adds the noise itself,
from `os.urandom` (`shared.dp_noise`). FedAvg's usual
weighting by example count would let a large site move the aggregate by up to C * (its examples / all examples),
more than the noise covers. So under DP (always, here) the aggregate is the plain mean of the clipped updates:
- in the clear, the DP wrappers below hand the aggregator every result with `num_examples = 1` (`unit_weighted`),
  whatever the site reported;
- under SecAgg+ the weighting happens at the sites, inside the masked sum: Flower's `secaggplus_mod` multiplies the
  site's parameters by `num_examples / max_weight` (quantised) before masking and adds that factor to the masked
  vector, and `SecAggPlusWorkflow` divides the unmasked sum by the sum of the factors. The sites' `clipping_mod`
  therefore reports `num_examples = 1` after clipping (0 for a declined round), app.py runs SecAgg+ with
  `max_weight = 1` (so the factor is exactly 1 and no precision is lost to scaling), and `SiteBudgetStrategy`
  drops a round in which a contributing site reported another weight (its masked vector carried that weight and
  cannot be taken out of the sum).
The true example counts still reach the coordinator, as each site's `n-examples` metric (round reports, metrics),
never as weights. The noise stddev actually used, and the n it was calibrated to, are in each wrapper's `history`
and in the round's DP record (`meta["dp"]` of the checkpoint).

Robust strategies (median, trimmed mean) need every site's update in the clear, so they cannot be combined with
secure aggregation; and one site can move a median (or a mean trimmed of few sites) by far more than the C / n the
noise is calibrated to, so `build_strategy` refuses them under DP (noise multiplier > 0). Each round's DP record
names the aggregator and this refusal. Adaptive clipping is refused under SecAgg+ (each site's clipped bit would
travel in the clear).
"""
from __future__ import annotations

import logging
import math
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
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Strategy,
)
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import KEY_NORM_BIT, compute_stdv

from megaportrait.shared.audit import WitnessStore
from megaportrait.shared.errors import ConfigError

from .auditing import CoordinatorAudit, adapter_sha256
from .budget import BudgetLedger

log = logging.getLogger("megaportrait.coordinator.strategy")

AGGREGATORS = ("fedavg", "fedmedian", "fedtrimmedavg")
CLIPPING_MODES = ("fixed", "adaptive")
UNIT_WEIGHT = 1
"""The aggregation weight of every site's clipped update (`num_examples` as the aggregator and SecAgg+ see it);
client/federation.py's `clipping_mod` sends the same."""


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


class ClientSideAdaptiveClipping(DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping (Andrew et al. 2021, arXiv:1905.03871), with two corrections to
    `DifferentialPrivacyClientSideAdaptiveClipping` as shipped in flwr 1.42:

    1. Direction. Flower's `adaptiveclipping_mod` sets the norm bit when the update *was clipped*, but the wrapper
       applies the paper's rule for the bit "update was *not* clipped": C <- C * exp(-lr * (clipped - target)). So
       when every update is clipped the norm shrinks further (and grows without bound when none is). Here, with
       f the noised fraction of clipped updates and `target_clipped_quantile` the fraction meant to be clipped:
       C <- C * exp(lr * (f - target)), the paper's rule for b = 1 - f and gamma = 1 - target.
    2. Noise. Flower adds the round's central noise with the norm already updated for the *next* round; the sites
       clipped to this round's norm, so the noise here uses that one (a shrinking norm would otherwise under-noise).

    Like `ClientSideFixedClipping`, it aggregates the unweighted mean of the clipped updates (`unit_weighted`) and
    calibrates the noise to the number of sites aggregated. `history` keeps, per aggregated round, the norm used,
    the noised clipped fraction, the next norm, the sites aggregated and the noise stddev added.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.history: list[dict[str, float]] = []

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if failures or not results:
            return None, {}
        used = self.clipping_norm
        aggregated, metrics, noise = noised_unweighted_mean(self, server_round, results, used)
        fraction = self._update_clip_norm(results)
        self.history.append({"round": server_round, "clipping_norm": used, "clipped_fraction": fraction,
                             "next_clipping_norm": self.clipping_norm, **noise})
        log.info("round %d: clipping norm %.4g -> %.4g (noised clipped fraction %.3f, target %.3f)", server_round,
                 used, self.clipping_norm, fraction, self.target_clipped_quantile)
        return aggregated, metrics

    def _update_clip_norm(self, results: list[tuple[ClientProxy, FitRes]]) -> float:  # type: ignore[override]
        clipped = 0
        for proxy, fit_res in results:
            if KEY_NORM_BIT not in fit_res.metrics:
                raise KeyError(f"site {fit_res.metrics.get('site-id', proxy.node_id)} sent no {KEY_NORM_BIT}: its "
                               "ClientApp does not run adaptiveclipping_mod")
            clipped += bool(fit_res.metrics[KEY_NORM_BIT])
        from megaportrait.shared.dp_noise import secure_standard_normal

        noise = float(secure_standard_normal(1)[0]) * self.clipped_count_stddev
        fraction = (clipped + noise) / len(results)
        self.clipping_norm *= math.exp(self.clip_norm_lr * (fraction - self.target_clipped_quantile))
        return fraction


class ClientSideFixedClipping(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping wrapper, aggregating the unweighted mean of the clipped updates
    (`unit_weighted`) and noising it with stddev z * C / n, n the number of sites actually aggregated (Flower's uses
    the aggregator's example weights and the number of sites it was told were sampled). `history` keeps, per
    aggregated round, the norm, the sites aggregated and the noise stddev added."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.history: list[dict[str, float]] = []

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if failures or not results:
            return None, {}
        aggregated, metrics, noise = noised_unweighted_mean(self, server_round, results, self.clipping_norm)
        self.history.append({"round": server_round, "clipping_norm": float(self.clipping_norm), **noise})
        return aggregated, metrics


DPWrapper = ClientSideFixedClipping | ClientSideAdaptiveClipping


def unit_weighted(results: list[tuple[ClientProxy, FitRes]]) -> list[tuple[ClientProxy, FitRes]]:
    """`results` with every site's `num_examples` set to `UNIT_WEIGHT` (copies; the site's own count stays in its
    `n-examples` metric), so a weighted aggregator computes the unweighted mean of the clipped updates."""
    return [(proxy, FitRes(status=res.status, parameters=res.parameters, num_examples=UNIT_WEIGHT,
                           metrics=res.metrics)) for proxy, res in results]


def update_norm(res: FitRes, sent: list[np.ndarray]) -> float:
    """L2 norm of a site's update: its returned arrays minus the arrays it was sent."""
    got = parameters_to_ndarrays(res.parameters)
    return float(math.sqrt(sum(float(np.sum((np.asarray(g, np.float64) - np.asarray(s, np.float64)) ** 2))
                               for g, s in zip(got, sent))))


def noised_unweighted_mean(wrapper: DifferentialPrivacyClientSideFixedClipping
                           | DifferentialPrivacyClientSideAdaptiveClipping, server_round: int,
                           results: list[tuple[ClientProxy, FitRes]], clipping_norm: float
                           ) -> tuple[Parameters | None, dict[str, Scalar], dict[str, Any]]:
    """The DP wrappers' aggregation: `wrapper.strategy` over the unit-weighted results, noised per `wrapper.dp_mode`.

    central (in the clear): every update's norm is checked against C (an update over it is left out, named in the
    record); then Gaussian noise of stddev z * C on the sum, i.e. z * C / n on the mean of n updates, from
    `os.urandom` (`shared.dp_noise`). distributed (SecAgg+): the sites added the noise before masking, each
    z * C / sqrt(min_sites); nothing is added here, and the multiplier the sum carries is z * sqrt(n / min_sites).
    Returns the parameters, the aggregator's metrics and the round's noise record."""
    from megaportrait.shared.accounting import distributed_noise_multiplier
    from megaportrait.shared.dp_noise import NOISE_SOURCE, add_secure_gaussian

    mode = getattr(wrapper, "dp_mode", "central")
    record: dict[str, Any] = {"dp_mode": mode, "noise_source": NOISE_SOURCE}
    sent = getattr(wrapper, "sent_arrays", None)
    if mode == "central" and sent is not None:
        over = {}
        for proxy, res in results:
            norm = update_norm(res, sent)
            if norm > clipping_norm * (1 + 1e-4) + 1e-6:
                over[str(res.metrics.get("site-id", proxy.node_id))] = norm
        if over:
            log.error("round %d: update(s) over the clipping norm %.4g left out: %s", server_round, clipping_norm,
                      over)
            record["over_norm"] = over
            results = [(p, r) for p, r in results if str(r.metrics.get("site-id", p.node_id)) not in over]
    n = len(results)
    record["sites_aggregated"] = n
    if n == 0:
        return None, {}, {**record, "noise_stddev": 0.0, "effective_noise_multiplier": 0.0}
    wrapper.num_sampled_clients = n
    aggregated, metrics = wrapper.strategy.aggregate_fit(server_round, unit_weighted(results), [])
    if mode == "distributed":
        min_sites = int(getattr(wrapper, "min_sites", n))
        z_eff = distributed_noise_multiplier(wrapper.noise_multiplier, n, min_sites)
        stddev = z_eff * clipping_norm / n
        record.update({"noise_stddev": stddev, "effective_noise_multiplier": z_eff, "noise_added_by": "sites",
                       "site_noise_stddev": wrapper.noise_multiplier * clipping_norm / math.sqrt(min_sites)})
        log.info("round %d: unweighted mean of %d noised clipped update(s) (distributed DP: noise on the sum has "
                 "multiplier %.3g)", server_round, n, z_eff)
        return aggregated, metrics, record
    stddev = compute_stdv(wrapper.noise_multiplier, clipping_norm, n)
    if aggregated is not None and stddev > 0:
        aggregated = ndarrays_to_parameters(add_secure_gaussian(parameters_to_ndarrays(aggregated), stddev))
        log.info("round %d: unweighted mean of %d clipped update(s), central noise stddev %.4g (= %g * %.4g / %d)",
                 server_round, n, stddev, wrapper.noise_multiplier, clipping_norm, n)
    accounted = float(getattr(wrapper, "accounted_noise_multiplier", wrapper.noise_multiplier))
    record.update({"noise_stddev": stddev, "effective_noise_multiplier": min(accounted, wrapper.noise_multiplier),
                   "noise_added_by": "coordinator"})
    return aggregated, metrics, record


def build_strategy(run_config: dict[str, Any], initial_arrays: list[np.ndarray], min_sites: int, *,
                   clipping_norm: float | None = None) -> DPWrapper:
    """Flower's aggregator named by `strategy`, wrapped in client-side clipping (`clipping`: fixed or adaptive)
    with server-side noise. `clipping_norm` overrides `clipping-norm` (a resumed adaptive run passes the norm its
    checkpoint holds)."""
    name = str(run_config.get("strategy", "fedavg")).lower()
    if name not in AGGREGATORS:
        raise ConfigError(f"strategy {name!r} is not one of {', '.join(AGGREGATORS)}")
    secure = bool(run_config.get("secure-aggregation", True))
    if name != "fedavg" and secure:
        raise ConfigError(f"strategy {name!r} needs each site's update in the clear; it cannot run with "
                          "secure-aggregation = true (use fedavg, or turn secure aggregation off)")
    noise = float(run_config.get("server-noise-multiplier", 1.0))
    if name != "fedavg" and noise > 0:
        raise ConfigError(f"strategy {name!r} under DP is refused: one site can move a median or a trimmed mean by "
                          "far more than the C / n the noise is calibrated to, so its noise would be too small "
                          "(use fedavg)")
    mode = str(run_config.get("clipping", "fixed")).lower()
    if mode not in CLIPPING_MODES:
        raise ConfigError(f"clipping {mode!r} is not one of {', '.join(CLIPPING_MODES)}")
    if mode == "adaptive" and secure:
        raise ConfigError("clipping = adaptive with secure-aggregation = true is refused: each site's clipped bit "
                          "would travel in the clear beside its masked update, outside the privacy accounting (use "
                          "clipping = fixed, or turn secure aggregation off)")
    common = dict(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=min_sites, min_evaluate_clients=0,
                  min_available_clients=min_sites, initial_parameters=ndarrays_to_parameters(initial_arrays),
                  fit_metrics_aggregation_fn=site_metrics_summary)
    if name == "fedavg":
        inner: Strategy = FedAvg(**common)
    elif name == "fedmedian":
        inner = FedMedian(**common)
    else:
        inner = FedTrimmedAvg(**common, beta=float(run_config.get("trim-beta", 0.2)))
    norm = float(run_config.get("clipping-norm", 1.0)) if clipping_norm is None else float(clipping_norm)
    if mode == "fixed":
        wrapper: DPWrapper = ClientSideFixedClipping(inner, noise_multiplier=noise, clipping_norm=norm,
                                                     num_sampled_clients=min_sites)
        return _with_dp_mode(wrapper, secure, min_sites, noise)
    stddev = str(run_config.get("clipped-count-stddev", "auto"))
    try:
        return _with_dp_mode(ClientSideAdaptiveClipping(
            inner, noise_multiplier=noise, num_sampled_clients=min_sites, initial_clipping_norm=norm,
            target_clipped_quantile=float(run_config.get("clipping-target-quantile", 0.5)),
            clip_norm_lr=float(run_config.get("clipping-norm-lr", 0.2)),
            clipped_count_stddev=None if stddev == "auto" else float(stddev)), secure, min_sites, noise)
    except ValueError as exc:
        raise ConfigError(f"adaptive clipping: {exc} (run config server-noise-multiplier, clipped-count-stddev, "
                          "clipping-norm, clipping-target-quantile, clipping-norm-lr)") from exc


def _with_dp_mode(wrapper: DPWrapper, secure_aggregation: bool, min_sites: int, noise: float) -> DPWrapper:
    """Distributed DP (noise at the sites, before masking) under SecAgg+; central DP (noise here) otherwise.
    `accounted_noise_multiplier` is the run config's z: with adaptive clipping Flower raises the update's own
    multiplier so that the update and the noised clipped count together have multiplier z, which is what is
    accounted."""
    wrapper.accounted_noise_multiplier = float(noise)  # type: ignore[union-attr]
    wrapper.dp_mode = "distributed" if secure_aggregation else "central"  # type: ignore[union-attr]
    wrapper.min_sites = int(min_sites)  # type: ignore[union-attr]
    wrapper.sent_arrays = None  # type: ignore[union-attr]
    return wrapper


def site_metrics_summary(metrics: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Round metrics: number of sites, examples (the sites' `n-examples`; the aggregation weights are all 1), and
    the largest site epsilon (never an average of epsilons)."""
    return {"sites": len(metrics), "n-examples": sum(int(m.get("n-examples", 0)) for _, m in metrics),
            "max-site-epsilon": max((float(m.get("epsilon", 0.0)) for _, m in metrics), default=0.0)}


class SiteBudgetStrategy(Strategy):
    """Outermost layer around Flower's strategy stack.

    Before each round it asks every sampled site (a GET_PROPERTIES message, answered by the site's accountant over
    the people whose consent holds now) for its site id, epsilon so far and epsilon after one more round; sites
    that decline (no consented person, no consent ledger) are left out, and so are the sites the `BudgetLedger`
    refuses; with fewer than `min_sites` left the round is skipped. After training, replies in which a site
    declined (consent revoked between the query and training) are left out of the aggregate; the central noise is
    calibrated to the sites whose updates are aggregated. Every aggregated site weighs 1 (module doc): in the clear
    the DP wrapper re-weights whatever a site reported; under SecAgg+ (`secure_aggregation`, where the weight went
    into the masked sum at the site) a round in which a contributing site reported a weight other than 1 is
    dropped. Each site's reported epsilon is recorded and `on_round` (the checkpoint) is called with the new
    arrays, the sites and the round's DP facts. Sites that dropped out mid-round are logged, not counted as
    failures, so the round completes with the others. `round_offset` numbers rounds across a resume.
    With `audit` (the coordinator's audit log, auditing.py) every budget refusal and every round's outcome is
    written there; `on_round` then returns the checkpoint file it wrote, whose hash goes into the round's entry.
    """

    def __init__(self, inner: DPWrapper, *, grid: Grid, ledger: BudgetLedger,
                 min_sites: int, round_offset: int = 0, fit_config: dict[str, Scalar] | None = None,
                 query_timeout: float = 60.0, secure_aggregation: bool = False,
                 on_round: Callable[[int, list[np.ndarray], list[str], dict[str, Any]], Any] | None = None,
                 audit: CoordinatorAudit | None = None, witness: WitnessStore | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.secure_aggregation = secure_aggregation
        self.grid = grid
        self.ledger = ledger
        self.min_sites = min_sites
        self.round_offset = round_offset
        self.fit_config = dict(fit_config or {})
        self.fit_config.setdefault("clipping", "adaptive" if isinstance(inner, ClientSideAdaptiveClipping)
                                   else "fixed")
        self.fit_config.update({"dp-mode": getattr(inner, "dp_mode", "central"),
                                "federation-noise-multiplier": float(getattr(inner, "accounted_noise_multiplier",
                                                                             inner.noise_multiplier)),
                                "min-sites": int(min_sites)})
        self.query_timeout = query_timeout
        self.on_round = on_round
        self.audit = audit
        self.witness = witness
        self.node_sites: dict[int, str] = {}
        self.rounds: dict[int, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"SiteBudgetStrategy({self.inner!r}, budget={self.ledger.budget})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def query_sites(self, node_ids: list[int], server_round: int) -> dict[int, dict[str, Scalar]]:
        """node id -> the site's budget answer; sites that do not answer in time are missing."""
        config = {"local-steps": self.fit_config.get("local-steps", 0), "server-round": server_round,
                  "federation-noise-multiplier": self.fit_config["federation-noise-multiplier"]}
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
        self.inner.sent_arrays = parameters_to_ndarrays(parameters)  # for the central-DP norm check
        sampled = self.inner.configure_fit(absolute, parameters, client_manager)
        answers = self.query_sites([proxy.node_id for proxy, _ in sampled], absolute)
        admitted: list[tuple[ClientProxy, FitIns]] = []
        report: dict[str, Any] = {"sampled": len(sampled), "admitted": [], "refused": [], "declined": {},
                                  "silent": []}
        for proxy, fit_ins in sampled:
            answer = answers.get(proxy.node_id)
            if answer is None:
                report["silent"].append(proxy.node_id)
                continue
            site = str(answer["site-id"])
            self.node_sites[proxy.node_id] = site
            if self.witness is not None:
                self.witness.keep_text(str(answer.get("audit-checkpoint", "")))
            self.ledger.observe(site, float(answer["epsilon"]))
            if int(answer.get("declined", 0)):
                report["declined"][site] = str(answer.get("decline-reason", ""))
                log.info("round %d: site %s declines (%s)", absolute, site, report["declined"][site])
                continue
            if not self.ledger.admits(site, float(answer["epsilon-next"]), absolute):
                report["refused"].append(site)
                refusal = self.ledger.sites[site].refused[-1]
                report.setdefault("refused_epsilon", {})[site] = refusal["epsilon_next"]
                if self.audit is not None:
                    self.audit.budget_refused(site, absolute, refusal["epsilon_next"], refusal["budget"])
                continue
            fit_ins.config.update(self.fit_config)
            fit_ins.config.update({"server-round": absolute, "epsilon-budget": self.ledger.budget})
            if self.audit is not None:  # the site keeps it: a witness of the coordinator's log
                fit_ins.config["audit-checkpoint"] = self.audit.log.current_checkpoint().to_text()
            admitted.append((proxy, fit_ins))
            report["admitted"].append(site)
        self.rounds[absolute] = report
        if len(admitted) < self.min_sites:
            log.warning("round %d skipped: %d site(s) within budget and answering, %d needed (refused: %s, "
                        "declined: %s, silent: %d)", absolute, len(admitted), self.min_sites, report["refused"],
                        sorted(report["declined"]), len(report["silent"]))
            self._audit_round(absolute, reason="too_few_sites")
            return []
        # The central noise is calibrated to the number of sites asked to train (and again to those aggregated).
        self.inner.num_sampled_clients = len(admitted)
        log.info("round %d: %d site(s) admitted %s, refused %s, declined %s", absolute, len(admitted),
                 report["admitted"], report["refused"], sorted(report["declined"]))
        return admitted

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        absolute = server_round + self.round_offset
        report = self.rounds.setdefault(absolute, {})
        report["trained"], report["examples"], report["declined_at_training"] = [], {}, {}
        contributing = []
        for proxy, fit_res in results:
            site = str(fit_res.metrics.get("site-id", self.node_sites.get(proxy.node_id, proxy.node_id)))
            if self.witness is not None:  # the coordinator witnesses each site's log
                self.witness.keep_text(str(fit_res.metrics.get("audit-checkpoint", "")))
            self.ledger.observe(site, float(fit_res.metrics.get("epsilon", 0.0)))
            if int(fit_res.metrics.get("declined", 0)):
                report["declined_at_training"][site] = str(fit_res.metrics.get("decline-reason", ""))
                continue
            self.ledger.record_round(site, float(fit_res.metrics.get("epsilon", 0.0)), absolute)
            report["trained"].append(site)
            report["examples"][site] = int(fit_res.metrics.get("n-examples", fit_res.num_examples))
            if fit_res.num_examples != UNIT_WEIGHT:
                report.setdefault("non_unit_weights", {})[site] = int(fit_res.num_examples)
            contributing.append((proxy, fit_res))
        report["failures"] = len(failures)
        if failures:
            log.warning("round %d: %d site(s) failed or dropped out; aggregating the %d that answered", absolute,
                        len(failures), len(contributing))
        if report["declined_at_training"]:
            log.warning("round %d: site(s) %s declined at training; left out of the aggregate", absolute,
                        sorted(report["declined_at_training"]))
        if len(contributing) < self.min_sites:
            log.warning("round %d: only %d result(s), %d needed; global adapter unchanged", absolute,
                        len(contributing), self.min_sites)
            self._audit_round(absolute, reason="too_few_results")
            return None, {}
        odd = report.get("non_unit_weights")
        if odd and self.secure_aggregation:
            # The weight went into the site's masked vector: the secure sum is a weighted mean, not the unweighted
            # one the noise is calibrated to, and one site's share cannot be taken out of it.
            log.error("round %d dropped: site(s) %s sent weight(s) %s instead of %d under SecAgg+ (a site not "
                      "running this version's clipping_mod?); the secure sum is not the unweighted mean the central "
                      "noise covers; global adapter unchanged", absolute, sorted(odd), odd, UNIT_WEIGHT)
            report["dropped"] = "non_unit_weights"
            self._audit_round(absolute, reason="non_unit_weights")
            return None, {}
        if odd:
            log.warning("round %d: site(s) %s sent weight(s) %s; every site is aggregated with weight %d", absolute,
                        sorted(odd), odd, UNIT_WEIGHT)
        parameters, metrics = self.inner.aggregate_fit(absolute, contributing, [])
        dp: dict[str, Any] = {"clipping": self.fit_config["clipping"],
                              "noise_multiplier": float(self.inner.noise_multiplier), "weighting": "unweighted",
                              "aggregator": type(self.inner.strategy).__name__,
                              "robust_aggregators": "refused under DP (sensitivity above C / n)",
                              "sensitivity": "C on the sum (one site's clipped update added or removed)"}
        last = self.inner.history[-1]  # what this round's aggregation recorded: norm, sites, noise stddev
        dp.update({k: v for k, v in last.items() if k != "round"})
        aggregated_sites = [s for s in report["trained"] if s not in dp.get("over_norm", {})]
        for site in aggregated_sites:
            self.ledger.record_federation(site, float(dp.get("effective_noise_multiplier", 0.0)), absolute)
        dp["site_epsilon"] = {site: self.ledger.site_epsilon(site) for site in aggregated_sites}
        report["dp"] = dp
        if parameters is None:
            self._audit_round(absolute, reason="no_aggregate")
            return parameters, metrics
        arrays = parameters_to_ndarrays(parameters)
        written = None
        if self.on_round is not None:
            written = self.on_round(absolute, arrays, sorted(report["trained"]), dp)
        if self.audit is not None:
            self.audit.round_outcome(absolute, self._audit_report(report), adapter=adapter_sha256(arrays),
                                     checkpoint_file=written)
        return parameters, metrics

    def _audit_report(self, report: dict[str, Any]) -> dict[str, Any]:
        """The round report as audited: site ids, counts and the DP record (no Flower node ids, no example
        counts)."""
        out = {k: v for k, v in report.items() if k not in ("silent", "examples", "refused_epsilon", "trained")}
        out["silent"] = len(report.get("silent", []))
        out["refused"] = {site: {"epsilon_next": eps, "budget": self.ledger.budget}
                          for site, eps in report.get("refused_epsilon", {}).items()}
        out["aggregated"] = sorted(report.get("trained", []))
        out["admitted"] = sorted(report.get("admitted", []))
        return out

    def _audit_round(self, absolute: int, *, reason: str) -> None:
        if self.audit is not None:
            self.audit.round_outcome(absolute, self._audit_report(self.rounds.get(absolute, {})), reason=reason)

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                           ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []  # sites hold no evaluation data: the global adapter is judged by the personalised results

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None
