"""What the demo runs: one frozen settings record, with the full default and a quick variant for tests."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from megaportrait.shared.errors import MegaPortraitError


class DemoError(MegaPortraitError):
    """The demo cannot run on what it was given; the message says what to pass or place."""

    reason = "demo"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and inputs of one demo run.

    out_dir: the run's folder is `out_dir/<UTC timestamp>` (or `out_dir` itself when `timestamped` is False).
    n_sites, people_per_site: how many simulated sites and consented people per site (fewer when the photos run out).
    rounds, local_steps: federated rounds of the global adapter and DP-SGD steps per site per round.
    n_templates: template portraits rendered onto (spread over skin tone).
    adapter_steps: DP-SGD steps of each personal adapter (people with 3+ usable photos).
    ablations: also render identity-only (naive paste) and identity+shading next to the full render.
    diffusion, diffusion_steps: one diffusion-backend render on the tiny in-code model, sampler steps per stage.
    photos_dir: the user's own people (sub-folder per person, or photos directly = one person), placed at site-a.
    template: the user's own template portrait (replaces the template set).
    data_dir: the shared photo set (people/, templates/, hard/); None = $MEGAPORTRAIT_DATA or ../shared/data.
    revoke: display name of the person whose consent is revoked; None = the first person at the second site.
    torch_threads: torch CPU threads (1: with OpenCV loaded, more threads were measured far slower on 2 cores).
    """

    out_dir: Path = Path("runs/demo")
    timestamped: bool = True
    n_sites: int = 3
    people_per_site: int = 2
    rounds: int = 2
    local_steps: int = 4
    n_templates: int = 4
    adapter_steps: int = 30
    ablations: bool = True
    diffusion: bool = True
    diffusion_steps: int = 8
    photos_dir: Path | None = None
    template: Path | None = None
    data_dir: Path | None = None
    revoke: str | None = None
    seed: int = 0
    torch_threads: int = 1
    quick: bool = False

    def __post_init__(self) -> None:
        if self.n_sites < 2:
            raise DemoError(f"n_sites must be at least 2 (secure aggregation sums over sites), got {self.n_sites}")
        for name in ("people_per_site", "rounds", "local_steps", "n_templates", "adapter_steps", "diffusion_steps",
                     "torch_threads"):
            if getattr(self, name) < 1:
                raise DemoError(f"{name} must be at least 1, got {getattr(self, name)}")

    @classmethod
    def quick_settings(cls, out_dir: Path, **overrides) -> "DemoSettings":
        """A shortened run for tests and smoke checks: one person per site, one round, two templates, short
        adapters and a 3-step diffusion render; everything else as in the full demo."""
        base = dict(out_dir=Path(out_dir), people_per_site=1, rounds=1, local_steps=2, n_templates=2,
                    adapter_steps=6, diffusion_steps=3, quick=True)
        base.update(overrides)
        return cls(**base)

    def with_(self, **changes) -> "DemoSettings":
        return replace(self, **changes)
