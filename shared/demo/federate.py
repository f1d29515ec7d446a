"""Federated DP rounds of the global adapter over the demo's sites, then each person's private adapter.

The rounds run on Flower's simulation engine (`server.coordinator.deployment.simulate`): the project's own ServerApp
and ClientApp, SecAgg+, client-side clipping and the sites' distributed noise, budgets and checkpoints, unchanged.
Each site's Flower client reads only the photos its consent ledger cleared for federated training (`sites.stage_federation_inputs`).
Epsilon figures are read from each site's privacy ledger and the coordinator's budget ledger (Opacus accountants),
never computed here; a personal adapter's figure is its own run, and composed with the site's rounds by the site's
accountant.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .settings import DemoError, DemoSettings
from .sites import ACTOR, PersonState, Site, stage_federation_inputs

log = logging.getLogger("megaportrait.demo")


@dataclass
class SitePrivacy:
    """One site's privacy figures after the rounds (from its own ledger and the coordinator's budget ledger)."""

    site: str
    people: list[str]
    n_examples: int | None
    epsilon: float
    delta: float
    releases: int
    rounds: list[int]
    refused: list[dict]
    coordinator_epsilon: float | None
    site_epsilon: float | None = None
    """Per-site epsilon (federation noise) from the coordinator's own accountant."""


@dataclass
class FederationOutcome:
    """What the rounds left: which sites took part, run settings, status, and each site's epsilon."""

    sites: list[SitePrivacy]
    left_out: dict[str, str]
    run_config: dict
    status: dict
    budget: dict
    seconds: float
    state_dir: Path
    site_state_dir: Path
    fallbacks: list[str] = field(default_factory=list)

    def site(self, site_id: str) -> SitePrivacy | None:
        return next((s for s in self.sites if s.site == site_id), None)


