"""Flower ServerApp: the coordinator of federated rounds of the global Identity Net adapter.

`main(grid, context)` reads the run config ([tool.flwr.app.config] in pyproject.toml, overridable with
`flwr run --run-config`), builds the round-0 adapter (or resumes from the latest checkpoint in `state-dir`),
and runs the remaining rounds with Flower's `DefaultWorkflow`: its fit step is `SecAggPlusWorkflow` when
`secure-aggregation` is on (the coordinator then only ever sees the sum of the sites' masked updates), Flower's
default fit workflow otherwise. The strategy stack is in strategy.py, the budget ledger in budget.py and the
checkpoints in checkpoint.py.

Run config keys read here: num-server-rounds, min-sites, local-steps, strategy, clipping (fixed | adaptive),
clipping-norm (the fixed norm, or the adaptive one's starting value), clipping-target-quantile, clipping-norm-lr,
clipped-count-stddev, server-noise-multiplier, secure-aggregation, secagg-num-shares,
secagg-reconstruction-threshold, secagg-clipping-range, round-timeout, privacy-policy, state-dir, resume,
seed (plus the site training keys that client/federation.py reads).

Budgets are not run config: they are in the privacy policy (`privacy-policy`, default policies/privacy.yaml). Before
anything runs, the coordinator's own accountant (Opacus, `shared.accounting`) computes the per-site epsilon the
run's `server-noise-multiplier` and `num-server-rounds` plan, and a run config that would cross the policy's
per-site (or per-person) budget is refused. The budget query refuses sites whose per-photo epsilon would cross
the policy's per-photo budget. `epsilon-budget-per-site` is refused by name (it moved to the policy).
Under SecAgg+ the noise is distributed (each site adds its share before masking, client/federation.py); without
it the coordinator adds it (strategy.py).

Every site's clipped update weighs 1 in the aggregate (strategy.py's module doc says why): SecAgg+ runs with
`max_weight = 1`, the weight each site's `clipping_mod` reports, so the unmasked sum divided by the summed weights
is the unweighted mean. There is no `secagg-max-weight` key (a run config that still has one is warned about and
ignored).

Each round's checkpoint records the DP facts of that round (`meta["dp"]`: clipping mode, the norm the sites
clipped to, the noise multiplier, the weighting ("unweighted"), the number of sites aggregated and the noise stddev
added, z * norm / sites, and with adaptive clipping the noised clipped fraction and the next norm); a
resumed adaptive run starts from the next norm its latest checkpoint holds, not from `clipping-norm`.

The coordinator keeps its own audit log in `<state-dir>/audit/` (auditing.py: the log, and its signing key created
on the first start): run start, resume, every budget refusal, every round's outcome with the global adapter hash
and the checkpoint file hash, and the run's end. Simulated and deployed runs both go through `main`, so both
write it. Its latest signed audit checkpoint goes to every site with each round's instructions (`audit-checkpoint`),
and each site's comes back in its round metrics and is kept in `<state-dir>/witness/`.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from megaportrait.shared.audit import WITNESS_DIR, WitnessStore
from megaportrait.shared.errors import ConfigError

from .auditing import CoordinatorAudit, adapter_sha256
from .budget import BudgetLedger
from .checkpoint import Checkpoint, check_compatible, checkpoint_dir, load_checkpoint, save_checkpoint
from .strategy import UNIT_WEIGHT, BoundedGrid, SiteBudgetStrategy, build_strategy

log = logging.getLogger("megaportrait.coordinator")


app = ServerApp()


def privacy_plan(run_config: dict[str, Any]) -> dict[str, Any]:
    """The privacy policy's budgets and the run's planned per-site epsilon (Opacus); refuses a run that would
    cross a budget, and the retired `epsilon-budget-per-site` key."""
    from megaportrait.shared.accounting import epsilon, federation_release
    from megaportrait.shared.policy import DEFAULT_PRIVACY_POLICY, load_privacy_policy

    if "epsilon-budget-per-site" in run_config:
        raise ConfigError("run config epsilon-budget-per-site is no longer read: budgets are in the privacy policy "
                          "(policies/privacy.yaml budgets.per_photo / per_person / per_site; run config "
                          "privacy-policy names another file)")
    path = Path(str(run_config.get("privacy-policy", "") or DEFAULT_PRIVACY_POLICY)).expanduser()
    policy = load_privacy_policy(path)
    rounds = int(run_config.get("num-server-rounds", 2))
    z = float(run_config.get("server-noise-multiplier", 1.0))
    planned = epsilon([federation_release(z, rounds)], policy.rules.delta, policy.rules.accountant)
    budgets = policy.budgets
    for unit, budget in (("per_site", budgets.per_site), ("per_person", budgets.per_person)):
        if planned > budget:
            raise ConfigError(
                f"run refused: {rounds} round(s) at server-noise-multiplier {z:g} plan a per-site epsilon of "
                f"{planned:.3g} (Opacus {policy.rules.accountant}, delta {policy.rules.delta:g}), over the "
                f"{unit} budget {budget:g} of {path}; raise the noise multiplier or run fewer rounds")
    return {"budget": float(budgets.per_photo), "budgets": budgets.model_dump(), "planned_site_epsilon": planned,
            "privacy_policy": str(path), "delta": policy.rules.delta, "accountant": policy.rules.accountant}


def run_settings(run_config: dict[str, Any]) -> dict[str, Any]:
    """The coordinator's view of the run config, with defaults and checks."""
    cfg = {
        "rounds": int(run_config.get("num-server-rounds", 2)),
        "min_sites": int(run_config.get("min-sites", 2)),
        "local_steps": int(run_config.get("local-steps", 4)),
        "secure_aggregation": bool(run_config.get("secure-aggregation", True)),
        "round_timeout": float(run_config.get("round-timeout", 300.0)),
        **privacy_plan(run_config),
        "state_dir": Path(str(run_config.get("state-dir", "runs/coordinator"))).expanduser(),
        "resume": bool(run_config.get("resume", True)),
        "seed": int(run_config.get("seed", 0)),
    }
    if cfg["rounds"] < 1 or cfg["min_sites"] < 1:
        raise ConfigError("num-server-rounds and min-sites must be at least 1")
    if cfg["secure_aggregation"] and cfg["min_sites"] < 2:
        raise ConfigError("secure aggregation needs min-sites >= 2 (a sum over one site is that site's update)")
    return cfg


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the federation described by `context.run_config`."""
    run_config = dict(context.run_config)
    cfg = run_settings(run_config)
    state_dir: Path = cfg["state_dir"]
    state_dir.mkdir(parents=True, exist_ok=True)
    audit = CoordinatorAudit.open(state_dir, run_id=context.run_id, run_config=run_config)
    try:
        round_done = _run(grid, context, run_config, cfg, state_dir, audit)
    except BaseException as exc:
        try:
            _record_interrupted(state_dir, context.run_id, cfg["rounds"], audit, exc)
        except Exception:  # noqa: BLE001 - the run's own error is the one to raise
            log.exception("cannot audit the end of the interrupted run")
        raise
    else:
        audit.run_end(round_done)
    finally:
        audit.close()


def _record_interrupted(state_dir: Path, run_id: int, rounds: int, audit: CoordinatorAudit,
                        exc: BaseException) -> None:
    """A run that ended early: `run.stop` and status `stopped` when the operator asked for it, else `run.fail`
    and status `failed` naming the error. `coordinator stop` leaves a stop request before `flwr stop`; Flower then
    ends the ServerApp with SystemExit, or, when the SuperLink revokes the run's token first, the next Grid call
    fails with HTTP 401. Either way the operator's request is what ended the run."""
    from .deployment import read_stop_request

    latest = load_checkpoint(state_dir)
    round_done = latest.round if latest else 0
    request = read_stop_request(state_dir, run_id)
    if request is not None:
        log.info("run %s stopped by the operator after round %d (ended by %s)", run_id, round_done,
                 type(exc).__name__)
        audit.run_stop(round_done, requested_at=float(request.get("at", 0.0)))
        _write_status(state_dir, run_id, "stopped", round_done, rounds, stopped_by="operator")
    else:
        audit.run_end(round_done, error=exc)
        _write_status(state_dir, run_id, "failed", round_done, rounds, error=type(exc).__name__)


