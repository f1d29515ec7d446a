"""CPU backend: landmark paste, relighting and harmonisation without generative weights.

Stages: `paste` (MegaPortrait's Identity), `shading`, `harmonize`; `backend.ClassicBackend` runs them in order.
"""
from .backend import ClassicBackend, ClassicParams, ClassicRender, InvalidRenderParams, TemplateHasNoFace

__all__ = ["ClassicBackend", "ClassicParams", "ClassicRender", "InvalidRenderParams", "TemplateHasNoFace"]
