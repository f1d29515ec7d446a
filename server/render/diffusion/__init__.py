"""GPU backend: diffusers pipelines with the identity LoRA and ControlNets, on the operator's weights.

Stages: identity.py, shading.py, harmonize.py; models.py loads weights, conditions.py draws control images,
framing.py holds the crop and masks, params.py the knobs, backend.py the `DiffusionBackend` that runs them.
"""
from __future__ import annotations

from typing import Any

__all__ = ["DiffusionBackend"]


def __getattr__(name: str) -> Any:
    # Lazy, so importing the package (e.g. for the backend registry) loads no torch or diffusers.
    if name == "DiffusionBackend":
        from .backend import DiffusionBackend

        return DiffusionBackend
    raise AttributeError(name)
