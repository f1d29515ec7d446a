"""The demo's privacy-utility curve: for a few noise levels, epsilon per photo and per person against the
held-out denoising loss of the adapter, on the photos of the people who got a personal adapter (each trains on all
but their last photo, which is held out). It is the library function `megaportrait eval` runs
(`shared.evaluation.lira.privacy_utility_curve`), at the demo's adapter steps. The curve's adapters are an
operator's evaluation: trained in this process on the tiny in-code model with DP noise from the OS's entropy,
scored, and discarded; only their held-out loss reaches the report, and they are not in the site's privacy ledger
(nothing leaves the site)."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .federate import AdapterOutcome
from .settings import DemoSettings
from .sites import ACTOR, Site

log = logging.getLogger("megaportrait.demo")

CURVE_NOISE: tuple[float | None, ...] = (None, 4.0, 2.0, 1.0)
"""Noise multipliers of the demo's curve (None = no DP); 1.0 is the product default."""
PLOT_NAME = "privacy_utility.png"


@dataclass
class CurveOutcome:
    """The curve's points (`lira.CurvePoint` as dicts, one per noise level), whose photos it used, and its plot."""

    points: list[dict] = field(default_factory=list)
    people: dict[str, int] = field(default_factory=dict)
    """name -> photos trained on (one more is held out)."""
    steps: int = 0
    seconds: float = 0.0
    plot: Path | None = None
    skipped: str = ""


def privacy_utility(sites: list[Site], adapters: list[AdapterOutcome], settings: DemoSettings, out_dir: Path,
                    ) -> CurveOutcome:
    """The curve on the photos of everyone who got a personal adapter (their `personal_adapter` consent is checked
    again), at `settings.adapter_steps` steps; writes its plot to `out_dir/PLOT_NAME`. Nobody with an adapter:
    the outcome says why and holds no points."""
    from megaportrait.shared.base_models import load_base_model
    from megaportrait.shared.consent import ConsentError
    from megaportrait.shared.evaluation.lira import LiraSettings, curve_point_dict, privacy_utility_curve
    from megaportrait.shared.evaluation.plots import plot_privacy_utility

    started = time.perf_counter()
    people = {}
    for a in adapters:
        if a.adapter is None:
            continue
        site = next(s for s in sites if s.site_id == a.site)
        try:
            site.ledger.require(a.ref, "personal_adapter", actor=ACTOR)
        except ConsentError as exc:
            log.info("privacy-utility curve: %s left out (%s)", a.ref, exc.reason)
            continue
        people[a.person] = [p.crop.pixels for p in site.person(a.person).accepted]
    if not people:
        return CurveOutcome(steps=settings.adapter_steps, skipped="nobody got a personal adapter (3+ usable photos "
                                                                  "and consent), so there is no person to hold out")
    lira = LiraSettings(curve_noise=CURVE_NOISE, curve_steps=settings.adapter_steps, seed=settings.seed)
    components = load_base_model(None, seed=settings.seed).components
    points = [curve_point_dict(p) for p in privacy_utility_curve(components, people, lira, private_noise=True)]
    plot = plot_privacy_utility(points, out_dir / PLOT_NAME, title=f"Privacy-utility curve ({', '.join(people)}, "
                                f"{settings.adapter_steps} steps)")
    return CurveOutcome(points=points, people={k: len(v) - 1 for k, v in people.items()}, steps=settings.adapter_steps,
                        seconds=time.perf_counter() - started, plot=plot)
