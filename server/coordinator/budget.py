"""The coordinator's per-site privacy budget ledger.

Each site's epsilon comes from the Opacus accountant at the site (client/federation.py) and reaches the coordinator
two ways: in the site's answer to the pre-round budget query (`epsilon` so far and `epsilon-next`, the accountant's
figure for one more round) and in each round's training metrics. The ledger keeps, per site, the largest epsilon
ever reported (a site that forgets its history does not get its budget back), and refuses a site whose
`epsilon-next` exceeds the run config's `epsilon-budget-per-site`. It is JSON on disk, written atomically, so
a restarted coordinator keeps refusing the same sites.

The ledger is also the coordinator's own accountant for the per-site unit: each round a site's update is
aggregated, the noise multiplier the sum actually carried goes into that site's `federation` history (Opacus'
(z, q = 1, 1)), and `site_epsilon` is the Opacus accountant's figure over it (`shared.accounting`).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("megaportrait.coordinator.budget")


@dataclass
class SiteAccount:
    """What the coordinator knows of one site's privacy spend."""

    epsilon: float = 0.0
    rounds: list[int] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    federation: list[list[float]] = field(default_factory=list)
    """(noise multiplier the sum carried, 1.0, 1) per aggregated round: the per-site accountant history."""


class BudgetLedger:
    """site id -> `SiteAccount`; `admits` decides, `observe`/`record_round` update, every change is saved."""

    def __init__(self, path: str | Path, budget_per_site: float, *, delta: float = 1e-5,
                 accountant: str = "rdp") -> None:
        if not budget_per_site > 0:
            raise ValueError(f"epsilon budget per site must be positive, got {budget_per_site}")
        self.path = Path(path)
        self.budget = float(budget_per_site)
        self.delta = float(delta)
        self.accountant = accountant
        self.sites: dict[str, SiteAccount] = {}
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            fields = set(SiteAccount.__dataclass_fields__)
            self.sites = {k: SiteAccount(**{f: x for f, x in v.items() if f in fields})
                          for k, v in data["sites"].items()}

    def spent(self, site_id: str) -> float:
        return self.sites[site_id].epsilon if site_id in self.sites else 0.0

    def observe(self, site_id: str, epsilon: float) -> None:
        """A site reported its cumulative epsilon; keep the largest figure seen."""
        account = self.sites.setdefault(site_id, SiteAccount())
        if epsilon < account.epsilon - 1e-9:
            log.warning("site %s reports epsilon %.4g below the %.4g on record; keeping the larger", site_id, epsilon,
                        account.epsilon)
        account.epsilon = max(account.epsilon, float(epsilon))
        self.save()

    def admits(self, site_id: str, epsilon_next: float, server_round: int) -> bool:
        """True when one more round (reaching `epsilon_next`, and never less than what is on record) stays within
        the budget; a refusal is recorded with its figures."""
        projected = max(float(epsilon_next), self.spent(site_id))
        if projected <= self.budget:
            return True
        account = self.sites.setdefault(site_id, SiteAccount())
        account.refused.append({"round": server_round, "epsilon_next": projected, "budget": self.budget,
                                "at": time.time()})
        log.warning("site %s refused for round %d: epsilon would reach %.4g, budget %.4g", site_id, server_round,
                    projected, self.budget)
        self.save()
        return False

    def record_round(self, site_id: str, epsilon: float, server_round: int) -> None:
        """A site trained in `server_round` and reports `epsilon` after it."""
        account = self.sites.setdefault(site_id, SiteAccount())
        if server_round not in account.rounds:
            account.rounds.append(server_round)
        self.observe(site_id, epsilon)

    def record_federation(self, site_id: str, noise_multiplier: float, server_round: int) -> None:
        """The site's update went into round `server_round`'s sum, which carried `noise_multiplier`."""
        account = self.sites.setdefault(site_id, SiteAccount())
        account.federation.append([float(noise_multiplier), 1.0, 1, int(server_round)])
        self.save()

    def site_epsilon(self, site_id: str) -> float:
        """Per-site epsilon from the coordinator's own accountant (Opacus) over the rounds the site was in."""
        from megaportrait.shared.accounting import epsilon

        history = [(z, q, int(s)) for z, q, s, *_ in self.sites[site_id].federation] if site_id in self.sites else []
        return epsilon(history, self.delta, self.accountant)

    def snapshot(self) -> dict[str, Any]:
        return {"budget_per_site": self.budget, "delta": self.delta, "accountant": self.accountant,
                "sites": {k: {"epsilon": v.epsilon, "rounds": list(v.rounds), "refused": list(v.refused),
                              "federation": list(v.federation), "site_epsilon": self.site_epsilon(k)}
                          for k, v in sorted(self.sites.items())}}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot(), indent=1))
        os.replace(tmp, self.path)
