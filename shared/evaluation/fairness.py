"""Fairness: the identity figures of full renders grouped by skin tone, and the gap between groups.

Two groupings, both by ITA band (`shared.skin_tone`), measured on faces, never assumed:
- by the template's band: does the method keep identity equally well whatever the template's skin tone?
- by the person's band (median ITA over their accepted photos): does it work equally well for everyone?
A grouping is only conclusive when it has at least two groups and every group holds enough distinct subjects
(`MIN_PEOPLE_PER_GROUP` people, `MIN_TEMPLATES_PER_GROUP` templates); otherwise the report says so plainly.
"""
from __future__ import annotations

from typing import Iterable

from .dataset import EvalData
from .identity import RenderScore, summarise

MIN_PEOPLE_PER_GROUP = 5
MIN_TEMPLATES_PER_GROUP = 3
GAP_FIGURES = ("mean_identity", "tar", "accuracy", "mean_template_leak", "tone_kept_rate", "mean_ita_error_deg")
BAND_ORDER = ("very light", "light", "intermediate", "tan", "brown", "dark")


def group_scores(scores: Iterable[RenderScore], key: str, bands: dict[str, str | None]) -> dict[str, list[RenderScore]]:
    """Scores grouped by the band of `key` ("template" or "person"); `bands` maps that name to its band."""
    groups: dict[str, list[RenderScore]] = {}
    for s in scores:
        band = bands.get(getattr(s, key)) or "unmeasured"
        groups.setdefault(band, []).append(s)
    return {b: groups[b] for b in sorted(groups, key=lambda b: BAND_ORDER.index(b) if b in BAND_ORDER else 99)}


def gaps(by_group: dict[str, dict]) -> dict[str, dict | None]:
    """For each figure: the best and worst group and their difference (max - min); None with fewer than 2 groups."""
    out: dict[str, dict | None] = {}
    for fig in GAP_FIGURES:
        vals = {g: s[fig] for g, s in by_group.items() if s.get(fig) is not None}
        if len(vals) < 2:
            out[fig] = None
            continue
        hi, lo = max(vals, key=vals.get), min(vals, key=vals.get)
        out[fig] = {"gap": vals[hi] - vals[lo], "highest": hi, "lowest": lo}
    return out


def grouping(scores: list[RenderScore], key: str, bands: dict[str, str | None], min_subjects: int) -> dict:
    """Per-band summaries, gaps, subject counts and whether the grouping can support a conclusion."""
    groups = group_scores(scores, key, bands)
    by_group = {}
    for band, members in groups.items():
        summary = summarise(members)
        summary["n_people"] = len({s.person for s in members})
        summary["n_templates"] = len({s.template for s in members})
        summary["subjects"] = sorted({getattr(s, key) for s in members})
        by_group[band] = summary
    counts = {b: g["n_people" if key == "person" else "n_templates"] for b, g in by_group.items()}
    enough = len(by_group) >= 2 and all(n >= min_subjects for n in counts.values())
    subjects = "people" if key == "person" else "templates"
    counted = ", ".join(f"{b}: {n}" for b, n in counts.items()) or "none"
    if enough:
        verdict = f"Every band has at least {min_subjects} {subjects}; the gaps are indicative at this sample size."
    else:
        verdict = (f"Too few {subjects} to conclude: {counted} (need at least {min_subjects} per band, in at least "
                   "2 bands).")
        if len(by_group) < 2:
            verdict += f" All {subjects} fall in one band, so no gap between bands can be measured."
        else:
            verdict += f" The gaps below describe these particular {subjects}, not skin-tone groups."
    return {"by_band": by_group, "gaps": gaps(by_group), "subjects_per_band": counts, "conclusive": enough,
            "verdict": verdict}


def fairness_report(scores: list[RenderScore], data: EvalData, stage: str = "full") -> dict:
    """Both groupings of the `stage` renders (default: full renders), with every subject's measured ITA."""
    chosen = [s for s in scores if s.stage == stage]
    return {
        "stage": stage,
        "template_band": grouping(chosen, "template", {t.name: t.band for t in data.templates}, MIN_TEMPLATES_PER_GROUP),
        "person_band": grouping(chosen, "person", {p.name: p.band for p in data.people}, MIN_PEOPLE_PER_GROUP),
        "templates": {t.name: {"ita": t.ita, "band": t.band} for t in data.templates},
        "people": {p.name: {"ita": p.ita, "band": p.band, "n_photos": len(p.accepted)} for p in data.people},
    }
