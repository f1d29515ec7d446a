"""Fixtures for the diffusion backend tests: tiny models built in code, real templates made small, LoRA adapters.

Everything runs at a 64-px crop with 2-3 sampler steps, so a whole three-stage render takes about a second on a
2-core CPU; these tests check plumbing (masks, seeds, LoRA, switches), not image quality.
"""
from __future__ import annotations

import os
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from megaportrait.shared.config import RenderSettings
from megaportrait.shared.records import IdentityAdapter, PrivacyReport, SourceImage

# The same tests run on a GPU (fp16, fused attention) with MEGAPORTRAIT_TEST_DIFFUSION_DEVICE=cuda.
DEVICE = os.environ.get("MEGAPORTRAIT_TEST_DIFFUSION_DEVICE", "cpu")

_FAST_PARAMS = {
    "resolution": 64,
    "scheduler": "ddim",
    "identity": {"steps": 3},
    "shading": {"steps": 3, "strength": 0.67},
    "harmonize": {"steps": 3, "strength": 0.67},
}


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    torch.set_num_threads(1)  # other suites share 2 cores; more threads spin and run ~100x slower


@pytest.fixture(scope="session")
def tiny_models():
    """The render node's models with no weights configured: the tiny base model and tiny ControlNets."""
    from megaportrait.server.render.diffusion.models import load_models

    return load_models(RenderSettings(diffusion_device=DEVICE))


@pytest.fixture(scope="session")
def analyzer():
    from megaportrait.shared.face_analysis import FaceAnalyzer

    return FaceAnalyzer()


@pytest.fixture(scope="session")
def backend(tiny_models, analyzer):
    from megaportrait.server.render.diffusion.backend import DiffusionBackend

    return DiffusionBackend(RenderSettings(diffusion_device=DEVICE), models=tiny_models, analyzer=analyzer)


@pytest.fixture(scope="session")
def small_templates(templates) -> list[SourceImage]:
    """Three real template portraits at 40 % size (about 192 x 240 px, faces 55-100 px)."""
    from megaportrait.shared.imaging import load_image

    out = []
    for path in templates[:3]:
        px = load_image(path).pixels
        small = cv2.resize(px, (int(px.shape[1] * 0.4), int(px.shape[0] * 0.4)), interpolation=cv2.INTER_AREA)
        out.append(SourceImage.from_array(small, origin=path.name))
    return out


def _make_adapter(base_model, *, seed: int = 0, zero: bool = False) -> IdentityAdapter:
    """An identity adapter in the client's layout (`client.identity.lora_state_dict`) with seeded random lora_B
    (as after training) or all-zero lora_B (as before training: no effect)."""
    from megaportrait.client.identity import attach_lora, lora_state_dict
    from megaportrait.shared.config import IdentitySettings
    from megaportrait.shared.tiny_models import tiny_unet

    settings = IdentitySettings(rank=4, alpha=4.0)
    unet = attach_lora(tiny_unet(0), settings)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.zeros_like(p) if zero else torch.randn(p.shape, generator=gen) * 0.5)
    return IdentityAdapter(
        person_ref=f"{seed:064x}", token=settings.token, rank=settings.rank, alpha=settings.alpha,
        target_modules=tuple(settings.target_modules), lora_state=lora_state_dict(unet), base_model=base_model,
        privacy=PrivacyReport(epsilon=4.0, delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.0, steps=10,
                              sample_rate=0.5, accountant="rdp"),
        photo_sha256=("0" * 64,))


@pytest.fixture(scope="session")
def adapter(tiny_models) -> IdentityAdapter:
    return _make_adapter(tiny_models.base_model, seed=1)


@pytest.fixture(scope="session")
def zero_adapter(tiny_models) -> IdentityAdapter:
    return _make_adapter(tiny_models.base_model, seed=1, zero=True)


@pytest.fixture(scope="session")
def other_base_adapter(adapter) -> IdentityAdapter:
    return replace(adapter, base_model=replace(adapter.base_model, sha256="f" * 64, name="another-model"))


@pytest.fixture
def fast_params() -> dict:
    """Job params for a 64-px crop, 3 sampler steps per stage (a fresh copy per test)."""
    import copy

    return copy.deepcopy(_FAST_PARAMS)


@pytest.fixture(scope="session")
def face_mask_of(backend):
    """template -> (face mask (H, W) uint8 {0, 255} in template pixels as the backend draws it, face record)."""
    from megaportrait.server.render.diffusion.framing import face_region

    def _mask(template: SourceImage) -> tuple[np.ndarray, object]:
        p = backend.params_for(_FAST_PARAMS)
        face = backend.analyzer.analyze(template, embed=False, largest_only=True)[0]
        return face_region(face, template.pixels.shape[:2], p.mask_grow), face

    return _mask
