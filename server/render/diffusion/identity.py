"""Identity Net: paint the person's face into the template's face region, in the template's pose.

The base model with the person's LoRA inpaints the face mask of the template crop, prompted with the adapter's
token and steered by ControlNets on the template's face structure (landmark sketch, depth...). The result is
pasted back with an alpha that is 0 outside the face mask, so every pixel outside it stays the template's.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .conditions import control_image
from .framing import FaceWork, face_size, inner_feather
from .models import DiffusionModels, StepFn, run_pipeline
from .params import DiffusionParams

STAGE = "identity"


def identity_controls(crop: np.ndarray, mesh: np.ndarray | None, controls: Sequence[str]) -> list[np.ndarray]:
    """The template-structure control images for one (S, S, 3) crop and its mesh in crop pixels."""
    return [control_image(name, crop, mesh) for name in controls]


def run_identity(models: DiffusionModels, works: Sequence[FaceWork], *, token: str, params: DiffusionParams,
                 on_progress: StepFn | None = None) -> list[np.ndarray]:
    """New (H, W, 3) uint8 canvases with the person's face generated inside each face mask (needs the LoRA loaded)."""
    stage = params.identity
    crops = [w.frame.crop(w.canvas) for w in works]
    masks = [w.frame.crop_mask(w.face_mask) for w in works]
    meshes = [w.frame.mesh_to_crop(w.face_mesh) if w.face_mesh is not None else None for w in works]
    per_crop = [identity_controls(c, m, stage.controls) for c, m in zip(crops, meshes)]
    controls = [[pc[k] for pc in per_crop] for k in range(len(stage.controls))]
    pipe = models.inpaint_pipeline(stage.controls, params.scheduler)
    faces = run_pipeline(pipe, prompt=params.prompt.format(token=token), negative_prompt=params.negative_prompt,
                         stage=stage, images=crops, masks=masks, controls=controls, seeds=[w.seed for w in works],
                         batch_size=params.batch_size, on_progress=on_progress)
    return [w.frame.paste(face, w.canvas, inner_feather(w.face_mask, params.feather * face_size(w.face)))
            for w, face in zip(works, faces)]
