"""Robustness: how much identity a portrait loses when the pasted source photo is poor.

Each accepted source photo is degraded (low light, low resolution, blur, JPEG), at three severities from mild to
severe, and sent through the site's intake again. A degraded photo that intake refuses is a refusal with its reason
(the system said no rather than render badly). An accepted one is rendered in full on the same templates as the
clean photo, and its identity (cosine to the person's held-out photos) is compared with the clean render's: the drop.

Degradations are pure functions: (H, W, 3) uint8 RGB in, (h, w, 3) uint8 RGB out (low resolution shrinks the image).
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass, replace
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from megaportrait.client.faces import intake_photo
from megaportrait.shared.config import FaceSettings
from megaportrait.shared.errors import PhotoRejected
from megaportrait.shared.face_analysis import SFACE_THRESHOLD, FaceAnalyzer
from megaportrait.shared.imaging import load_image
from megaportrait.shared.records import SourceImage

from .dataset import EvalData, Template
from .identity import ABLATIONS, RenderScore, render_portrait, score_render

log = logging.getLogger("megaportrait.evaluation")


def low_light(pixels: np.ndarray, exposure: float, *, seed: int = 0) -> np.ndarray:
    """Under-exposure: linear light times `exposure` (0 < exposure <= 1), plus sensor noise that grows as the
    signal shrinks (shot noise, Gaussian approximation, full well ~ 1000 electrons at exposure 1)."""
    rng = np.random.default_rng(seed)
    x = pixels.astype(np.float32) / 255.0
    lin = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4) * exposure
    full_well = 1000.0
    lin = lin + rng.normal(0.0, 1.0, lin.shape) * np.sqrt(np.maximum(lin, 0) / full_well + 1e-6)
    lin = np.clip(lin, 0.0, 1.0)
    y = np.where(lin <= 0.0031308, lin * 12.92, 1.055 * np.power(lin, 1 / 2.4) - 0.055)
    return np.clip(y * 255.0 + 0.5, 0, 255).astype(np.uint8)


def low_resolution(pixels: np.ndarray, face_px: float, target_face_px: float) -> np.ndarray:
    """The whole photo shrunk (area interpolation) so that a face of `face_px` becomes `target_face_px` wide."""
    scale = min(1.0, target_face_px / max(face_px, 1.0))
    h, w = pixels.shape[:2]
    size = (max(int(round(w * scale)), 1), max(int(round(h * scale)), 1))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA) if scale < 1 else pixels.copy()


def blur(pixels: np.ndarray, face_px: float, sigma_fraction: float) -> np.ndarray:
    """Gaussian defocus with sigma = `sigma_fraction` x the face size, so the loss of detail is the same at every
    photo resolution."""
    return cv2.GaussianBlur(pixels, (0, 0), max(sigma_fraction * face_px, 0.3))


def jpeg(pixels: np.ndarray, quality: int) -> np.ndarray:
    """Re-encoded as a baseline JPEG at `quality` (1-95, 4:2:0 chroma subsampling) and decoded again."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=int(quality), subsampling=2)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.uint8)


@dataclass(frozen=True)
class Degradation:
    """A named degradation and its severities (mild to severe) in its own unit."""

    kind: str
    unit: str
    levels: tuple[float, ...]

    def apply(self, pixels: np.ndarray, face_px: float, level: float, seed: int = 0) -> np.ndarray:
        if self.kind == "low_light":
            return low_light(pixels, level, seed=seed)
        if self.kind == "low_resolution":
            return low_resolution(pixels, face_px, level)
        if self.kind == "blur":
            return blur(pixels, face_px, level)
        if self.kind == "jpeg":
            return jpeg(pixels, int(level))
        raise ValueError(f"unknown degradation {self.kind!r}")


DEGRADATIONS = (
    Degradation("low_light", "exposure (x linear light)", (0.35, 0.12, 0.04)),
    Degradation("low_resolution", "face width (px)", (128.0, 80.0, 48.0)),
    Degradation("blur", "Gaussian sigma (x face width)", (0.002, 0.004, 0.008)),
    Degradation("jpeg", "JPEG quality", (30.0, 12.0, 4.0)),
)


@dataclass(frozen=True)
class RobustnessCase:
    """One degraded photo: refused by intake (with its reason) or rendered on each robustness template."""

    person: str
    photo: str
    kind: str
    level: float
    severity: int  # 0 = mildest
    refused: str | None
    refusal_detail: str | None
    flags: tuple[str, ...]
    scores: tuple[RenderScore, ...]
    clean_identity: tuple[float | None, ...]  # the clean photo's full render on the same templates, same order

    def drops(self) -> list[float]:
        return [c - s.identity for s, c in zip(self.scores, self.clean_identity)
                if s.identity is not None and c is not None]