def _start_ray(quiet: bool, cpus: int = 2) -> bool:
    """Start Ray for the simulation as Flower would (it reuses a running Ray), but with the site processes' own log
    lines kept in Ray's log folder instead of this terminal when `quiet`. False when Ray was already running."""
    import os
    import sys

    import ray

    if ray.is_initialized():
        return False
    pythonpath = os.pathsep.join(sys.path + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    ray.init(num_cpus=cpus, num_gpus=0, include_dashboard=False, log_to_driver=not quiet,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    return True


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def run_federation(sites: list[Site], settings: DemoSettings, work: Path, *,
                   on_round: Callable[[int], None] | None = None, quiet: bool = False) -> FederationOutcome:
    """Stage each site's consented photos and run `settings.rounds` federated rounds; `on_round(k)` is called as
    the coordinator finishes round k (watched from its status file). `quiet`: keep the site processes' log lines
    out of the terminal (they stay in Ray's session logs)."""
    from megaportrait.client.federation import LEDGER_FILE, SiteConsent, SitePrivacyLedger
    from megaportrait.server.coordinator.deployment import simulate

    from .sites import consent_policy_path

    fed_root = work / "federation"
    sim_sites = fed_root / "sim-sites"
    sim_sites.mkdir(parents=True, exist_ok=True)
    taking_part: dict[str, list[PersonState]] = {}
    left_out: dict[str, str] = {}
    for site in sites:
        staged = stage_federation_inputs(site)
        if staged:
            taking_part[site.site_id] = staged
            (sim_sites / site.site_id).symlink_to(site.federation_inputs.root.resolve(), target_is_directory=True)
        else:
            left_out[site.site_id] = "no person with usable photos and consent to federated training"
    n = len(taking_part)
    if n == 0:
        raise DemoError("no site has a person with usable photos and consent to federated training")
    fallbacks = []
    secagg = n >= 2
    if not secagg:
        fallbacks.append("federation:single_site_without_secure_aggregation")
        log.warning("only one site takes part: secure aggregation (a sum over sites) is switched off")
    run_config = {"num-server-rounds": settings.rounds, "local-steps": settings.local_steps, "min-sites": n,
                  "secure-aggregation": secagg, "seed": settings.seed}
    state_dir, site_state = fed_root / "coordinator", fed_root / "site-state"
    # Each site's Flower client checks this site's own ledger again every round (federated_training consent).
    consent = {s.site_id: SiteConsent(s.ledger.path, s.key_path, s.audit.path, consent_policy_path())
               for s in sites if s.site_id in taking_part}

    stop = threading.Event()

    def watch() -> None:
        seen = 0
        while not stop.wait(1.0):
            try:
                done = int(json.loads((state_dir / "status.json").read_text()).get("round", 0))
            except (OSError, ValueError):
                continue
            if done > seen and on_round:
                on_round(done)
                seen = done

    watcher = threading.Thread(target=watch, name="demo-federation-watch", daemon=True)
    watcher.start()
    started_ray = False
    try:
        started_ray = _start_ray(quiet=quiet)
        result = simulate(sim_sites, state_dir, site_state_dir=site_state, run_config=run_config, num_sites=n,
                          consent=consent)
    finally:
        stop.set()
        watcher.join()
        if started_ray:
            _stop_ray()
    if result.status.get("state") != "finished" or int(result.status.get("round", 0)) < settings.rounds:
        raise DemoError(f"the federation did not complete its {settings.rounds} round(s) (coordinator status: "
                        f"{result.status.get('state')}, round {result.status.get('round')}); run with --verbose to "
                        "see the sites' logs", reason="federation_failed")
    if on_round:
        on_round(int(result.status.get("round", 0)))

    figures = []
    for site_id, staged in taking_part.items():
        ledger = SitePrivacyLedger(site_state / site_id / LEDGER_FILE)
        account = result.budget.get("sites", {}).get(site_id, {})
        n_examples = _crops_trained_on(site_state / site_id)
        figures.append(SitePrivacy(site=site_id, people=[p.name for p in staged], n_examples=n_examples,
                                   epsilon=ledger.epsilon(), delta=ledger.delta, releases=len(ledger.history),
                                   rounds=list(account.get("rounds", [])), refused=list(account.get("refused", [])),
                                   coordinator_epsilon=account.get("epsilon"),
                                   site_epsilon=account.get("site_epsilon")))
    for site in sites:
        if site.site_id in taking_part:
            p = next(f for f in figures if f.site == site.site_id)
            site.audit.append("federation.rounds", actor=ACTOR, detail={
                "rounds": p.rounds, "epsilon": p.epsilon, "delta": p.delta, "people": len(taking_part[site.site_id])})
    return FederationOutcome(sites=figures, left_out=left_out, run_config=run_config, status=result.status,
                             budget=result.budget, seconds=result.seconds, state_dir=state_dir,
                             site_state_dir=site_state, fallbacks=fallbacks)


def _crops_trained_on(state_dir: Path) -> int | None:
    """How many face crops the site's Flower client trained on (rows of its crop cache), or None without one."""
    import numpy as np

    caches = sorted(state_dir.glob("crops-*.npz"), key=lambda p: p.stat().st_mtime)
    if not caches:
        return None
    with np.load(caches[-1]) as z:
        return int(z["pixels"].shape[0])


# --- personal adapters ---------------------------------------------------------------------------------------


@dataclass
class AdapterOutcome:
    """A person's adapter (kept at the site) and its privacy figures; `skipped` says why none was trained."""

    site: str
    person: str
    ref: str
    skipped: str = ""
    n_crops: int = 0
    steps: int = 0
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    composed_epsilon: float | None = None
    global_round: int | None = None
    seconds: float = 0.0
    adapter_sha256: str = ""
    adapter: object = None  # IdentityAdapter, in memory for the diffusion render


def personalise_people(sites: list[Site], fed: FederationOutcome, settings: DemoSettings, *,
                       advance: Callable[[], None] | None = None) -> list[AdapterOutcome]:
    """Fine-tune a private adapter from the site's latest global adapter for every person with personal-adapter
    consent and 3+ usable photos; the others are listed with the reason."""
    from megaportrait.client.federation import (
        LEDGER_FILE,
        SitePrivacyLedger,
        load_base,
        load_global_adapter,
        personalise_adapter,
    )
    from megaportrait.client.identity import MIN_CROPS
    from megaportrait.shared.adapters import adapter_to_bytes
    from megaportrait.shared.config import IdentitySettings
    from megaportrait.shared.consent import ConsentError
    from megaportrait.shared.records import sha256_hex

    identity = IdentitySettings(steps=settings.adapter_steps, seed=settings.seed)
    base = None
    out = []
    for site in sites:
        for person in site.people:
            rec = AdapterOutcome(site=site.site_id, person=person.name, ref=person.ref)
            out.append(rec)
            try:
                site.ledger.require(person.ref, "personal_adapter", actor=ACTOR)
            except ConsentError as exc:
                rec.skipped = f"no consent ({exc.reason})"
                continue
            if len(person.accepted) < MIN_CROPS:
                rec.skipped = f"needs {MIN_CROPS} usable photos, has {len(person.accepted)}"
                continue
            if fed.site(site.site_id) is None:
                rec.skipped = "its site took no part in the federation (no global adapter)"
                continue
            arrays, global_round = load_global_adapter(fed.site_state_dir / site.site_id)
            if base is None:
                base = load_base(identity, settings.seed)
            t = time.perf_counter()
            # The site's ledger composes the personal adapter with its global rounds (same photos).
            ledger = SitePrivacyLedger(fed.site_state_dir / site.site_id / LEDGER_FILE)
            adapter = personalise_adapter([a.crop for a in person.accepted], identity, person_ref=person.ref,
                                          global_arrays=arrays, base=base, steps=settings.adapter_steps,
                                          ledger=site.ledger, actor=ACTOR, privacy_ledger=ledger)
            rec.seconds = time.perf_counter() - t
            p = adapter.privacy
            rec.n_crops, rec.steps, rec.epsilon, rec.delta = len(person.accepted), p.steps, p.epsilon, p.delta
            rec.noise_multiplier, rec.sample_rate, rec.global_round = p.noise_multiplier, p.sample_rate, global_round
            if p.epsilon is not None:
                rec.composed_epsilon = ledger.epsilon()
            data = adapter_to_bytes(adapter)
            rec.adapter_sha256 = sha256_hex(data)
            item = site.adapters.put(person.ref, "adapter.safetensors", data)
            site.audit.append("adapter.train", actor=ACTOR, person=person.ref, data=[item.digest],
                              detail={"steps": p.steps, "epsilon": p.epsilon, "delta": p.delta,
                                      "global_round": global_round})
            rec.adapter = adapter
            if advance:
                advance()
    return out
