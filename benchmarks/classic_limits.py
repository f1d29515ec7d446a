"""Where the classic backend loses identity and why 022107 cannot reach lighting 0.9: the figures behind the two
xfail reasons of tests/server/render/classic/test_classic_acceptance.py (issue 17). For the 20 shared pairs (photo _1
pasted, identity against the mean of the person's other photos, as the acceptance test does) it renders each stage
and two hard-edged pastes without shading, tone, grain or blend: the person's whole face region (`uncut`) and the
same region limited to the template's face region below its hairline (`cut`, what issue 17 requires), so the cost of
that limit is seen apart from the blending's. For the flat, light template 022107 it computes the lighting figure of
an ideal render (the template's own luminance with the pasted area scaled to the render's face level) and the face
level that 0.9 would need, with the box ITA that level would give; per pair, a tone-invariant reading of the
lighting figure (`lighting_in_face`). Writes benchmarks/results/classic_limits.json. Run:
`.venv/bin/python benchmarks/classic_limits.py` (about a minute on two cores).
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "classic_limits.json"
DATA = Path(os.environ.get("MEGAPORTRAIT_DATA", REPO.parent / "shared" / "data"))
HARD_EDGE = {"erode": 0.0, "feather": 0.0, "pyramid_levels": 1, "tone_transfer": False, "grain": False}
LIGHT_TEMPLATE = "022107"


def _variants():
    from megaportrait.shared.records import StageSwitches

    paste = StageSwitches(shading=False)
    return {
        "naive_paste": (StageSwitches(shading=False, harmonize=False), {}),
        "uncut": (paste, {**HARD_EDGE, "cut_to_template": False}),
        "cut": (paste, HARD_EDGE),
        "no_shading": (paste, {}),
        "no_harmonize": (StageSwitches(harmonize=False), {}),
        "final": (StageSwitches(), {}),
    }


def _lowpass(lightness: np.ndarray, box) -> np.ndarray:
    from megaportrait.shared import portrait_metrics as pm

    rows, cols = pm._box_slice(box, lightness.shape)
    small = cv2.resize(lightness[rows, cols], (pm.LIGHTING_SIZE, pm.LIGHTING_SIZE), interpolation=cv2.INTER_AREA)
    low = cv2.GaussianBlur(small.astype(np.float64), (0, 0), pm.LIGHTING_SIGMA)
    return (low - low.mean()).ravel()


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def lighting_bound(analyzer, template, render) -> dict:
    """The lighting figure of an ideal render of `render`'s pair: the template's L* with the blend-mask area scaled
    by k (the render's median face L* over the template's there), so its shading is the template's exactly; and the
    k, face L* and box ITA at which that ideal reaches 0.9."""
    from megaportrait.shared import portrait_metrics as pm
    from megaportrait.shared.skin_tone import box_ita

    box, mask = render.template_face.box, render.blend_mask
    lt, lo = pm.lightness(template.pixels), pm.lightness(render.portrait.pixels)
    core = mask > 0.9
    k = float(np.median(lo[core]) / np.median(lt[core]))
    target = _lowpass(lt, box)

    def ideal(scale: float) -> float:
        return _correlation(_lowpass(lt * (1 - mask) + mask * lt * scale, box), target)

    lo_k, hi_k = k, 1.0
    for _ in range(30):
        mid = (lo_k + hi_k) / 2
        lo_k, hi_k = (lo_k, mid) if ideal(mid) >= 0.9 else (mid, hi_k)
    lab = cv2.cvtColor(render.portrait.pixels.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    lab[..., 0] *= 1 - mask + mask * (hi_k / k)
    lifted = np.clip(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    t_box = analyzer.detect(template)[0].box
    return {"render_lighting": round(pm.lighting_correlation(render.portrait.pixels, template.pixels, box), 3),
            "face_level_k": round(k, 3), "ideal_lighting_at_k": round(ideal(k), 3),
            "k_for_0.9": round(hi_k, 3), "face_median_L": round(float(np.median(lo[core])), 1),
            "face_median_L_for_0.9": round(float(hi_k * np.median(lt[core])), 1),
            "box_ita_render": round(box_ita(render.portrait.pixels, t_box), 1),
            "box_ita_at_0.9": round(box_ita(lifted, t_box), 1),
            "box_ita_template": round(box_ita(template.pixels, t_box), 1)}


def lighting_in_face(render, template) -> float:
    """A tone-invariant reading of the same lighting figure, for the decision issue 17 needs: Pearson correlation
    of low-pass log L* over the template's face box, counting only pixels inside the blend mask's core (where the
    render shows the person's skin and the template its own face). A uniform change of the face's skin tone is a
    constant shift of log L* there, which a correlation ignores; the hair and background around the face, whose
    contrast with a darker or lighter face the box figure scores, are left out."""
    from megaportrait.shared import portrait_metrics as pm

    box, core = render.template_face.box, render.blend_mask > 0.9
    rows, cols = pm._box_slice(box, core.shape)
    size = (pm.LIGHTING_SIZE, pm.LIGHTING_SIZE)

    def low(pixels: np.ndarray) -> np.ndarray:
        log_l = np.log(np.maximum(pm.lightness(pixels)[rows, cols].astype(np.float64), 1.0))
        return cv2.GaussianBlur(cv2.resize(log_l, size, interpolation=cv2.INTER_AREA), (0, 0), pm.LIGHTING_SIGMA)

    inside = cv2.resize(core[rows, cols].astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0.99
    a, b = low(render.portrait.pixels)[inside], low(template.pixels)[inside]
    return _correlation(a - a.mean(), b - b.mean())


def main() -> dict:
    from megaportrait.client.faces import face_crop_set, intake_photos
    from megaportrait.server.render.classic import ClassicBackend
    from megaportrait.shared import portrait_metrics as pm
    from megaportrait.shared.config import FaceSettings
    from megaportrait.shared.face_analysis import FaceAnalyzer, mean_embedding
    from megaportrait.shared.imaging import load_image
    from megaportrait.shared.skin_tone import box_ita

    cv2.setNumThreads(2)
    analyzer = FaceAnalyzer()
    backend = ClassicBackend(analyzer)
    people = {}
    for person in ("biden", "obama"):
        photos = sorted((DATA / "people" / person).glob("*.jpg"))
        report = intake_photos(photos, FaceSettings(crop_size=512), analyzer, show_progress=False)
        embeddings = [a.face.embedding for a in report.accepted]
        reference = mean_embedding(embeddings[1:])
        raw = float(embeddings[0] @ reference / (np.linalg.norm(embeddings[0]) * np.linalg.norm(reference)))
        people[person] = (face_crop_set(person, report), reference, raw)
    variants = _variants()
    pairs, bounds = [], {}
    for path in sorted((DATA / "templates").glob("*.jpg")):
        template = load_image(path)
        for person, (payload, reference, _) in people.items():
            row = {"template": path.stem, "person": person}
            for name, (stages, params) in variants.items():
                render = backend.render_detailed("limits", template, payload, stages=stages, seed=7,
                                                 params={"source_crop": 0, **params})
                face = pm.output_face(analyzer, render.portrait.pixels)
                row[name] = {"identity": pm.identity_cosine(face, reference),
                             "leak": pm.identity_cosine(face, render.template_face.embedding)}
                if name == "final":
                    row[name]["lighting"] = pm.lighting_correlation(render.portrait.pixels, template.pixels,
                                                                    render.template_face.box)
                    row[name]["lighting_in_face"] = lighting_in_face(render, template)
                    if path.stem == LIGHT_TEMPLATE:
                        bound = lighting_bound(analyzer, template, render)
                        bound["box_ita_person"] = round(float(np.median(
                            [box_ita(load_image(p).pixels, analyzer.detect(load_image(p))[0].box)
                             for p in sorted((DATA / "people" / person).glob("*.jpg"))])), 1)
                        bounds[person] = bound
            pairs.append(row)
            print(path.stem, person, " ".join(f"{n}={row[n]['identity']:.3f}" for n in variants),
                  f"lighting={row['final']['lighting']:.3f} in_face={row['final']['lighting_in_face']:.3f}", flush=True)

    def mean(name: str, key: str = "identity", person: str | None = None) -> float:
        return round(float(np.mean([r[name][key] for r in pairs if person in (None, r["person"])])), 3)

    summary = {name: {"identity_mean": mean(name), "leak_mean": mean(name, "leak"),
                      **{f"identity_{p}": mean(name, person=p) for p in people},
                      "identity_min": round(min(r[name]["identity"] for r in pairs), 3)} for name in variants}
    finals = [r["final"] for r in pairs]
    summary["final"].update(lighting_min=round(min(f["lighting"] for f in finals), 3),
                            lighting_in_face_min=round(min(f["lighting_in_face"] for f in finals), 3),
                            lighting_in_face_mean=round(float(np.mean([f["lighting_in_face"] for f in finals])), 3))
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "photo_1_vs_reference": {p: round(v[2], 3) for p, v in people.items()},
              "stages": summary, f"lighting_bound_{LIGHT_TEMPLATE}": bounds,
              "pairs": [{k: (v if isinstance(v, str) else {kk: round(vv, 3) for kk, vv in v.items()})
                         for k, v in r.items()} for r in pairs]}
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("photo_1_vs_reference", "stages", f"lighting_bound_{LIGHT_TEMPLATE}")},
                     indent=1))
    return result


if __name__ == "__main__":
    main()
