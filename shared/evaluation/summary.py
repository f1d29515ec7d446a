"""The evaluation's HTML summary (one self-contained file, `shared.report`): headline figures, tables per question,
the plots and a few example renders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from megaportrait.shared.report import Figure, Section, write_report


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)


def sections(result: dict, examples: dict[str, np.ndarray], paths: dict[str, Path]) -> list[Section]:
    """The report's sections, in reading order."""
    meta, ident, fair, rob, priv = (result[k] for k in ("meta", "identity", "fairness", "robustness", "privacy"))
    out = []

    people = ", ".join(f"{n} ({v['photos_accepted']} photos, ITA {_f(v['ita'], 1)}, {v['band']})"
                       for n, v in meta["people"].items())
    data = Section("Data and run", paragraphs=[
        f"People: {people}. Templates: {len(meta['templates'])}. Backend: {meta['backend']}; embedder "
        f"{meta['embedder']}; verification threshold (cosine) {ident['threshold']}.",
        f"Run: {'quick' if meta['quick'] else 'full'}, {meta['seconds']['total']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in meta['seconds'].items() if k != 'total')}).",
        "Left out: " + ("; ".join(f"{s['what']} {s['name']}: {s['reason']}" for s in meta["skipped"]) or "nothing") + ".",
        "Fallbacks taken by the backend: " + (", ".join(f"{k} x{v}" for k, v in meta["fallbacks"].items()) or "none") + ".",
    ])
    out.append(data)

    rows = [[s, v["n_renders"], v["tar"], v["far"], v["accuracy"], v["mean_genuine"], v["mean_impostor"],
             v["mean_template_leak"], v["template_leak_verified_rate"], v["mean_lighting"],
             None if v.get("mean_collateral") is None else 100 * v["mean_collateral"]]
            for s, v in ident["by_stage"].items()]
    sec = Section("Identity preservation by stage", paragraphs=[ident["protocol"] + ".",
                  "TAR: share of genuine pairs at or above the threshold; FAR: share of impostor pairs at or above it; "
                  "template leak: cosine of the render to the template sitter's own face (the 'none' row is the "
                  "template itself, a control); collateral %: mean share of the template's hair and background near "
                  "the face that the render visibly changed (CIE76 > 12)."],
                  tables=[(["stages", "renders", "TAR", "FAR", "accuracy", "mean genuine", "mean impostor",
                            "template leak", "leak >= thr", "lighting r", "collateral %"], rows)])
    if "identity_plot" in paths:
        sec.image_rows.append([Figure(_png(paths["identity_plot"]), "cosines by stage", max_side=820)])
    if examples:
        sec.image_rows.append([Figure(px, cap, max_side=300) for cap, px in examples.items()])
    out.append(sec)

    fsec = Section("Fairness by skin tone (ITA bands, full renders)")
    for key, title in (("template_band", "template's band"), ("person_band", "person's band")):
        g = fair[key]
        fsec.paragraphs.append(f"By {title}: {g['verdict']}")
        fsec.tables.append(([f"{title}", "renders", "people", "templates", "mean identity", "TAR", "FAR",
                             "template leak", "tone kept", "|ITA err| deg"],
                            [[b, v["n_renders"], v["n_people"], v["n_templates"], v["mean_identity"], v["tar"], v["far"],
                              v["mean_template_leak"], v["tone_kept_rate"], v["mean_ita_error_deg"]]
                             for b, v in g["by_band"].items()]))
        gaps = [f"{fig} {d['gap']:.3f} ({d['highest']} > {d['lowest']})" for fig, d in g["gaps"].items() if d]
        fsec.paragraphs.append(f"Gaps by {title}: " + ("; ".join(gaps) if gaps else "none measurable") + ".")
    if "fairness_plot" in paths:
        fsec.image_rows.append([Figure(_png(paths["fairness_plot"]), "identity by band", max_side=820)])
    out.append(fsec)

    rsec = Section("Robustness to poor source photos", paragraphs=[
        f"Each source photo degraded and sent through intake again; accepted ones rendered in full on "
        f"{', '.join(rob['templates'])}. Drop = clean render's identity minus the degraded one's (positive = worse). "
        "Failure rate = share of photo x template cases with no verified portrait (refused, no face, or below "
        "threshold)."])
    rrows = []
    for kind, v in rob["by_degradation"].items():
        for r in v["levels"]:
            reasons = ", ".join(f"{k} x{n}" for k, n in r["refusal_reasons"].items()) or "-"
            rrows.append([kind, f"{r['level']:g} ({v['unit']})", f"{r['n_refused']}/{r['n_photos']}", reasons,
                          r["mean_identity"], r["mean_drop"], r["failure_rate"]])
    rsec.tables.append((["degradation", "level", "refused", "reasons", "mean identity", "mean drop", "failure rate"],
                        rrows))
    if "robustness_plot" in paths:
        rsec.image_rows.append([Figure(_png(paths["robustness_plot"]), "robustness", max_side=1000)])
    out.append(rsec)

    if priv is not None:
        s = priv["settings"]
        psec = Section("Privacy: LiRA membership audit of Identity Net adapters", paragraphs=[
            f"{s['adapters']} adapters per arm, {s['photos_per_adapter']} pool photo(s) each from a pool of "
            f"{s['pool_size']} face crops, {min(priv['adapter_rows'])} to {max(priv['adapter_rows'])} rows in all (a "
            "person's photo count); each adapter in turn is the target, the others its shadows; per-photo scores are "
            "LiRA likelihood ratios (offline, against the shadows that did not train on the photo"
            + ("; each adapter's median loss reduction over the pool subtracted first" if s.get(
                "adapter_calibration") else "") + "). Intervals are 95 % bootstraps over photos. Setting: "
            + priv["setting_note"] + ".",
            f"Verdict: {priv['verdict']}. A DP result is compared with the bound its epsilon implies: "
            "TPR <= e^eps * FPR + delta."])
        rows = []
        for arm, a in priv["arms"].items():
            ci = a.get("ci95", {}).get("auc")
            rows.append([arm, a.get("auc"), f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else "-", a.get("tpr_at_fpr_1pct"),
                         a.get("tpr_at_fpr_0.1pct"),
                         "none (no DP)" if a.get("epsilon_per_photo") is None else a["epsilon_per_photo"],
                         a.get("bound_tpr_at_fpr_1pct", "-"), a.get("person_level", {}).get("auc", "-"),
                         a.get("canary", {}).get("exposure_mean", "-")])
        psec.tables.append((["arm", "AUC", "95% CI", "TPR @ FPR 1%", "TPR @ FPR 0.1%", "epsilon per photo",
                             "bound on TPR @ 1%", "person-level AUC", "canary exposure"], rows))
        curve = priv.get("curve", [])
        with_identity = any("render_identity" in r for r in curve)
        psec.tables.append((["noise multiplier", "epsilon per photo", "epsilon per person", "held-out denoising loss"]
                            + (["render identity (SFace cosine to the held-out photo)"] if with_identity else []),
                            [["none" if r["noise_multiplier"] is None else r["noise_multiplier"],
                              r["epsilon_per_photo"], r["epsilon_per_person"], r["heldout_denoising_loss"]]
                             + ([_render_identity_cell(r.get("render_identity"))] if with_identity else [])
                             for r in curve]))
        psec.paragraphs.append(_curve_identity_note(curve))
        if "privacy_plot" in paths:
            psec.image_rows.append([Figure(_png(paths["privacy_plot"]), "LiRA ROC and privacy-utility curve",
                                           max_side=1000, height=440)])
        out.append(psec)
    return out


