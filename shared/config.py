"""Configuration: one YAML file per deployment, overridable by environment variables.

Precedence (highest first): environment `MEGAPORTRAIT_<SECTION>__<KEY>`, the YAML file named by
`MEGAPORTRAIT_CONFIG` (or passed to `load_settings`), then the defaults below. The defaults run everything on
embedded models: no weights need to be placed for the demo or the tests.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FaceSettings(_Section):
    """Face analysis. `insightface_root` switches detection and embedding to an operator's insightface pack."""

    insightface_root: Path | None = None
    insightface_pack: str = "buffalo_l"
    min_face_px: int = 80
    min_brightness: float = 18.0
    max_brightness: float = 96.0
    min_sharpness: float = 25.0
    min_detector_score: float = 0.8
    low_resolution_face_px: int = 160
    competing_face_ratio: float = 0.5
    max_image_pixels: int = 40_000_000
    crop_size: int = 256


class IdentitySettings(_Section):
    """Identity Net training (client side). `base_model` None means the embedded tiny UNet."""

    base_model: Path | None = None
    base_model_config: Path | None = None  # diffusers-layout SD-1.5 configs + tokenizer, for a single-file base_model
    token: str = "sks"
    class_word: str = "person"
    rank: int = 4
    alpha: float = 4.0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    steps: int = 30
    batch_size: int = 4
    learning_rate: float = 1e-3
    resolution: int = 64
    dp_enabled: bool = True
    noise_multiplier: float | None = 1.0
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    prior_preservation: bool = False
    seed: int = 0


class RenderSettings(_Section):
    """The render node."""

    backend: str = "classic"
    listen: str = "127.0.0.1:50051"
    state_dir: Path = Path("runs/render-node")
    diffusion_base_model: Path | None = None
    diffusion_controlnets: dict[str, Path] = Field(default_factory=dict)


class CoordinatorSettings(_Section):
    """The Flower coordinator."""

    rounds: int = 2
    min_sites: int = 2
    state_dir: Path = Path("runs/coordinator")
    epsilon_budget_per_site: float = 10.0


class PolicySettings(_Section):
    """Where the consent and retention policy files live."""

    consent_file: Path = Path("policies/consent.yaml")
    retention_file: Path = Path("policies/retention.yaml")


class Settings(BaseSettings):
    """All settings, one section per component."""

    model_config = SettingsConfigDict(env_prefix="MEGAPORTRAIT_", env_nested_delimiter="__", extra="forbid")

    faces: FaceSettings = Field(default_factory=FaceSettings)
    identity: IdentitySettings = Field(default_factory=IdentitySettings)
    render: RenderSettings = Field(default_factory=RenderSettings)
    coordinator: CoordinatorSettings = Field(default_factory=CoordinatorSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)


def load_settings(path: str | Path | None = None) -> Settings:
    """Read settings from `path` (or `$MEGAPORTRAIT_CONFIG`), then the environment; errors name the file."""
    path = path or os.environ.get("MEGAPORTRAIT_CONFIG")
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
    try:
        return Settings(**data)
    except ValidationError as exc:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{exc}") from exc
