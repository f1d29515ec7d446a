"""The classic (CPU) render backend: Identity (paste) -> Shading -> Harmonization, each stage switchable.

What each ablation means:
- identity off: the person's face is not pasted; the template's own face is kept (harmonization then only brings
  the template's skin to the person's tone).
- shading off: the pasted face keeps the light of its own photo.
- harmonize off: the (shaded) face is cut in along the person's face oval with a hard edge, template untouched.
`identity` only is the naive paste.

Composite (issue 17). The person's face goes inside the template's face outline, below its hairline; the template's
face skin the person's face does not cover is brought to the person's tone; the template's hair is kept out of that
recolouring by a chroma model of the hair itself; the pyramid blend's change is kept inside the template's face
region, so no halo reaches its hair or background. The metadata reports `collateral`, the share of the template's
hair and background near the face that changed.

Shading scale. How finely the template's light is transferred is a trade: a coarse shading field keeps the
person's own facial structure (identity), a fine one follows the template's light more closely. Which scale is
needed depends on the pair (a flat-lit template, or a person whose skin is much darker or lighter than the
template's, needs a finer one), so by default (`lighting_target` > 0) each render searches for the coarsest scale
whose quick low-resolution preview of the final composite (same masks, tone-moved body and pyramid blend) reaches
the target lighting correlation with the template, measured as issue 10's criterion (c)
(`portrait_metrics.lighting_correlation` over the template's face box). The scale used and the preview's figure are
reported in the metadata under "shading". With `lighting_target=0` the scale is `shading_sigma`, fixed.
Relighting keeps the person's skin level on their cheeks and nose; where person and template tones differ and that
still drags the face box's tone site toward the template's tone, it is redone keeping the whole site's level
(`ClassicParams.lock_tone_site`, reported as shading.tone_site_locked).

`ClassicBackend.render` follows `server.render.backends.RenderBackend`; `render_detailed` also returns the blend mask
and intermediate layers for tests and the evaluation harness.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, fields, replace

import cv2
import numpy as np

from megaportrait.shared import portrait_metrics
from megaportrait.shared.config import FaceSettings
from megaportrait.shared.errors import MegaPortraitError
from megaportrait.shared.face_analysis import FaceAnalyzer, cheek_nose_mask, face_oval_mask, skin_mask
from megaportrait.shared.imaging import AI_GENERATED_LABEL
from megaportrait.shared.logs import short_hash
from megaportrait.shared.records import FaceCropSet, FaceRecord, IdentityPayload, Portrait, SourceImage, StageSwitches
from megaportrait.shared.skin_tone import face_ita, ita_degrees

from .harmonize import (ChromaModel, HarmonizeParams, PersonSegmenter, laplacian_blend, match_grain, noise_level,
                        not_hair, recolor_skin, refine_mask, skin_search_region, skin_tone, skin_weight, to_lab)
from .paste import face_region_mask, hairline_face_region, paste_face
from .shading import (ShadingParams, mesh_normal_map, preview_gain, relight, search_shading_sigma, shade_face,
                      srgb_to_linear, with_sigma)

log = logging.getLogger("megaportrait.render.classic")

BACKEND_NAME = "classic"
PREVIEW_FACE_PX = 96.0
"""Face width at which the shading-scale search previews its composites (the lighting figure looks at the face
box through a 64x64 low-pass, so this loses nothing it measures)."""

TONE_LOCK_GAP = 15.0
"""ITA degrees between the pasted skin and the template's skin beyond which relighting keeps the person's skin
level over the whole tone-reading site of the face box, not only the cheeks and nose (issue 10 (b))."""

TONE_LOCK_SHARE = 1.0 / 3.0
"""Relighting that moves the pasted face's tone site more than this share of the way toward the template's tone (in
ITA) is redone with the person's skin level kept over that whole site (`ClassicParams.lock_tone_site`)."""


class TemplateHasNoFace(MegaPortraitError):
    """The template portrait shows no detectable face, so there is nowhere to put the person's face."""

    reason = "template_no_face"

    def __init__(self, template_sha256: str) -> None:
        super().__init__(f"template {template_sha256[:12]} has no detectable face; choose a portrait with one "
                         "clearly visible, front-facing face")


