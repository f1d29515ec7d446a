"""The render backends' common contract and the registry that picks one per job.

Both backends expose MegaPortrait's three stages under the same names (identity, shading, harmonize); a job's
`StageSwitches` turns stages off for ablations. A backend gets decrypted records only, in memory.
"""
from __future__ import annotations

from typing import Callable, Protocol

from megaportrait.shared.records import IdentityPayload, Portrait, SourceImage, StageSwitches

ProgressFn = Callable[[str, float], None]
"""progress(stage_name, fraction_done in [0, 1])"""


class RenderBackend(Protocol):
    """Puts one person's identity onto a template portrait."""

    name: str

    def render(
        self,
        job_id: str,
        template: SourceImage,
        identity: IdentityPayload,
        *,
        stages: StageSwitches,
        seed: int,
        params: dict,
        progress: ProgressFn,
    ) -> Portrait:
        """Return the portrait at the template's size, with metadata naming backend, stages, params, scores."""
        ...