def _run(grid: Grid, context: Context, run_config: dict[str, Any], cfg: dict[str, Any], state_dir: Path,
         audit: CoordinatorAudit) -> int:
    """`main`'s work; returns the round of the latest checkpoint."""
    from megaportrait.client.federation import identity_settings_from_run_config, initial_global_arrays

    settings = identity_settings_from_run_config(run_config)
    arrays, names, base_sha = initial_global_arrays(settings, cfg["seed"])
    start_round = 0
    latest = load_checkpoint(state_dir) if cfg["resume"] else None
    audit.run_start(cfg, run_config, base_model_sha256=base_sha,
                    initial_adapter=adapter_sha256(latest.arrays if latest is not None else arrays))
    if latest is not None:
        check_compatible(latest, names, base_sha)
        arrays, start_round = latest.arrays, latest.round
        log.info("resuming from checkpoint round %d in %s", start_round, state_dir)
        audit.resume(start_round, checkpoint_dir(state_dir) / f"round-{start_round:04d}.npz", adapter_sha256(arrays))
    else:
        save_checkpoint(state_dir, Checkpoint(round=0, arrays=arrays, names=names, base_model_sha256=base_sha,
                                              meta={"run_id": str(context.run_id)}))
    remaining = cfg["rounds"] - start_round
    _write_status(state_dir, context.run_id, "running", start_round, cfg["rounds"],
                  privacy={"planned_site_epsilon": cfg["planned_site_epsilon"], "budgets": cfg["budgets"],
                           "delta": cfg["delta"], "accountant": cfg["accountant"],
                           "dp_mode": "distributed" if cfg["secure_aggregation"] else "central"})
    if remaining <= 0:
        log.info("all %d rounds already done (checkpoint round %d); nothing to run", cfg["rounds"], start_round)
        _write_status(state_dir, context.run_id, "finished", start_round, cfg["rounds"])
        return start_round

    ledger = BudgetLedger(state_dir / "budget.json", cfg["budget"], delta=cfg["delta"],
                          accountant=cfg["accountant"])
    log.info("planned per-site epsilon %.3g over %d round(s) (budget %g, delta %g, Opacus %s)",
             cfg["planned_site_epsilon"], cfg["rounds"], cfg["budgets"]["per_site"], cfg["delta"], cfg["accountant"])
    bounded = BoundedGrid(grid, cfg["round_timeout"])
    resumed_norm = None
    if latest is not None and latest.round > 0 and str(run_config.get("clipping", "fixed")).lower() == "adaptive":
        resumed_norm = latest.meta.get("dp", {}).get("next_clipping_norm")
    inner = build_strategy(run_config, arrays, cfg["min_sites"], clipping_norm=resumed_norm)
    if resumed_norm is not None:
        log.info("adaptive clipping resumes at norm %.4g (checkpoint round %d)", resumed_norm, start_round)

    def on_round(server_round: int, new_arrays: list[np.ndarray], sites: list[str], dp: dict[str, Any]) -> Path:
        path = save_checkpoint(state_dir, Checkpoint(round=server_round, arrays=new_arrays, names=names,
                                                     base_model_sha256=base_sha, sites=sites,
                                                     meta={"run_id": str(context.run_id), "resumed_from": start_round,
                                                           "dp": dp}))
        _write_status(state_dir, context.run_id, "running", server_round, cfg["rounds"])
        log.info("round %d aggregated from %d site(s); checkpoint written", server_round, len(sites))
        return path

    strategy = SiteBudgetStrategy(
        inner, grid=bounded, ledger=ledger, min_sites=cfg["min_sites"],
        round_offset=start_round, query_timeout=min(cfg["round_timeout"], 120.0), on_round=on_round,
        secure_aggregation=cfg["secure_aggregation"], audit=audit, witness=WitnessStore(state_dir / WITNESS_DIR),
        fit_config={"local-steps": cfg["local_steps"], "base-model-sha256": base_sha})
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=remaining), strategy=strategy)
    build_workflow(run_config)(bounded, legacy)
    done = load_checkpoint(state_dir)
    _write_status(state_dir, context.run_id, "finished", done.round if done else start_round, cfg["rounds"],
                  round_reports=strategy.rounds)
    return done.round if done else start_round


