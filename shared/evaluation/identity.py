"""Identity preservation: is the rendered portrait still the person, and no longer the template's sitter?

Protocol (leave one photo out): for each person and each of their accepted photos, the classic payload carries that
one photo; every render of it is embedded (SFace) and compared with the person's *other* photos (genuine pairs)
and with every photo of the other people (impostor pairs). Verification at the embedder's operating point
(`SFACE_THRESHOLD`, cosine 0.363) gives the true-accept rate (TAR), false-accept rate (FAR) and accuracy over all
pairs. The same renders are repeated with stages switched off (the ablation):
none (the template as it is) / identity only / identity + shading / full (+ harmonize).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from megaportrait.shared.face_analysis import SFACE_THRESHOLD, FaceAnalyzer, cosine, mean_embedding
from megaportrait.shared.portrait_metrics import collateral_change, lighting_correlation, output_face, tone_kept
from megaportrait.shared.records import FaceCropSet, Portrait, StageSwitches
from megaportrait.shared.skin_tone import face_ita

from .dataset import EvalData, Person, Template

if TYPE_CHECKING:
    from megaportrait.server.render.backends import RenderBackend

log = logging.getLogger("megaportrait.evaluation")

ABLATIONS: dict[str, StageSwitches] = {
    "none": StageSwitches(identity=False, shading=False, harmonize=False),
    "identity": StageSwitches(identity=True, shading=False, harmonize=False),
    "identity+shading": StageSwitches(identity=True, shading=True, harmonize=False),
    "full": StageSwitches(identity=True, shading=True, harmonize=True),
}
"""Stage ablations, weakest first; "none" is the control (the template unchanged must not verify as the person)."""


@dataclass(frozen=True)
class RenderScore:
    """One render judged against the person's held-out photos and the other people's photos.

    identity: cosine of the output face to the mean of the held-out photos (None when no face was found);
    genuine / impostor: cosines to each held-out photo / each other person's photo (empty when no face);
    template_leak: cosine to the template's own face; collateral, collateral_delta_e: share of the template's hair and
    background near the face visibly changed and the mean CIE76 difference there (`collateral_change`).
    """

    person: str
    photo: str
    template: str
    stage: str
    face_found: bool
    identity: float | None
    genuine: tuple[float, ...]
    impostor: tuple[float, ...]
    n_genuine_pairs: int
    n_impostor_pairs: int
    template_leak: float | None
    ita_person: float | None
    ita_template: float
    ita_output: float | None
    tone_kept: bool | None
    lighting: float | None
    fallbacks: tuple[str, ...]
    collateral: float | None = None
    collateral_delta_e: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def verification(genuine: list[float], impostor: list[float], n_genuine_missing: int = 0,
                 n_impostor_missing: int = 0, threshold: float = SFACE_THRESHOLD) -> dict:
    """TAR, FAR and accuracy at `threshold` over all pairs. A render with no face counts as a rejection: a miss for
    each of its genuine pairs (`n_genuine_missing`), a correct rejection for its impostor pairs."""
    g = np.asarray(genuine, float)
    i = np.asarray(impostor, float)
    n_g, n_i = len(g) + n_genuine_missing, len(i) + n_impostor_missing
    accepted_g = int((g >= threshold).sum())
    rejected_i = int((i < threshold).sum()) + n_impostor_missing
    tar = accepted_g / n_g if n_g else None
    far = 1 - rejected_i / n_i if n_i else None
    return {
        "threshold": threshold,
        "n_genuine_pairs": n_g,
        "n_impostor_pairs": n_i,
        "tar": tar,
        "far": far,
        "accuracy": (accepted_g + rejected_i) / (n_g + n_i) if n_g + n_i else None,
        "balanced_accuracy": (tar + 1 - far) / 2 if tar is not None and far is not None else None,
        "mean_genuine": float(g.mean()) if len(g) else None,
        "mean_impostor": float(i.mean()) if len(i) else None,
    }


def summarise(scores: list[RenderScore], threshold: float = SFACE_THRESHOLD) -> dict:
    """Verification figures and means over a list of render scores."""
    genuine = [c for s in scores for c in s.genuine]
    impostor = [c for s in scores for c in s.impostor]
    missing = [s for s in scores if not s.face_found]
    out = verification(genuine, impostor, threshold=threshold,
                       n_genuine_missing=sum(s.n_genuine_pairs for s in missing),
                       n_impostor_missing=sum(s.n_impostor_pairs for s in missing))
    ids = [s.identity for s in scores if s.identity is not None]
    leaks = [s.template_leak for s in scores if s.template_leak is not None]
    kept = [s.tone_kept for s in scores if s.tone_kept is not None]
    ita_err = [abs(s.ita_output - s.ita_person) for s in scores if s.ita_output is not None and s.ita_person is not None]
    light = [s.lighting for s in scores if s.lighting is not None]
    coll = [s.collateral for s in scores if s.collateral is not None]
    out.update({
        "n_renders": len(scores),
        "n_no_face": len(missing),
        "mean_identity": float(np.mean(ids)) if ids else None,
        "identity_verified_rate": float(np.mean([v >= threshold for v in ids])) if ids else None,
        "mean_template_leak": float(np.mean(leaks)) if leaks else None,
        "template_leak_verified_rate": float(np.mean([v >= threshold for v in leaks])) if leaks else None,
        "tone_kept_rate": float(np.mean(kept)) if kept else None,
        "n_tone_judged": len(kept),
        "mean_ita_error_deg": float(np.mean(ita_err)) if ita_err else None,
        "mean_lighting": float(np.mean(light)) if light else None,
        "mean_collateral": float(np.mean(coll)) if coll else None,
        "max_collateral": float(np.max(coll)) if coll else None,
    })
    return out


def _photo_ita(person: Person, index: int) -> float | None:
    """ITA of the pasted photo's face (what the person's skin looked like in the photo the render used)."""
    crop = person.accepted[index].crop
    if crop.face.mesh is None:
        return None
    try:
        return face_ita(crop.pixels, crop.face)
    except ValueError:
        return None


def render_portrait(backend: "RenderBackend", template: Template, payload: FaceCropSet, stages: StageSwitches,
                    job_id: str, seed: int = 0) -> Portrait:
    """One render through the backend's ordinary `render` call (no progress reporting)."""
    return backend.render(job_id, template.image, payload, stages=stages, seed=seed, params={},
                          progress=lambda stage, fraction: None)


