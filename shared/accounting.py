"""Privacy accounting in three units (per photo, per person, per site), every epsilon from an Opacus accountant.

A release is Opacus' own history entry, (noise multiplier, sample rate, steps). Per photo: the local DP-SGD
releases as trained (Poisson sampling of photos, per-photo clipping). Per person: the same releases with the
person's k photos as one group: a step moves the clipped sum by at most k*C, so each step is a Gaussian mechanism
with multiplier z/k, taken without subsampling amplification (q = 1), which is conservative. Per site: the
federation's Gaussian noise on the sum of the sites' clipped updates (sensitivity C, one site's update added or
removed), one release of multiplier z_eff per round at q = 1. The per-person figure of the global adapter is the
smaller of its group figure and the per-site figure (a person's photos are part of one site's update).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

Release = tuple[float, float, int]
"""(noise multiplier, sample rate, steps): one entry of an Opacus accountant's history."""


def epsilon(history: Sequence[Release], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` of the composed `history`, from Opacus' accountant `accountant` (0 for no release, inf
    when a release had no noise)."""
    history = [(float(z), float(q), int(s)) for z, q, s in history if int(s) > 0]
    if not history:
        return 0.0
    if any(z <= 0 for z, _, _ in history):
        return math.inf
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = history
    return float(acc.get_epsilon(delta))


def group_history(history: Sequence[Release], group_size: int) -> list[Release]:
    """The releases seen by a group of `group_size` records (a person's photos): multiplier z / k, q = 1."""
    k = max(1, int(group_size))
    return [(float(z) / k, 1.0, int(s)) for z, _, s in history]


def federation_release(noise_multiplier: float, rounds: int = 1) -> Release:
    """`rounds` rounds of the federation's noise (stddev z * C on the sum of updates clipped to C), q = 1."""
    return (float(noise_multiplier), 1.0, int(rounds))


def distributed_noise_multiplier(noise_multiplier: float, sites_aggregated: int, min_sites: int) -> float:
    """The multiplier the unmasked sum actually carries when `sites_aggregated` sites each added stddev
    z * C / sqrt(min_sites): z * sqrt(sites_aggregated / min_sites)."""
    return float(noise_multiplier) * math.sqrt(max(0, sites_aggregated) / max(1, min_sites))


def membership_bound(eps: float, delta: float, fpr: float) -> float:
    """Largest true-positive rate any membership attack can reach at false-positive rate `fpr` against an
    (eps, delta)-DP mechanism: min(1, e^eps * fpr + delta)."""
    if math.isinf(eps) or eps > 700:
        return 1.0
    return min(1.0, math.exp(eps) * fpr + delta)


@dataclass(frozen=True)
class PrivacyFigures:
    """A site's epsilon in each unit, at `delta`, from `accountant`. `largest_person` is the k used per person."""

    per_photo: float
    per_person: float
    per_site: float
    delta: float
    accountant: str
    largest_person: int

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}

    def lines(self) -> list[str]:
        """Three lines, one per unit, for a terminal."""
        def f(x: float) -> str:
            return "inf (no noise)" if math.isinf(x) else f"{x:.3g}"
        return [f"per photo:  epsilon {f(self.per_photo)} (local DP-SGD, every run on the site's photos)",
                f"per person: epsilon {f(self.per_person)} (all of one person's photos, up to {self.largest_person}, "
                "in the shared global adapter; a personal adapter models its person: its per-photo figure bounds it)",
                f"per site:   epsilon {f(self.per_site)} (federation noise on the sum of updates)",
                f"delta {self.delta:g}, Opacus {self.accountant} accountant"]


def figures(global_history: Sequence[Release], personal_history: Sequence[Release], site_history: Sequence[Release],
            largest_person: int, delta: float, accountant: str = "rdp") -> PrivacyFigures:
    """The three figures for a site whose photos went through `global_history` (local DP-SGD of the global
    adapter's rounds) and `personal_history` (personal adapters), and whose updates through `site_history`
    (federation noise); its largest person has `largest_person` photos. Per photo composes every run; per person
    is the global adapter's (a personal adapter is, by design, a model of its person and has no person-level
    protection: its per-photo figure is what bounds it)."""
    per_photo = epsilon(list(global_history) + list(personal_history), delta, accountant)
    per_site = epsilon(site_history, delta, accountant)
    group = epsilon(group_history(global_history, largest_person), delta, accountant)
    per_person = min(group, per_site) if site_history else group
    return PrivacyFigures(per_photo, per_person, per_site, delta, accountant, int(largest_person))