def build_workflow(run_config: dict[str, Any]) -> DefaultWorkflow:
    """Flower's `DefaultWorkflow`, its fit step `SecAggPlusWorkflow` when `secure-aggregation` is on. SecAgg+ gets
    `max_weight = UNIT_WEIGHT`: each site's masked vector carries its parameters times the weight it reports over
    `max_weight` (quantised), and every site reports 1, so the factor is exactly 1."""
    cfg = run_settings(run_config)
    if not cfg["secure_aggregation"]:
        return DefaultWorkflow()
    if "secagg-max-weight" in run_config:
        log.warning("run config secagg-max-weight = %s ignored: every site weighs %d, so SecAgg+ runs with "
                    "max_weight = %d", run_config["secagg-max-weight"], UNIT_WEIGHT, UNIT_WEIGHT)
    return DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=_int_or_fraction(run_config.get("secagg-num-shares", 1.0)),
        reconstruction_threshold=_int_or_fraction(run_config.get("secagg-reconstruction-threshold", 0.6)),
        max_weight=float(UNIT_WEIGHT),
        clipping_range=float(run_config.get("secagg-clipping-range", 8.0)),
        timeout=cfg["round_timeout"]))


def _int_or_fraction(value: Any) -> int | float:
    """SecAgg+ takes an int (an absolute count) or a float in (0, 1] (a fraction of the sampled sites)."""
    number = float(value)
    return int(number) if number > 1 else number


def _write_status(state_dir: Path, run_id: int, state: str, round_done: int, rounds: int, **extra: Any) -> None:
    """`status.json`: what the coordinator is doing, for the CLI and for tests."""
    previous = state_dir / "status.json"
    if "privacy" not in extra and previous.is_file():  # the run's privacy plan stays in every later status
        kept = json.loads(previous.read_text()).get("privacy")
        if kept is not None and json.loads(previous.read_text()).get("run_id") == str(run_id):
            extra["privacy"] = kept
    data = {"run_id": str(run_id), "state": state, "round": round_done, "rounds": rounds, "at": time.time(),
            **{k: {str(r): v for r, v in val.items()} if isinstance(val, dict) else val for k, val in extra.items()}}
    tmp = state_dir / ".status.tmp"
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(state_dir / "status.json")