def run_robustness(backend, analyzer: FaceAnalyzer, data: EvalData, templates: list[Template],
                   clean: list[RenderScore], settings: FaceSettings | None = None, *,
                   degradations: tuple[Degradation, ...] = DEGRADATIONS, photos_per_person: int | None = None,
                   advance: Callable[[], None] | None = None) -> list[RobustnessCase]:
    """Degrade each person's first `photos_per_person` accepted photos (all when None), re-run intake and a full
    render on `templates`, and pair each render with the clean one from `clean` (full-stage scores)."""
    settings = settings or FaceSettings()
    clean_id = {(s.person, s.photo, s.template): s.identity for s in clean if s.stage == "full"}
    cases: list[RobustnessCase] = []
    for person in data.people:
        n = len(person.accepted) if photos_per_person is None else min(photos_per_person, len(person.accepted))
        for index in range(n):
            accepted = person.accepted[index]
            source = load_image(accepted.origin)
            photo = person.photo_names[index]
            for deg in degradations:
                for severity, level in enumerate(deg.levels):
                    pixels = deg.apply(source.pixels, accepted.face.quality.face_px, level, seed=index)
                    image = SourceImage.from_array(pixels, origin=f"{person.ref[:8]}/{index}:{deg.kind}@{level:g}")
                    clean_row = tuple(clean_id.get((person.name, photo, t.name)) for t in templates)
                    try:
                        degraded = intake_photo(image, analyzer, settings)
                    except PhotoRejected as exc:
                        cases.append(RobustnessCase(person.name, photo, deg.kind, level, severity, exc.reason,
                                                    exc.detail, (), (), clean_row))
                        if advance:
                            advance(len(templates))
                        continue
                    swapped = replace(person, accepted=[*person.accepted[:index], degraded, *person.accepted[index + 1:]])
                    payload = swapped.payload(index)
                    scores = []
                    for t in templates:
                        job = f"eval-robust-{person.ref[:8]}-{index}-{deg.kind}-{severity}-{t.name}"
                        portrait = render_portrait(backend, t, payload, ABLATIONS["full"], job)
                        scores.append(score_render(analyzer, portrait, data, swapped, index, t, "full"))
                        if advance:
                            advance(1)
                    cases.append(RobustnessCase(person.name, photo, deg.kind, level, severity, None, None,
                                                degraded.flags, tuple(scores), clean_row))
    return cases


def summarise_robustness(cases: list[RobustnessCase], degradations: tuple[Degradation, ...] = DEGRADATIONS,
                         threshold: float = SFACE_THRESHOLD) -> dict:
    """Per degradation and severity: refusals (by reason), mean identity, mean drop from clean, verified rate, and
    failure rate (share of photo x template cases without a verified portrait: refused, no face, or below the
    threshold); and whether drop (within 0.02), refusals and failures grow with severity."""
    out: dict[str, dict] = {}
    for deg in degradations:
        rows = []
        for severity, level in enumerate(deg.levels):
            group = [c for c in cases if c.kind == deg.kind and c.severity == severity]
            if not group:
                continue
            refused = [c for c in group if c.refused]
            reasons: dict[str, int] = {}
            for c in refused:
                reasons[c.refused] = reasons.get(c.refused, 0) + 1
            ids = [s.identity for c in group for s in c.scores if s.identity is not None]
            drops = [d for c in group for d in c.drops()]
            no_face = sum(1 for c in group for s in c.scores if s.identity is None)
            n_cases = sum(len(c.clean_identity) for c in group)
            verified = sum(1 for v in ids if v >= threshold)
            rows.append({
                "severity": severity, "level": level, "n_photos": len(group), "n_refused": len(refused),
                "refusal_reasons": reasons, "n_renders": sum(len(c.scores) for c in group), "n_no_face": no_face,
                "flags": sorted({f for c in group for f in c.flags}),
                "mean_identity": float(np.mean(ids)) if ids else None,
                "mean_drop": float(np.mean(drops)) if drops else None,
                "max_drop": float(np.max(drops)) if drops else None,
                "verified_rate": float(np.mean([v >= threshold for v in ids])) if ids else None,
                "failure_rate": 1.0 - verified / n_cases if n_cases else None,
            })
        drops = [r["mean_drop"] for r in rows if r["mean_drop"] is not None]
        refusals = [r["n_refused"] / r["n_photos"] for r in rows]
        failures = [r["failure_rate"] for r in rows if r["failure_rate"] is not None]
        out[deg.kind] = {
            "unit": deg.unit,
            "levels": rows,
            "drop_grows_with_severity": all(b >= a - 0.02 for a, b in zip(drops, drops[1:])),
            "refusals_grow_with_severity": all(b >= a for a, b in zip(refusals, refusals[1:])),
            "failures_grow_with_severity": all(b >= a for a, b in zip(failures, failures[1:])),
        }
    return out
