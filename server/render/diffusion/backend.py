"""`DiffusionBackend`: MegaPortrait's three stages on the operator's Stable Diffusion weights.

Same contract as the classic backend (`render.backends.RenderBackend`): a decrypted identity payload (here an
`IdentityAdapter`) and a template in, a `Portrait` of the template's size out, with the same metadata keys.
Stages run in order on a shared canvas; a switched-off stage is skipped (an ablation). `render_batch` runs several
portraits of one person through each stage together, `batch_size` crops per pipeline call.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from megaportrait.shared import portrait_metrics
from megaportrait.shared.base_models import TINY_MODEL_NOTE
from megaportrait.shared.config import RenderSettings
from megaportrait.shared.errors import MegaPortraitError
from megaportrait.shared.face_analysis import FaceAnalyzer, cosine
from megaportrait.shared.imaging import AI_GENERATED_LABEL
from megaportrait.shared.logs import short_hash
from megaportrait.shared.records import IdentityAdapter, IdentityPayload, Portrait, SourceImage, StageSwitches
from megaportrait.shared.skin_tone import face_ita

from ..backends import ProgressFn
from .conditions import GEOMETRIC
from .framing import FaceFrame, FaceWork, face_region
from .harmonize import run_harmonize
from .identity import run_identity
from .models import DiffusionModels, load_models
from .params import DiffusionParams, parse_params
from .shading import refresh_meshes, run_shading

log = logging.getLogger("megaportrait.render.diffusion")


class WrongPayload(MegaPortraitError):
    """The diffusion backend was given a payload it cannot use (it needs an IdentityAdapter)."""

    reason = "payload_wrong_kind"


class TemplateUnusable(MegaPortraitError):
    """The template has no face the diffusion stages can work on; the message says what is missing."""

    reason = "template_unusable"


@dataclass(frozen=True)
class RenderRequest:
    """One portrait of a batch: a template and the seed to render it with."""

    job_id: str
    template: SourceImage
    seed: int = 0


class DiffusionBackend:
    """Identity / Shading / Harmonization with diffusion models (see the stage modules beside this one).

    settings: the node's render section (models, device, default params). `models` and `analyzer` may be given
    (tests, benchmarks); otherwise they load lazily, once, on the first render.
    """

    name = "diffusion"

    def __init__(self, settings: RenderSettings | None = None, *, models: DiffusionModels | None = None,
                 analyzer: FaceAnalyzer | None = None) -> None:
        self.settings = settings or RenderSettings()
        self._models = models
        self._analyzer = analyzer
        self._lock = threading.Lock()
        # A job loads its person's LoRA into the shared UNet, so jobs on one backend run one at a time.
        self._render_lock = threading.Lock()

    @property
    def models(self) -> DiffusionModels:
        with self._lock:
            if self._models is None:
                self._models = load_models(self.settings)
            return self._models

    @property
    def analyzer(self) -> FaceAnalyzer:
        with self._lock:
            if self._analyzer is None:
                self._analyzer = FaceAnalyzer()
            return self._analyzer

    def params_for(self, job_params: dict | None) -> DiffusionParams:
        """The node's defaults overridden by a job's params, validated (InvalidRenderParams names a bad key)."""
        return parse_params(self.settings.diffusion_params, job_params)

    def render(self, job_id: str, template: SourceImage, identity: IdentityPayload, *, stages: StageSwitches,
               seed: int, params: dict, progress: ProgressFn) -> Portrait:
        """One portrait at the template's size; see `render_batch`."""
        return self.render_batch([RenderRequest(job_id, template, seed)], identity, stages=stages, params=params,
                                 progress=progress)[0]

    def render_batch(self, requests: Sequence[RenderRequest], identity: IdentityPayload, *,
                     stages: StageSwitches, params: dict | None, progress: ProgressFn) -> list[Portrait]:
        """Render one person onto several templates, each stage batched across them.

        Raises WrongPayload (not an adapter), InvalidRenderParams, TemplateUnusable (no face, or no mesh where a
        geometric control needs one), shared.adapters.BaseModelMismatch (adapter of another base model),
        ModelNotFound.
        """
        if not isinstance(identity, IdentityAdapter):
            raise WrongPayload(f"the diffusion backend renders from an IdentityAdapter, got {type(identity).__name__};"
                               " send a face-crop payload to the classic backend instead")
        p = self.params_for(params)
        if not requests:
            return []
        with self._render_lock:
            return self._render_locked(requests, identity, stages, p, progress)

    def _render_locked(self, requests: Sequence[RenderRequest], identity: IdentityAdapter, stages: StageSwitches,
                       p: DiffusionParams, progress: ProgressFn) -> list[Portrait]:
        enabled = stages.enabled()
        models = self.models  # fail on missing weights before any face work
        works = [self._prepare(r, p, enabled) for r in requests]
        for name in p.controls_used(enabled):
            models.controlnet(name)

        def _report(stage: str):
            return lambda frac: progress(stage, frac)

        seconds: dict[str, float] = {}

        runners = (("identity", run_identity), ("shading", run_shading), ("harmonize", run_harmonize))
        with models.identity_lora(identity):
            for stage, run in runners:
                if not getattr(stages, stage):
                    continue
                progress(stage, 0.0)
                started = time.perf_counter()
                if stage == "shading" and stages.identity:
                    refresh_meshes(self.analyzer, works, p.shading.controls)  # the face changed under the mesh
                for w, canvas in zip(works, run(models, works, token=identity.token, params=p,
                                                on_progress=_report(stage))):
                    w.canvas = canvas
                seconds[stage] = (time.perf_counter() - started) / len(works)
                progress(stage, 1.0)
        return [self._portrait(w, identity, p, enabled, seconds) for w in works]

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _prepare(self, request: RenderRequest, p: DiffusionParams, enabled: tuple[str, ...]) -> FaceWork:
        faces = self.analyzer.analyze(request.template, mesh=True, embed=True, largest_only=True)
        if not faces:
            raise TemplateUnusable(f"job {short_hash(request.job_id)}: no face found in the template "
                                   f"({request.template.sha256[:12]})")
        face = faces[0]
        geometric = sorted(GEOMETRIC.intersection(p.controls_used(enabled)))
        if face.mesh is None and geometric:
            raise TemplateUnusable(f"job {short_hash(request.job_id)}: the face mesh could not be fitted on the "
                                   f"template, and controls {geometric} need it; use line-art/canny/tile controls "
                                   "or another template")
        shape = request.template.pixels.shape[:2]
        return FaceWork(job_id=request.job_id, template=request.template.pixels,
                        template_sha256=request.template.sha256, face=face,
                        frame=FaceFrame.around(face, shape, p.resolution, p.crop_scale),
                        face_mask=face_region(face, shape, p.mask_grow), seed=int(request.seed),
                        canvas=request.template.pixels.copy(), face_mesh=face.mesh, fallbacks=[])

    def _portrait(self, w: FaceWork, adapter: IdentityAdapter, p: DiffusionParams, enabled: tuple[str, ...],
                  seconds: dict[str, float]) -> Portrait:
        """The portrait with the classic backend's metadata keys, plus what only diffusion has (models, seeds)."""
        models = self.models
        out = np.ascontiguousarray(w.canvas)
        fallbacks = list(w.fallbacks)
        face = portrait_metrics.output_face(self.analyzer, out)
        ita_out = None
        if face is None:
            fallbacks.append("score:no_face_in_output")
        else:
            ita_out = face_ita(out, face)
        template_cos = (cosine(w.face.embedding, face.embedding)
                        if face is not None and face.embedding is not None and w.face.embedding is not None else None)
        metadata = {
            "backend": self.name,
            "stages": list(enabled),
            "params": p.as_metadata(),
            "seed": int(w.seed),
            "stage_seeds": {"identity": w.seed, "shading": w.seed + 1, "harmonize": w.seed + 2},
            # An adapter carries no reference embedding of the person: nothing to score identity against here.
            "identity_score": None,
            "identity_score_note": "an IdentityAdapter carries no reference embedding",
            "template_identity_cosine": None if template_cos is None else round(template_cos, 4),
            "ita": {"person": None, "template": round(face_ita(w.template, w.face), 2),
                    "output": None if ita_out is None else round(ita_out, 2)},
            "fallbacks": fallbacks,
            "provenance": AI_GENERATED_LABEL,
            "embedder": self.analyzer.embedder,
            "person_ref": adapter.person_ref,
            "template_sha256": w.template_sha256,
            "base_model": {"name": models.base_model.name, "sha256": models.base_model.sha256,
                           "kind": models.base_model.kind},
            "output_note": TINY_MODEL_NOTE if models.base_model.kind == "tiny-embedded" else None,
            "controlnets": {name: models.sources[name] for name in p.controls_used(enabled)},
            "device": str(models.device),
            "dtype": str(models.dtype).replace("torch.", ""),
            "adapter": {"token": adapter.token, "rank": adapter.rank, "epsilon": adapter.privacy.epsilon,
                        "delta": adapter.privacy.delta},
            "seconds": {k: round(v, 4) for k, v in seconds.items()},
        }
        log.info("diffusion render %s: stages=%s fallbacks=%s", short_hash(w.job_id), ",".join(enabled), fallbacks)
        if metadata["output_note"]:
            log.warning("diffusion render %s: %s", short_hash(w.job_id), TINY_MODEL_NOTE)
        return Portrait(job_id=w.job_id, pixels=out, metadata=metadata)