def run_ablation(backend: "RenderBackend", analyzer: FaceAnalyzer, data: EvalData, stages: dict[str, StageSwitches],
                 *, advance: Callable[[], None] | None = None, keep_example: tuple[str, str] | None = None,
                 ) -> tuple[list[RenderScore], dict[str, np.ndarray]]:
    """Render every (person, pasted photo, template) under every stage setting and score it.

    Returns the scores and, for `keep_example` = (person name, template name), the first photo's render per stage
    (for the report). `advance` is called once per render.
    """
    scores: list[RenderScore] = []
    examples: dict[str, np.ndarray] = {}
    for person in data.people:
        for index in range(len(person.accepted)):
            payload = person.payload(index)
            for template in data.templates:
                for stage, switches in stages.items():
                    job = f"eval-{person.ref[:8]}-{index}-{template.name}-{stage}"
                    portrait = render_portrait(backend, template, payload, switches, job)
                    scores.append(score_render(analyzer, portrait, data, person, index, template, stage))
                    if keep_example == (person.name, template.name) and index == 0:
                        examples[stage] = portrait.pixels
                    if advance:
                        advance()
    return scores, examples


def score_render(analyzer: FaceAnalyzer, portrait: Portrait, data: EvalData, person: Person, index: int,
                 template: Template, stage: str) -> RenderScore:
    """Embed a render's face and compare it with held-out and impostor photos and with the template's face."""
    out_face = output_face(analyzer, portrait.pixels)
    held_out = person.held_out(index)
    others = [e for p in data.people if p.name != person.name for e in p.embeddings()]
    ita_output = None
    if out_face is not None and out_face.mesh is not None:
        try:
            ita_output = face_ita(portrait.pixels, out_face)
        except ValueError:
            ita_output = None
    ita_person = _photo_ita(person, index)
    try:
        light = lighting_correlation(portrait.pixels, template.image.pixels, template.face.box)
    except ValueError:
        light = None
    try:
        coll = collateral_change(portrait.pixels, template.image.pixels, template.face.box)
    except ValueError:
        coll = None
    emb = out_face.embedding if out_face is not None else None
    return RenderScore(
        person=person.name, photo=person.photo_names[index], template=template.name, stage=stage,
        face_found=emb is not None,
        identity=cosine(emb, mean_embedding(held_out)) if emb is not None else None,
        genuine=tuple(cosine(emb, e) for e in held_out) if emb is not None else (),
        impostor=tuple(cosine(emb, e) for e in others) if emb is not None else (),
        n_genuine_pairs=len(held_out), n_impostor_pairs=len(others),
        template_leak=cosine(emb, template.face.embedding) if emb is not None else None,
        ita_person=ita_person, ita_template=template.ita, ita_output=ita_output,
        tone_kept=tone_kept(ita_output, ita_person, template.ita) if ita_person is not None else None,
        lighting=light, fallbacks=tuple(portrait.metadata.get("fallbacks", ()) or ()),
        collateral=None if coll is None else coll.share, collateral_delta_e=None if coll is None else coll.mean_delta_e,
    )
