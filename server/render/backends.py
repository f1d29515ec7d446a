"""The render backends' common contract and the registry that picks one per job.

Both backends expose MegaPortrait's three stages under the same names (identity, shading, harmonize); a job's
`StageSwitches` turns stages off for ablations. A backend gets decrypted records only, in memory.

`default_registry()` maps backend names to factories; backends are imported and built only when a job needs them.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Protocol

from megaportrait.shared.config import RenderSettings
from megaportrait.shared.errors import MegaPortraitError
from megaportrait.shared.payload_format import KIND_FACE_CROPS as FACE_CROPS
from megaportrait.shared.payload_format import KIND_LORA_ADAPTER as LORA_ADAPTER
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


class UnknownBackend(MegaPortraitError):
    """A job named a backend this node does not offer."""

    reason = "unknown_backend"


BackendFactory = Callable[[RenderSettings], RenderBackend]
"""Builds a backend from the node's render settings; called once per node, the first time a job needs it."""


@dataclass(frozen=True)
class BackendEntry:
    """A backend the node offers: its name, the payload kind it takes, and how to build it."""

    name: str
    payload_kind: str
    factory: BackendFactory


class BackendRegistry:
    """name -> `BackendEntry`, plus the built backends (built lazily, once, then reused by every job)."""

    def __init__(self, settings: RenderSettings | None = None) -> None:
        self.settings = settings or RenderSettings()
        self._entries: dict[str, BackendEntry] = {}
        self._built: dict[str, RenderBackend] = {}
        self._lock = threading.Lock()

    def register(self, name: str, factory: BackendFactory, *, payload_kind: str) -> None:
        if payload_kind not in (FACE_CROPS, LORA_ADAPTER):
            raise ValueError(f"payload_kind must be {FACE_CROPS!r} or {LORA_ADAPTER!r}, got {payload_kind!r}")
        self._entries[name] = BackendEntry(name=name, payload_kind=payload_kind, factory=factory)
        self._built.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    def entry(self, name: str) -> BackendEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownBackend(f"backend {name!r} is not offered by this node (it offers {', '.join(self.names()) or 'none'})") from None

    def get(self, name: str) -> RenderBackend:
        """The built backend `name` (built on first use; its model loading happens then, not at import)."""
        entry = self.entry(name)
        with self._lock:
            if name not in self._built:
                self._built[name] = entry.factory(self.settings)
            return self._built[name]


def _classic(settings: RenderSettings) -> RenderBackend:
    from megaportrait.server.render.classic import ClassicBackend

    return ClassicBackend()


def _diffusion(settings: RenderSettings) -> RenderBackend:
    from megaportrait.server.render.diffusion import DiffusionBackend

    return DiffusionBackend(settings)


def default_registry(settings: RenderSettings | None = None) -> BackendRegistry:
    """The two MegaPortrait backends: `classic` (CPU, takes face crops) and `diffusion` (takes a LoRA adapter)."""
    registry = BackendRegistry(settings)
    registry.register("classic", _classic, payload_kind=FACE_CROPS)
    registry.register("diffusion", _diffusion, payload_kind=LORA_ADAPTER)
    return registry