class InvalidRenderParams(MegaPortraitError):
    """A job's params for the classic backend are unknown or out of range; the message names the key."""

    reason = "invalid_params"


class UnsupportedIdentityPayload(MegaPortraitError):
    """The classic backend needs a FaceCropSet (face crops), not a LoRA adapter."""

    reason = "unsupported_payload"


@dataclass(frozen=True)
class ClassicParams:
    """Every tunable of the classic backend, as a job's `params` dict may set them (unknown keys are refused).

    source_crop: index of the crop in the FaceCropSet whose face is pasted (the site orders crops by preference).
    forehead, grow: how far the pasted region may reach beyond the person's mesh face oval
        (`paste.face_region_mask`): the upper half stretched up by `forehead` x the oval height, the whole oval
        grown by `grow`. Above the brows only skin-coloured pixels count (`paste.hairline_face_region`), so the
        forehead stops at each face's own hairline; with `cut_to_template` (default) the paste is also limited to
        the template's face region found the same way, so the template's hair, headwear, ears and background stay
        (issue 17: `portrait_metrics.collateral_change`). `grow` > 0 brings the person's photo background along.
    feature_weight: 0..1, weight of eyes/brows/lips when estimating shading (0: skin only; 1: the whole face oval,
        so the dark blobs of the person's own photo light around the eyes are divided out like any other shading).
    forehead_shading: 0..1, weight of the stretched forehead (above the mesh oval) when estimating shading, so the
        template's light on its upper forehead carries over.
    lock_tone_site: where the pasted skin's ITA and the template's differ by more than TONE_LOCK_GAP over the face
        box's tone-reading site (issue 10 (b)) and relighting (locked on the cheeks and nose) moves that site more
        than TONE_LOCK_SHARE of the way toward the template's ITA, relighting is redone keeping the person's skin
        level over the whole site (a template's even light otherwise lifted a dark face's brows and eye area toward
        the template's tone: biden x 029748, box ITA 30.1 against his 10.0). Only then: locking costs lighting
        correlation (022107: 0.76 -> 0.67 where the tone was kept anyway).
    tone_from_all_crops: bring the pasted face's skin (median L*, a*, b* of the cheek/nose skin) to the median over
        all the payload's crops before shading, so one photo's exposure or white balance does not decide the
        person's skin tone (skin tone is judged against the person's median over all their photos).
    The rest are the stage parameters, documented in `ShadingParams` and `HarmonizeParams`.
    Defaults were chosen on the 20 acceptance pairs (tests/server/render/classic/test_classic_acceptance.py).
    """

    source_crop: int = 0
    forehead: float = 0.5
    grow: float = 0.0
    shading_sigma: float = ShadingParams.shading_sigma
    periphery: float = ShadingParams.periphery
    detail: float = ShadingParams.detail
    sh_light: bool = ShadingParams.sh_light
    max_gain: float = ShadingParams.max_gain
    style_levels: int = ShadingParams.style_levels
    feature_weight: float = 1.0
    forehead_shading: float = 0.5
    gain_min: float = ShadingParams.gain_min
    gain_max: float = ShadingParams.gain_max
    periphery_sigma: float = ShadingParams.periphery_sigma
    lighting_target: float = ShadingParams.lighting_target
    min_sigma: float = ShadingParams.min_sigma
    erode: float = HarmonizeParams.erode
    feather: float = HarmonizeParams.feather
    pyramid_levels: int = HarmonizeParams.pyramid_levels
    tone_transfer: bool = HarmonizeParams.tone_transfer
    grain: bool = HarmonizeParams.grain
    cut_to_template: bool = HarmonizeParams.cut_to_template
    tone_from_all_crops: bool = True
    lock_tone_site: bool = True

    @classmethod
    def from_dict(cls, params: dict | None) -> "ClassicParams":
        """Parse and check a job's params; raise InvalidRenderParams naming the bad key."""
        params = dict(params or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise InvalidRenderParams(f"unknown classic-backend params {unknown}; known: {sorted(known)}")
        values = {}
        for name, value in params.items():
            default = getattr(cls, name)
            try:
                if isinstance(default, bool):
                    if not isinstance(value, bool):
                        raise TypeError
                    values[name] = value
                elif isinstance(default, int):
                    if isinstance(value, bool) or int(value) != value:
                        raise TypeError
                    values[name] = int(value)
                else:
                    values[name] = float(value)
            except (TypeError, ValueError):
                raise InvalidRenderParams(f"param {name}={value!r} must be a {type(default).__name__}") from None
        parsed = cls(**values)
        checks = {
            "source_crop": parsed.source_crop >= 0,
            "shading_sigma": 0.005 <= parsed.shading_sigma <= 1.0,
            "feature_weight": 0.0 <= parsed.feature_weight <= 1.0,
            "forehead_shading": 0.0 <= parsed.forehead_shading <= 1.0,
            "periphery": 0.0 <= parsed.periphery <= 1.0,
            "detail": 0.0 <= parsed.detail <= 1.0,
            "max_gain": parsed.max_gain == 0.0 or 1.0 < parsed.max_gain <= 10.0,
            "style_levels": 0 <= parsed.style_levels <= 8,
            "gain_min": 0.0 < parsed.gain_min <= 1.0,
            "gain_max": 1.0 <= parsed.gain_max <= 10.0,
            "periphery_sigma": 0.1 <= parsed.periphery_sigma <= 2.0,
            "lighting_target": 0.0 <= parsed.lighting_target < 1.0,
            "min_sigma": 0.005 <= parsed.min_sigma <= 1.0,
            "forehead": 0.0 <= parsed.forehead <= 1.0,
            "grow": 0.0 <= parsed.grow <= 0.5,
            "erode": 0.0 <= parsed.erode <= 0.3,
            "feather": 0.0 <= parsed.feather <= 0.3,
            "pyramid_levels": 1 <= parsed.pyramid_levels <= 8,
        }
        for name, ok in checks.items():
            if not ok:
                raise InvalidRenderParams(f"param {name}={getattr(parsed, name)!r} is out of range")
        return parsed

    def shading(self) -> ShadingParams:
        return ShadingParams(self.shading_sigma, self.periphery, self.detail, self.max_gain, self.sh_light,
                             self.style_levels, self.gain_min, self.gain_max, self.periphery_sigma,
                             self.lighting_target, self.min_sigma)

    def harmonize(self) -> HarmonizeParams:
        return HarmonizeParams(self.erode, self.feather, self.pyramid_levels, self.tone_transfer, self.grain,
                               self.cut_to_template)


@dataclass(frozen=True)
class ClassicRender:
    """A classic render with what tests and evaluation need besides the portrait.

    face_layer: (H, W, 3) uint8, the person's face in the template frame after the stages that ran before blending.
    blend_mask: (H, W) float32 in [0, 1], where the face layer replaced the template.
    template_face: the template's face (template frame, with mesh when fitted).
    person_face: the pasted face record moved into the template frame (None when identity is off).
    """

    portrait: Portrait
    face_layer: np.ndarray
    blend_mask: np.ndarray
    template_face: FaceRecord
    person_face: FaceRecord | None


def _roi(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    y0, y1 = max(int(ys.min()) - margin, 0), min(int(ys.max()) + margin + 1, h)
    x0, x1 = max(int(xs.min()) - margin, 0), min(int(xs.max()) + margin + 1, w)
    return slice(y0, y1), slice(x0, x1)


def _tone_to_all_crops(layer: np.ndarray, region: np.ndarray, identity: FaceCropSet,
                       index: int) -> tuple[np.ndarray, dict]:
    """The pasted layer with its skin moved from crop `index`'s tone to the median tone of all crops (around the
    face `region`, uint8), and what was done: {crops, from, to} (median L*, a*, b*)."""
    tones = [skin_tone(to_lab(c.pixels), cheek_nose_mask(c.face, c.pixels.shape[:2])) for c in identity.crops]
    own, target = tones[index], np.median(np.stack(tones), axis=0)
    rows, cols = _roi(region, 4)
    layer = layer.copy()
    weight = np.ones((rows.stop - rows.start, cols.stop - cols.start), np.float32)
    layer[rows, cols] = recolor_skin(layer[rows, cols], weight, own, target)
    return layer, {"crops": len(tones), "from": [round(float(v), 2) for v in own],
                   "to": [round(float(v), 2) for v in target]}


def _template_hair_model(pixels: np.ndarray, tface: FaceRecord, region: np.ndarray,
                         person_prob: np.ndarray | None) -> ChromaModel | None:
    """Chroma model of the template's hair: the band above its face region up to 1.3 x its face height, on the
    person (segmentation) and unlike its face skin; None when too little of it shows (a bald or hatless head)."""
    shape = pixels.shape[:2]
    if tface.mesh is None:
        return None
    band = face_region_mask(tface, shape, 1.0, 0.3) & ~cv2.dilate(region, np.ones((5, 5), np.uint8))
    if person_prob is not None:
        band &= np.where(person_prob > 0.5, 255, 0).astype(np.uint8)
    if not band.any():
        return None
    rows, cols = _roi(band, 0)
    lab = to_lab(pixels[rows, cols])
    skin = skin_weight(lab, skin_mask(tface, shape)[rows, cols], np.ones(lab.shape[:2], np.float32), 1.0)
    hair = (band[rows, cols] > 0) & (skin < 0.5)
    return ChromaModel.fit(lab, hair.astype(np.uint8), 50)


def _tone_site(box: tuple[float, float, float, float], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 {0, 255}: where skin tone is read in a face box (issue 10 (b), `skin_tone.box_ita`): 25-75 % of
    its width, 25-60 % of its height."""
    x, y, w, h = (float(v) for v in box)
    mask = np.zeros(shape, np.uint8)
    mask[max(int(round(y + 0.25 * h)), 0):max(int(round(y + 0.60 * h)), 0),
         max(int(round(x + 0.25 * w)), 0):max(int(round(x + 0.75 * w)), 0)] = 255
    return mask


def _noop_progress(stage: str, fraction: float) -> None:
    pass


class ClassicBackend:
    """CPU MegaPortrait backend without generative weights. Face models load lazily on first render."""

    name = BACKEND_NAME

    def __init__(self, analyzer: FaceAnalyzer | None = None, settings: FaceSettings | None = None) -> None:
        self._analyzer = analyzer
        self._settings = settings
        self._segmenter = PersonSegmenter()

    @property
    def analyzer(self) -> FaceAnalyzer:
        if self._analyzer is None:
            self._analyzer = FaceAnalyzer(self._settings)
        return self._analyzer

    def render(self, job_id: str, template: SourceImage, identity: IdentityPayload, *, stages: StageSwitches,
               seed: int, params: dict, progress=_noop_progress) -> Portrait:
        """The portrait at the template's size, metadata filled (see `render_detailed`)."""
        return self.render_detailed(job_id, template, identity, stages=stages, seed=seed, params=params,
                                    progress=progress).portrait

    def template_face(self, template: SourceImage) -> tuple[FaceRecord, list[str]]:
        """The template's largest face with mesh and embedding; fallbacks named when the mesh is missing."""
        faces = self.analyzer.detect(template)
        if not faces:
            raise TemplateHasNoFace(template.sha256)
        face = self.analyzer.fit_mesh(template, faces[0])
        face = self.analyzer.embed(template, face)
        return face, ([] if face.mesh is not None else ["template:mesh_missing"])

    def render_detailed(self, job_id: str, template: SourceImage, identity: IdentityPayload, *,
                        stages: StageSwitches = StageSwitches(), seed: int = 0, params: dict | None = None,
                        progress=_noop_progress) -> ClassicRender:
        """Run the enabled stages in order and fill the portrait's metadata.

        metadata: backend, stages, params (all, resolved), seed, identity_score (SFace cosine of the output's face to
        the payload's mean embedding), ita {person, template, output}, collateral {share, mean_delta_e, region_px}
        (`portrait_metrics.collateral_change`: how much of the template's hair and background near the face
        changed), tone (None, or {crops, from, to} when the pasted skin was moved to all crops' median tone), fallbacks (named, empty if none), provenance
        (the AI-generated label), plus embedder, template_sha256, source_sha256, person_ref, seconds per stage and
        shading {sigma: the shading scale used (None when shading did not run), preview_lighting: the search's
        preview figure (None without a search), tone_site_locked: whether relighting kept the person's skin level
        over the whole tone-reading site (`ClassicParams.lock_tone_site`), tone_site_drift: when the tones differ,
        how far (ITA degrees, toward the template's) the cheek-locked relighting moved that site}.
        """
        if not isinstance(identity, FaceCropSet):
            raise UnsupportedIdentityPayload(f"classic backend needs a FaceCropSet, got {type(identity).__name__}")
        p = ClassicParams.from_dict(params)
        if not identity.crops:
            raise InvalidRenderParams("the FaceCropSet holds no crops")
        if p.source_crop >= len(identity.crops):
            raise InvalidRenderParams(f"param source_crop={p.source_crop} but the payload has {len(identity.crops)} crops")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        pixels = template.pixels
        shape = pixels.shape[:2]
        tface, fallbacks = self.template_face(template)
        crop = identity.crops[p.source_crop]
        if crop.face.mesh is None:
            fallbacks.append("source:mesh_missing")
        face_px = float(tface.box[2])
        template_oval = face_oval_mask(tface, shape)
        template_skin = skin_mask(tface, shape)
        # Where the person's face may go: the template's face up to its own hairline (its hair, headwear, ears and
        # background stay as they are).
        template_region = hairline_face_region(pixels, tface, p.forehead, 0.0)
        timings["analyse"] = time.perf_counter() - t0

        # -- Identity: paste the person's face onto the template's, keeping the person's geometry.
        progress("identity", 0.0)
        t = time.perf_counter()
        person_face = None
        tone_info = None
        if stages.identity:
            pasted, taken = paste_face(crop, tface, shape, p.forehead, p.grow)
            fallbacks += taken
            layer, person_face, person_oval = pasted.layer, pasted.face, pasted.oval
            person_skin = skin_mask(person_face, shape) & person_oval
            if p.tone_from_all_crops and len(identity.crops) > 1 and person_oval.any():
                layer, tone_info = _tone_to_all_crops(layer, person_oval, identity, p.source_crop)
        else:
            layer, person_oval, person_skin = pixels.copy(), template_oval, template_skin
        timings["identity"] = time.perf_counter() - t
        progress("identity", 1.0)

        rows, cols = _roi(cv2.bitwise_or(person_oval, template_oval), int(0.5 * face_px))
        region = cv2.GaussianBlur(person_oval[rows, cols].astype(np.float32) / 255.0, (0, 0), max(1.0, 0.02 * face_px))
        hp = p.harmonize()
        # What harmonization will do is settled first: the shading scale search previews the composite.
        t = time.perf_counter()
        if stages.harmonize:
            mask = refine_mask(person_oval, template_region, face_px, hp)
        else:
            mask = (person_oval > 0).astype(np.float32)
        person_prob = None
        if stages.harmonize and hp.tone_transfer:
            try:
                person_prob = self._segmenter(pixels)
            except Exception as exc:  # noqa: BLE001 - any failure of the optional model is a named fallback
                log.warning("person segmentation failed (%s); using position alone", type(exc).__name__)
                fallbacks.append("harmonize:no_person_mask")
        hair_model = None
        if stages.harmonize and hp.tone_transfer:
            hair_model = _template_hair_model(pixels, tface, template_region, person_prob)
            if hair_model is None:
                fallbacks.append("harmonize:no_hair_model")
        harmonize_setup = time.perf_counter() - t

        # -- Shading: the template's light and photographic style on the person's face.
        progress("shading", 0.0)
        t = time.perf_counter()
        shading_info = {"sigma": None, "preview_lighting": None, "tone_site_locked": False}
        if stages.shading and stages.identity:
            layer = layer.copy()
            fw = p.feature_weight
            p_oval = face_oval_mask(person_face, shape)[rows, cols].astype(np.float32) / 255.0
            t_oval = template_oval[rows, cols].astype(np.float32) / 255.0
            p_skin = person_skin[rows, cols].astype(np.float32) / 255.0
            t_skin = template_skin[rows, cols].astype(np.float32) / 255.0
            if p.forehead_shading > 0:
                # The upper forehead (above the mesh oval) is lit like the rest of the face: let it count.
                p_top = face_region_mask(person_face, shape, p.forehead) & ~face_oval_mask(person_face, shape)
                t_top = face_region_mask(tface, shape, p.forehead) & ~template_oval
                p_skin = np.maximum(p_skin, p.forehead_shading * p_top[rows, cols].astype(np.float32) / 255.0)
                t_skin = np.maximum(t_skin, p.forehead_shading * t_top[rows, cols].astype(np.float32) / 255.0)
            p_weight = p_skin + fw * np.clip(p_oval - p_skin, 0, 1)
            t_weight = t_skin + fw * np.clip(t_oval - t_skin, 0, 1)
            face_core = cv2.GaussianBlur(p_oval, (0, 0), max(1.0, 0.03 * face_px))
            p_anchor = cheek_nose_mask(person_face, shape)[rows, cols].astype(np.float32) / 255.0
            site = _tone_site(tface.box, shape) & person_oval
            lock_site = None
            if p.lock_tone_site and site.any():
                ita_person, ita_template = ita_degrees(layer, site), ita_degrees(pixels, site)
                if abs(ita_person - ita_template) > TONE_LOCK_GAP:
                    lock_site = (ita_template - ita_person, ita_person)
            t_anchor = cheek_nose_mask(tface, shape)[rows, cols].astype(np.float32) / 255.0
            sp = p.shading()
            if sp.lighting_target > 0 and not sp.sh_light:
                # (The SH light is not previewed: with it, the fixed shading_sigma only scales the detail on top.)
                weights = (p_weight, t_weight, region, face_core, p_anchor, t_anchor)
                tone = None
                if stages.harmonize and hp.tone_transfer:
                    tone = (template_oval, template_skin, person_prob, person_skin, hair_model)
                fidelity = self._lighting_preview(layer[rows, cols], pixels[rows, cols], weights, mask[rows, cols],
                                                  (rows, cols), tface, face_px, sp, tone,
                                                  hp.pyramid_levels if stages.harmonize else 0)
                sigma, estimate = search_shading_sigma(fidelity, sp)
                sp = with_sigma(sp, sigma)
                shading_info.update(sigma=round(sigma, 4), preview_lighting=round(estimate, 4))
            else:
                shading_info.update(sigma=sp.shading_sigma, preview_lighting=None)
            normals = (self._normals(person_face, tface, rows, cols, face_px, fallbacks) if p.sh_light
                       else (None, None))
            shaded = shade_face(layer[rows, cols], pixels[rows, cols], p_weight, t_weight, region, face_px, sp,
                                face_core, *normals, p_anchor, t_anchor)
            if lock_site is not None:
                gap, before = lock_site
                drift = float(np.sign(gap)) * (ita_degrees(shaded, site[rows, cols]) - before)
                shading_info["tone_site_drift"] = round(drift, 2)
                if drift > TONE_LOCK_SHARE * abs(gap):
                    locked = np.maximum(p_anchor, site[rows, cols].astype(np.float32) / 255.0)
                    shaded = shade_face(layer[rows, cols], pixels[rows, cols], p_weight, t_weight, region, face_px,
                                        sp, face_core, *normals, locked, t_anchor)
                    shading_info["tone_site_locked"] = True
            layer[rows, cols] = shaded
        timings["shading"] = time.perf_counter() - t
        progress("shading", 1.0)

        # -- Harmonization: refined mask, template skin to the person's tone, grain, pyramid blend.
        progress("harmonize", 0.0)
        t = time.perf_counter()
        if stages.harmonize:
            body = pixels
            if hp.tone_transfer:
                if stages.identity:
                    person_tone = skin_tone(to_lab(layer[rows, cols]), person_skin[rows, cols])
                else:
                    person_tone = skin_tone(to_lab(crop.pixels), skin_mask(crop.face, crop.pixels.shape[:2]))
                body = self._tone_body(pixels, template_oval, template_skin, tface, face_px, person_prob, person_tone,
                                       hair_model)
                if not stages.identity:
                    layer = body
            fg = layer[rows, cols]
            if hp.grain:
                target = noise_level(pixels[rows, cols], template_skin[rows, cols])
                fg = match_grain(fg, target, mask[rows, cols], np.random.default_rng(seed))
            out = body.copy()
            blended = laplacian_blend(fg, body[rows, cols], mask[rows, cols], hp.pyramid_levels)
            if hp.cut_to_template:
                # The pyramid's coarse bands spread past the mask; keep their change inside the template's face
                # region so it does not reach the hair and background as a halo.
                keep = cv2.GaussianBlur(template_region[rows, cols].astype(np.float32) / 255.0, (0, 0),
                                        max(0.5, 0.005 * face_px))[..., None]
                base = body[rows, cols].astype(np.float32)
                blended = np.clip(base + (blended.astype(np.float32) - base) * keep + 0.5, 0, 255).astype(np.uint8)
            out[rows, cols] = blended
        else:
            out = np.where(person_oval[..., None] > 0, layer, pixels)
        timings["harmonize"] = time.perf_counter() - t + harmonize_setup
        progress("harmonize", 1.0)

        t = time.perf_counter()
        metadata = self._metadata(out, identity, crop, tface, stages, p, seed, fallbacks, template)
        timings["score"] = time.perf_counter() - t
        metadata["shading"] = shading_info
        metadata["tone"] = tone_info
        metadata["seconds"] = {k: round(v, 4) for k, v in timings.items()}
        log.info("classic render %s: stages=%s identity=%s fallbacks=%s", short_hash(job_id),
                 ",".join(stages.enabled()), metadata["identity_score"], metadata["fallbacks"])
        portrait = Portrait(job_id=job_id, pixels=out, metadata=metadata)
        return ClassicRender(portrait=portrait, face_layer=layer, blend_mask=mask, template_face=tface,
                             person_face=person_face)

    def _lighting_preview(self, person: np.ndarray, template: np.ndarray, weights: tuple, mask: np.ndarray,
                          roi: tuple[slice, slice], tface: FaceRecord, face_px: float, params: ShadingParams,
                          tone: tuple | None, pyramid_levels: int):
        """A function sigma -> lighting correlation (criterion (c), `portrait_metrics.lighting_correlation` over the
        template's face box) of a quick preview: the region of interest shrunk to a PREVIEW_FACE_PX-wide face, the
        person relit at that shading scale and laid over the (tone-moved) template with the blend mask.

        person, template: (h, w, 3) uint8 of the region of interest; weights: (person skin weight, template skin
        weight, region, face core, person anchor, template anchor), each (h, w) float32 there; mask: (h, w) float32
        blend mask; tone: (template oval, template skin, person probability or None, person skin, hair model or
        None), full frame, to
        preview the template's skin moved to the person's tone, or None when harmonization will not do that;
        pyramid_levels: harmonization's Laplacian blend levels at full size, or 0 for its hard paste (harmonize
        off)."""
        rows, cols = roi
        h, w = person.shape[:2]
        scale = min(1.0, PREVIEW_FACE_PX / max(face_px, 1.0))
        size = (max(8, round(w * scale)), max(8, round(h * scale)))

        def small(a: np.ndarray, interp: int = cv2.INTER_AREA) -> np.ndarray:
            return a if scale == 1.0 else cv2.resize(a, size, interpolation=interp)

        p_s, t_s, m_s = small(person), small(template), small(mask)
        w_s = [small(a) for a in weights]
        sx, sy = size[0] / w, size[1] / h
        x, y, bw, bh = tface.box
        box = ((x - cols.start) * sx, (y - rows.start) * sy, bw * sx, bh * sy)
        body = t_s
        if tone is not None:
            t_oval, t_skin, prob, p_skin, hair_model = tone
            near = cv2.INTER_NEAREST
            person_tone = skin_tone(to_lab(p_s), small(p_skin[rows, cols], near))
            moved = (tface.landmarks5 - [cols.start, rows.start]) * [sx, sy]
            face_s = replace(tface, landmarks5=moved.astype(np.float32))
            body = self._tone_body(t_s, small(t_oval[rows, cols], near), small(t_skin[rows, cols], near), face_s,
                                   face_px * scale, None if prob is None else small(prob[rows, cols]), person_tone,
                                   hair_model)
        p_lin = srgb_to_linear(p_s)
        # The same blend as harmonization's, its pyramid shortened by the octaves the preview was shrunk by.
        levels = max(1, pyramid_levels - int(round(np.log2(1.0 / scale)))) if pyramid_levels else 0

        def fidelity(sigma: float) -> float:
            gain = preview_gain(p_s, t_s, w_s[0], w_s[1], w_s[2], face_px * scale, with_sigma(params, sigma), w_s[3],
                                w_s[4], w_s[5])
            relit = relight(p_lin, gain, w_s[4])
            if levels:
                composite = laplacian_blend(relit, body, m_s, levels)
            else:
                composite = np.where(m_s[..., None] > 0.5, relit, body)
            return portrait_metrics.lighting_correlation(composite, t_s, box)

        return fidelity

    @staticmethod
    def _tone_body(pixels: np.ndarray, template_oval: np.ndarray, template_skin: np.ndarray, tface: FaceRecord,
                   face_px: float, person_prob: np.ndarray | None, person_tone: np.ndarray,
                   hair: ChromaModel | None = None) -> np.ndarray:
        """The template with its visible skin brought to the person's tone, not its hair (`hair`: a chroma model of
        the template's hair, see `harmonize.not_hair`). The skin weight is smooth, so it is found at half size on
        large templates; recolouring touches only the box where the weight is nonzero."""
        h, w = pixels.shape[:2]
        scale = 0.5 if max(h, w) > 700 else 1.0
        size = (round(w * scale), round(h * scale))

        def small(a: np.ndarray, interp: int = cv2.INTER_AREA) -> np.ndarray:
            return a if scale == 1.0 else cv2.resize(a, size, interpolation=interp)

        lab = to_lab(small(pixels))
        skin_small = small(template_skin, cv2.INTER_NEAREST)
        search = skin_search_region(small(template_oval, cv2.INTER_NEAREST), tface.landmarks5 * scale,
                                    face_px * scale, None if person_prob is None else small(person_prob))
        weight = skin_weight(lab, skin_small, search, max(1.5, 0.015 * face_px * scale))
        if hair is not None:
            skin_model = ChromaModel.fit(lab, skin_small, 10)
            if skin_model is not None:
                veto = not_hair(lab, skin_model, hair)
                weight = weight * cv2.GaussianBlur(veto, (0, 0), max(1.0, 0.01 * face_px * scale))
        if scale != 1.0:
            weight = cv2.resize(weight, (w, h), interpolation=cv2.INTER_LINEAR)
        ys, xs = np.nonzero(weight > 1e-3)
        body = pixels.copy()
        if ys.size:
            box = slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)
            body[box] = recolor_skin(pixels[box], weight[box], skin_tone(lab, skin_small), person_tone)
        return body

    @staticmethod
    def _normals(person: FaceRecord, template: FaceRecord, rows: slice, cols: slice, face_px: float,
                 fallbacks: list[str]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Surface-normal maps of both faces over the region of interest, or (None, None) without both meshes."""
        if person.mesh is None or template.mesh is None:
            fallbacks.append("shading:ratio_only_no_mesh")
            return None, None
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        offset = np.array([cols.start, rows.start, 0], np.float32)
        smooth = max(1.0, 0.03 * face_px)
        return (mesh_normal_map(person.mesh - offset, shape, smooth), mesh_normal_map(template.mesh - offset, shape, smooth))

    def _metadata(self, out: np.ndarray, identity: FaceCropSet, crop, tface: FaceRecord, stages: StageSwitches,
                  p: ClassicParams, seed: int, fallbacks: list[str], template: SourceImage) -> dict:
        face = portrait_metrics.output_face(self.analyzer, out)
        score = None
        ita_out = None
        if face is None:
            fallbacks.append("score:no_face_in_output")
        else:
            ita_out = face_ita(out, face)
            if face.embedder == identity.embedder:
                score = portrait_metrics.identity_cosine(face, identity.mean_embedding)
            else:
                fallbacks.append("score:embedder_mismatch")
        return {
            "backend": BACKEND_NAME,
            "stages": list(stages.enabled()),
            "params": asdict(p),
            "seed": int(seed),
            "identity_score": None if score is None else round(score, 4),
            "ita": {"person": round(face_ita(crop.pixels, crop.face), 2),
                    "template": round(face_ita(template.pixels, tface), 2),
                    "output": None if ita_out is None else round(ita_out, 2)},
            "fallbacks": list(fallbacks),
            "provenance": AI_GENERATED_LABEL,
            "embedder": self.analyzer.embedder,
            "person_ref": identity.person_ref,
            "template_sha256": template.sha256,
            "source_sha256": crop.source_sha256,
            "collateral": portrait_metrics.collateral_change(out, template.pixels, tface.box).as_dict(),
        }
