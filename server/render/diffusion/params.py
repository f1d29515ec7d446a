"""The diffusion backend's knobs: one typed record, filled from node config then per-job params, recorded in output.

Layers merge key by key: code defaults < `RenderSettings.diffusion_params` < `RenderJob.params`. A stage's knobs
sit under its name, e.g. ``{"scheduler": "ddim", "identity": {"steps": 25}, "shading": {"strength": 0.3}}``.
Unknown keys and out-of-range values raise `InvalidRenderParams` naming the key, before any model runs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

from megaportrait.shared.errors import MegaPortraitError

SCHEDULER_NAMES = ("ddim", "dpm++", "dpm++karras", "euler", "euler_a", "unipc", "pndm")
CONDITION_NAMES = ("landmarks", "depth", "normals", "lineart", "canny", "color", "tile")


class InvalidRenderParams(MegaPortraitError):
    """A render job's (or the node's) diffusion parameters are malformed; the message names the key."""

    reason = "render_params_invalid"


@dataclass(frozen=True)
class StageParams:
    """One stage's sampler settings.

    strength: fraction of the noise schedule re-run (1.0 = generate from noise inside the mask).
    controls: condition names (see `conditions.CONDITIONS`), one ControlNet each; empty = no ControlNet.
    control_scales: one ControlNet weight per control.
    lora_scale: weight of the person's identity LoRA in this stage (0 = base model only).
    """

    steps: int
    guidance: float
    strength: float
    controls: tuple[str, ...]
    control_scales: tuple[float, ...]
    lora_scale: float


@dataclass(frozen=True)
class DiffusionParams:
    """Everything that decides a diffusion render besides the inputs and the seed.

    resolution: side in pixels of the square face crop the models see (multiple of 8).
    crop_scale: crop side / longest side of the detected face box.
    mask_grow, feather, seam_width: fractions of the face box's longest side: how far the face mask is grown past
        the mesh's face oval, the width of its soft inner edge, and the harmonization band's half-width.
    batch_size: crops per pipeline call when several portraits render together.
    """

    resolution: int = 512
    scheduler: str = "dpm++"
    prompt: str = "a portrait photo of {token} person, natural skin texture, detailed face"
    negative_prompt: str = "blurry, deformed, cartoon, painting, low quality, extra eyes"
    crop_scale: float = 2.0
    mask_grow: float = 0.04
    feather: float = 0.05
    seam_width: float = 0.06
    batch_size: int = 4
    identity: StageParams = field(default_factory=lambda: StageParams(
        steps=30, guidance=6.0, strength=1.0, controls=("landmarks",), control_scales=(1.0,), lora_scale=1.0))
    shading: StageParams = field(default_factory=lambda: StageParams(
        steps=20, guidance=4.0, strength=0.35, controls=("normals", "lineart"), control_scales=(0.6, 0.4),
        lora_scale=0.5))
    harmonize: StageParams = field(default_factory=lambda: StageParams(
        steps=20, guidance=3.0, strength=0.45, controls=("tile",), control_scales=(0.8,), lora_scale=0.0))

    def as_metadata(self) -> dict[str, Any]:
        """Plain JSON-able dict of every value used."""
        return asdict(self)

    def controls_used(self, stages: tuple[str, ...]) -> tuple[str, ...]:
        """Condition names the given stages need, in first-use order."""
        seen: list[str] = []
        for stage in stages:
            for name in getattr(self, stage).controls:
                if name not in seen:
                    seen.append(name)
        return tuple(seen)


_STAGES = ("identity", "shading", "harmonize")


def _stage_from(base: StageParams, raw: Any, where: str) -> StageParams:
    if not isinstance(raw, Mapping):
        raise InvalidRenderParams(f"{where}: expected a mapping of stage settings, got {type(raw).__name__}")
    known = {f.name for f in fields(StageParams)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise InvalidRenderParams(f"{where}.{key}: unknown setting (known: {', '.join(sorted(known))})")
        try:
            if key == "steps":
                value = int(value)
            elif key in ("guidance", "strength", "lora_scale"):
                value = float(value)
            elif key == "controls":
                value = (value,) if isinstance(value, str) else tuple(str(v) for v in value)
            elif key == "control_scales":
                value = (float(value),) if isinstance(value, (int, float)) else tuple(float(v) for v in value)
        except (TypeError, ValueError) as exc:
            raise InvalidRenderParams(f"{where}.{key}: {value!r} is not a valid value ({exc})") from exc
        values[key] = value
    if "controls" in values and "control_scales" not in values:
        # New controls without scales: weight each like the stage's first default.
        default = base.control_scales[0] if base.control_scales else 1.0
        values["control_scales"] = tuple(default for _ in values["controls"])
    return replace(base, **values)


def _check(p: DiffusionParams) -> None:
    if p.resolution < 64 or p.resolution % 8:
        raise InvalidRenderParams(f"resolution: {p.resolution} must be a multiple of 8, at least 64")
    if p.scheduler not in SCHEDULER_NAMES:
        raise InvalidRenderParams(f"scheduler: {p.scheduler!r} unknown (known: {', '.join(SCHEDULER_NAMES)})")
    if "{token}" not in p.prompt:
        raise InvalidRenderParams("prompt: must contain '{token}' (where the adapter's token goes)")
    if not 1.0 <= p.crop_scale <= 6.0:
        raise InvalidRenderParams(f"crop_scale: {p.crop_scale} outside [1, 6]")
    for name in ("mask_grow", "feather", "seam_width"):
        if not 0.0 <= getattr(p, name) <= 0.5:
            raise InvalidRenderParams(f"{name}: {getattr(p, name)} outside [0, 0.5]")
    if p.batch_size < 1:
        raise InvalidRenderParams(f"batch_size: {p.batch_size} must be at least 1")
    for stage in _STAGES:
        s: StageParams = getattr(p, stage)
        if s.steps < 1:
            raise InvalidRenderParams(f"{stage}.steps: {s.steps} must be at least 1")
        if not 0.0 < s.strength <= 1.0:
            raise InvalidRenderParams(f"{stage}.strength: {s.strength} outside (0, 1]")
        if s.steps * s.strength < 1.0:
            raise InvalidRenderParams(f"{stage}: steps x strength = {s.steps * s.strength:g} leaves no denoising step")
        for c in s.controls:
            if c not in CONDITION_NAMES:
                raise InvalidRenderParams(f"{stage}.controls: {c!r} unknown (known: {', '.join(CONDITION_NAMES)})")
        if len(s.control_scales) != len(s.controls):
            raise InvalidRenderParams(
                f"{stage}.control_scales: {len(s.control_scales)} values for {len(s.controls)} controls")


def parse_params(*layers: Mapping[str, Any] | None) -> DiffusionParams:
    """Merge parameter layers (lowest precedence first) onto the defaults and validate the result."""
    p = DiffusionParams()
    top = {f.name for f in fields(DiffusionParams)} - set(_STAGES)
    for layer in layers:
        for key, value in (layer or {}).items():
            if key in _STAGES:
                p = replace(p, **{key: _stage_from(getattr(p, key), value, key)})
            elif key in top:
                kind = type(getattr(DiffusionParams(), key))
                try:
                    p = replace(p, **{key: kind(value)})
                except (TypeError, ValueError) as exc:
                    raise InvalidRenderParams(f"{key}: {value!r} is not a valid {kind.__name__}") from exc
            else:
                raise InvalidRenderParams(f"{key}: unknown diffusion parameter (known: {', '.join(sorted(top | set(_STAGES)))})")
    _check(p)
    return p
