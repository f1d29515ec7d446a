"""Shading Net: re-render the pasted face with the template's shading and colours.

Geometry and line structure are read off the face the identity stage produced (its mesh -> normals/depth, its
pixels -> line art); colour comes from the template: the face is first given the template face's colour
statistics, then a ControlNet img2img pass at `shading.strength` re-lights it under those structural constraints.
Only pixels inside the face mask change.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Sequence

import cv2
import numpy as np

from megaportrait.shared.face_analysis import FaceAnalyzer
from megaportrait.shared.logs import short_hash

from .conditions import GEOMETRIC, colour_hint, control_image
from .framing import FaceWork, face_size, inner_feather
from .models import DiffusionModels, StepFn, run_pipeline
from .params import DiffusionParams

log = logging.getLogger("megaportrait.render.diffusion")
STAGE = "shading"


def match_colour(pixels: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`pixels` with its CIELAB mean and spread inside `mask` moved to those of `reference` inside `mask`.

    pixels, reference: (S, S, 3) uint8 RGB; mask: (S, S) uint8, nonzero = face. Outside the mask is unchanged.
    """
    sel = mask > 0
    if not sel.any():
        return pixels.copy()
    src = cv2.cvtColor(pixels, cv2.COLOR_RGB2LAB).astype(np.float32)
    ref = cv2.cvtColor(reference, cv2.COLOR_RGB2LAB).astype(np.float32)
    s_mean, s_std = src[sel].mean(axis=0), src[sel].std(axis=0) + 1e-3
    r_mean, r_std = ref[sel].mean(axis=0), ref[sel].std(axis=0) + 1e-3
    moved = src.copy()
    moved[sel] = (src[sel] - s_mean) * (r_std / s_std) + r_mean
    out = cv2.cvtColor(moved.clip(0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)
    out[~sel] = pixels[~sel]
    return out


def identity_face_mesh(analyzer: FaceAnalyzer, work: FaceWork) -> np.ndarray | None:
    """The mesh of the face now on the canvas (template pixels), fitted in the template face's box; None if the
    mesh model finds no face there."""
    fitted = analyzer.fit_mesh(work.canvas, replace(work.face, mesh=None))
    return fitted.mesh


def refresh_meshes(analyzer: FaceAnalyzer, works: Sequence[FaceWork], controls: Sequence[str]) -> None:
    """Refit each work's mesh on its identity face when a geometric control needs it; where the mesh model finds
    no face, keep the template's mesh and record that as a fallback."""
    if not GEOMETRIC.intersection(controls):
        return
    for w in works:
        mesh = identity_face_mesh(analyzer, w)
        if mesh is None:
            log.warning("job %s: no face mesh found on the identity face; shading's geometric controls use "
                        "the template's mesh", short_hash(w.job_id))
            w.fallbacks.append("shading:template_mesh")
        else:
            w.face_mesh = mesh


def run_shading(models: DiffusionModels, works: Sequence[FaceWork], *, token: str, params: DiffusionParams,
                on_progress: StepFn | None = None) -> list[np.ndarray]:
    """New (H, W, 3) uint8 canvases whose face region is re-shaded to the template's light and colour."""
    stage = params.shading
    crops = [w.frame.crop(w.canvas) for w in works]
    refs = [w.frame.crop(w.template) for w in works]
    masks = [w.frame.crop_mask(w.face_mask) for w in works]
    meshes = [w.frame.mesh_to_crop(w.face_mesh) if w.face_mesh is not None else None for w in works]
    starts = [match_colour(c, r, m) for c, r, m in zip(crops, refs, masks)]
    controls = [[colour_hint(r) if name == "color" else control_image(name, c, mesh)
                 for c, r, mesh in zip(crops, refs, meshes)] for name in stage.controls]
    pipe = models.img2img_pipeline(stage.controls, params.scheduler)
    faces = run_pipeline(pipe, prompt=params.prompt.format(token=token), negative_prompt=params.negative_prompt,
                         stage=stage, images=starts, controls=controls, seeds=[w.seed + 1 for w in works],
                         batch_size=params.batch_size, on_progress=on_progress)
    return [w.frame.paste(face, w.canvas, inner_feather(w.face_mask, params.feather * face_size(w.face)))
            for w, face in zip(works, faces)]