def _render_identity_cell(ri: dict | None) -> str:
    if ri is None:
        return "-"
    if ri["mean_cosine"] is None:
        return "none: no face detected in any render"
    missing = len(ri["by_person"]) - ri["faces_found"]
    return f"{ri['mean_cosine']:.3f}" + (f" ({missing} render(s) without a face left out)" if missing else "")


def _curve_identity_note(curve: list[dict]) -> str:
    """What the curve's identity axis rests on, or that it needs a configured base model."""
    ri = next((r["render_identity"] for r in curve if r.get("render_identity")), None)
    if ri is None:
        return ("Identity on the privacy-utility curve needs a configured base model (megaportrait eval --base-model "
                "PATH); this run has the held-out denoising loss only.")
    base = ri["base_model"]
    return (f"Render identity: each noise level's adapter, trained on base model {base['name']} ({base['kind']}, "
            f"UNet {base['sha256'][:12]}), renders the person onto template {ri['template']} with the diffusion "
            "backend (identity stage only, plain inpainting); the render's face is compared with the held-out photo "
            "(SFace cosine). A render without a detectable face has no score.")


def write_summary(result: dict, examples: dict[str, np.ndarray], paths: dict[str, Path], path: Path) -> Path:
    """Write the HTML summary to `path`."""
    sub = ("Images below are AI-generated renders of real people for evaluation only; do not publish them. "
           f"Started {result['meta']['started_at']}.")
    return write_report(path, "MegaPortrait evaluation", sections(result, examples, paths), subtitle=sub)
