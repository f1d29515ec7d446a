"""The demo's HTML report (`shared.report`): images side by side with their scores, privacy figures, revocation,
audit and timings. Built from the run's summary dict plus the in-memory images; a revoked person's images are
replaced by a placeholder (their likeness leaves the report with their consent), their numbers stay."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from megaportrait.shared.face_analysis import SFACE_THRESHOLD
from megaportrait.shared.report import Figure, Section, write_report

from .render import VARIANTS, RenderRecord

THUMB = 220


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def placeholder(text: str, size: tuple[int, int] = (200, 160)) -> np.ndarray:
    """A grey (H, W, 3) uint8 tile with `text`, standing in for an image that must not be shown."""
    h, w = size
    tile = np.full((h, w, 3), 200, np.uint8)
    for i, line in enumerate(text.split("\n")):
        cv2.putText(tile, line, (8, 30 + 22 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (60, 60, 60), 1, cv2.LINE_AA)
    return tile


def contact_sheet(crops: list[np.ndarray], side: int = 128) -> np.ndarray:
    """Crops side by side at `side` px each, with a 4-px white gap."""
    tiles = []
    for c in crops:
        tiles.append(cv2.resize(c, (side, side), interpolation=cv2.INTER_AREA))
        tiles.append(np.full((side, 4, 3), 255, np.uint8))
    return np.concatenate(tiles[:-1], axis=1)


def _collateral_pct(rec: RenderRecord) -> str:
    """The render's collateral change (share of template hair/background changed) in percent, or "n/a"."""
    share = (rec.metadata.get("collateral") or {}).get("share")
    return "n/a" if share is None else f"{100 * share:.2f}"


def _identity_caption(rec: RenderRecord) -> str:
    if rec.state != "succeeded":
        return f"failed: {rec.error}"
    if rec.identity is None:
        ident = "identity n/a (no held-out photo)" if rec.face_found else "no face found in output"
    else:
        ident = f"identity {rec.identity:.2f} {'verified' if rec.identity >= SFACE_THRESHOLD else 'NOT verified'}"
    return f"{ident}; ITA {_fmt(rec.ita_output, 1)}"


def _eps(value: float | None) -> str:
    """An epsilon for the report; inf (None in JSON) is a release without noise."""
    return "infinite (no DP)" if value is None or value == float("inf") else f"{value:.2f}"


def _curve_section(curve: dict) -> Section:
    """The privacy-utility curve (shared.demo.curve): what it is, what it does not show at demo scale, its points
    and its plot."""
    sec = Section("Privacy-utility curve (demo scale)")
    if not curve["points"]:
        sec.paragraphs.append(f"No curve: {curve['skipped']}.")
        return sec
    who = ", ".join(f"{name} ({n} photos trained, 1 held out)" for name, n in curve["people"].items())
    losses = [r["heldout_denoising_loss"] for r in curve["points"]]
    lo, hi = min(losses), max(losses)
    sec.paragraphs += [
        f"For each noise multiplier z (DP-SGD; 'none' trains without DP), an adapter was trained on all but one "
        f"photo of {who}, "
        f"{curve['steps']} steps as the personal adapters; its denoising loss on the held-out photo is the utility "
        "(lower is better). Epsilon per photo is Opacus' figure for that training (delta 1e-5); epsilon per person "
        "is group privacy over the person's trained photos. Same library function as megaportrait eval "
        "(shared.evaluation.lira.privacy_utility_curve); these adapters are an evaluation at the site, discarded "
        "after scoring and not in the site's privacy ledger.",
        "What it shows: how much privacy each noise level buys, per photo and per person, for one person's few "
        "photos (more noise, smaller epsilon; no noise, no guarantee at all). What it does not show: a utility "
        f"trend. Here the held-out loss spans {lo:.4f} to {hi:.4f} ({100 * (hi - lo) / lo:.2f} % apart) across the "
        "noise levels; from one held-out photo, a few steps and the tiny random base model that is no evidence "
        "that any noise level costs or keeps quality. benchmarks/results/eval/privacy_audit.json holds the "
        "full-size curve beside the membership audit. Identity on this curve needs a configured base model "
        "(megaportrait eval --base-model PATH renders each noise level's adapter and scores its face); the demo has "
        "only the tiny random model, so it has none.",
        f"Took {curve['seconds']:.0f} s.",
    ]
    sec.tables.append((("noise multiplier z", "epsilon per photo", "epsilon per person", "held-out denoising loss",
                        "people"),
                       [("none (no DP)" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:g}",
                         _eps(r["epsilon_per_photo"]), _eps(r["epsilon_per_person"]),
                         f"{r['heldout_denoising_loss']:.4f}", r["people"]) for r in curve["points"]]))
    if curve["plot"]:
        pixels = np.asarray(Image.open(curve["plot"]).convert("RGB"), dtype=np.uint8)
        sec.image_rows.append([Figure(pixels, "held-out denoising loss against epsilon per photo and per person "
                                      "(log scale); the dotted line is the adapter without DP", max_side=660,
                                      height=440)])
    return sec


def write(path: Path, summary: dict, roster, sites, records: list[RenderRecord],
          diffusion: RenderRecord | None) -> Path:
    """Write report.html at `path`; returns its absolute path."""
    revoked = summary["revocation"]["person"]
    sec = summary["seconds"]
    templates = {t.name: t for t in roster.templates}
    people = {p.name: p for s in sites for p in s.people}
    full = [r for r in records if r.variant == "full" and r.state == "succeeded"]
    scored = [r for r in full if r.identity is not None]
    sections: list[Section] = []

    # -- overview
    head = Section("What ran")
    fed = summary["federation"]
    head.paragraphs += [
        f"{len(summary['sites'])} simulated customer sites with {len(summary['people'])} consented people took part in "
        f"{fed['run_config']['num-server-rounds']} federated DP round(s) of the global Identity Net adapter "
        f"(Flower simulation, secure aggregation {'on' if fed['run_config']['secure-aggregation'] else 'OFF'}); "
        f"personal adapters were fine-tuned at the sites; payloads were sealed (HPKE, site-signed) to a render node "
        f"served over mutual-TLS gRPC on 127.0.0.1:{summary['render_node'].get('port')}; {len(records)} classic "
        f"render job(s) ran onto {len(roster.templates)} template(s); consent of '{revoked}' was revoked end to end; "
        f"every audit log was verified. Total time {sec.get('total_before_report', 0):.0f} s before this report.",
        "Consent is simulated: the demo grants it on each person's behalf, as their site would record it. The photos "
        "are official portraits of US federal officials (presumed public domain) from the shared photo set and "
        "scikit-image's astronaut portrait; use the results only to look at the system, do not publish generated "
        "likenesses of these people. All renders are labelled AI-generated in their PNG metadata.",
    ]
    head.paragraphs += [f"Note: {n}" for n in summary["notes"]]
    rows = [("classic renders (full) with a face found", f"{sum(r.face_found for r in full)} / {len(full)}"),
            (f"full renders verified as the person (held-out photos, threshold {SFACE_THRESHOLD})",
             f"{sum(r.identity >= SFACE_THRESHOLD for r in scored)} / {len(scored)}")]
    for variant in VARIANTS:
        vals = [r.identity for r in records if r.variant == variant and r.identity is not None]
        if vals:
            rows.append((f"mean identity, {VARIANTS[variant][0]}", _fmt(float(np.mean(vals)))))
    for s in summary["privacy"]:
        rows.append((f"epsilon of {s['site']}, per photo (every training run on its photos) / per person (up to "
                     f"{s['largest_person']} photos, global adapter) / per site (its own ledger, delta {s['delta']:g})",
                     " / ".join(_eps(s[k]) for k in ("per_photo", "per_person", "per_site"))))
    for s in fed["sites"]:
        rows.append((f"per-site epsilon of {s['site']} (federation noise, coordinator's accountant)",
                     _fmt(s.get("site_epsilon"))))
    rows.append(("revocation complete and checked", _fmt(summary["revocation"]["ok"])))
    rows.append(("every audit log verifies", _fmt(all(a["ok"] for a in summary["audit"]))))
    head.tables.append((("figure", "value"), rows))
    sections.append(head)

    # -- sites and people
    people_sec = Section("Sites and the people they hold")
    people_sec.paragraphs.append(
        "Each site keeps its people's photos, crops, adapters and collected portraits in its own stores, under a "
        "pseudonymous reference; names appear only in this local report. People with one photo are sitters of "
        "template portraits that are not rendered onto, or the astronaut: they take part in training and get "
        "portraits, but have no held-out photo to score identity against and too few photos for a personal adapter.")
    people_sec.tables.append((
        ("site", "person", "ref", "uploaded", "accepted", "refused", "consent", "photos from"),
        [(p["site"], p["name"], p["ref"], p["uploads"], p["accepted"], len(p["rejected"]),
          ", ".join(p["purposes"]) + (f" ({p['consent_note']})" if p["consent_note"] else ""), p["provenance"])
         for p in summary["people"]]))
    refused = [(p["site"], p["name"], r["file"], r["reason"], r["detail"], r["note"] or "-")
               for p in summary["people"] for r in p["rejected"]]
    sections.append(people_sec)
    intake = Section("Intake: uploads refused or flagged")
    intake.paragraphs.append("Intake refused these uploads, each with its reason; the rest of each batch went on. "
                             "Flagged photos were accepted with a warning.")
    intake.tables.append((("site", "person", "file", "reason", "detail", "why it is here"), refused or
                          [("-", "-", "-", "none refused", "-", "-")]))
    flags = [(p["site"], p["name"], f, ", ".join(v)) for p in summary["people"] for f, v in p["flags"].items()]
    if flags:
        intake.tables.append((("site", "person", "file", "accepted with flags"), flags))
    sections.append(intake)

    # -- federation
    fsec = Section("Federated training of the global adapter (differential privacy)")
    rc = fed["run_config"]
    fsec.paragraphs.append(
        f"{rc['num-server-rounds']} round(s), {rc['local-steps']} local DP-SGD step(s) per site per round on the tiny "
        f"in-code base model (64 px), per-photo clipping and noise (Opacus), client-side update clipping, "
        + ("the federation's noise added by each site before SecAgg+ masking (the coordinator only unmasks a noised "
           "sum)" if rc['secure-aggregation'] else "the federation's noise added by the coordinator (secure "
           "aggregation off: the coordinator is trusted)")
        + f". Per-photo epsilon is each site's cumulative figure from its own Opacus accountant (privacy ledger); "
        f"per-site epsilon is the coordinator's accountant for the federation's noise; the per-photo budget the "
        f"coordinator enforces is {fed['budget_per_site']} (deploy/docs/privacy.md). Took {fed['seconds']:.0f} s.")
    fsec.tables.append((("site", "people trained on", "crops", "rounds", "epsilon per photo (site)", "delta",
                         "epsilon per photo (coordinator's record)", "epsilon per site (coordinator)",
                         "refused rounds"),
                        [(s["site"], ", ".join(s["people"]), _fmt(s["n_examples"]), ", ".join(map(str, s["rounds"])),
                          s["epsilon"], f"{s['delta']:g}", _fmt(s["coordinator_epsilon"]),
                          _fmt(s.get("site_epsilon")), len(s["refused"]))
                         for s in fed["sites"]]))
    for site, why in fed["left_out"].items():
        fsec.paragraphs.append(f"{site} sat out: {why}.")
    for fb in fed["fallbacks"]:
        fsec.paragraphs.append(f"Fallback taken: {fb}.")
    sections.append(fsec)

    # -- adapters
    asec = Section("Personal adapters (kept at the site)")
    asec.paragraphs.append(
        "Each person's adapter is fine-tuned at their site from the site's latest global adapter with DP-SGD; it is "
        "never federated. 'epsilon, this run' covers the personalisation alone; 'with the site's rounds' composes it "
        "with the site's global rounds in the site's accountant (the person's photos took part in both).")
    asec.tables.append((("site", "person", "crops", "steps", "noise", "epsilon, this run", "with the site's rounds",
                         "delta", "global round", "seconds", "skipped because"),
                        [(a["site"], a["person"], a["n_crops"] or "-", a["steps"] or "-", _fmt(a["noise_multiplier"]),
                          _fmt(a["epsilon"]), _fmt(a["composed_epsilon"]),
                          "-" if a["delta"] is None else f"{a['delta']:g}", _fmt(a["global_round"]),
                          _fmt(a["seconds"], 1) if not a["skipped"] else "-", a["skipped"] or "-")
                         for a in summary["adapters"]]))
    sections.append(asec)
    sections.append(_curve_section(summary["privacy_utility"]))

    # -- classic renders
    rsec = Section("Portraits (classic backend, through the render node)")
    rsec.paragraphs.append(
        "The payload carries the person's first usable photo (an aligned face crop). Identity: SFace cosine of the "
        f"portrait's face to the mean of the person's other photos (verified at {SFACE_THRESHOLD}); 'vs pasted' is "
        "the cosine to the pasted photo itself. ITA (degrees, higher is lighter): the person's pasted photo, the "
        "template and the portrait; 'tone kept' says whether the portrait is closer to the person's tone than to "
        "the template's (judged only when they differ by more than 15 degrees). 'collateral %': share of the "
        "template's hair and background near the face that the portrait visibly changed (CIE76 > 12; "
        "shared.portrait_metrics.collateral_change, from the render's metadata). Variants switch stages off: "
        "identity only is the naive paste.")
    rsec.tables.append((("person", "template", "variant", "identity", "verified", "vs pasted", "ITA person",
                         "ITA template", "ITA portrait", "tone kept", "collateral %", "fallbacks", "seconds at node"),
                        [(r.person, r.template, r.variant, _fmt(r.identity),
                          _fmt(None if r.identity is None else r.identity >= SFACE_THRESHOLD), _fmt(r.identity_payload),
                          _fmt(r.ita_person, 1), _fmt(r.ita_template, 1), _fmt(r.ita_output, 1), _fmt(r.tone_kept),
                          _collateral_pct(r), ", ".join(r.fallbacks) or "-", _fmt(r.seconds, 2))
                         if r.state == "succeeded" else
                         (r.person, r.template, r.variant, "failed", r.error, *[""] * 7, _fmt(r.seconds, 2))
                         for r in records]))
    by_pair: dict[tuple[str, str], dict[str, RenderRecord]] = {}
    for r in records:
        by_pair.setdefault((r.person, r.template), {})[r.variant] = r
    for (name, tname), variants in by_pair.items():
        person = people[name]
        row = []
        if name == revoked:
            row.append(Figure(placeholder("sources withdrawn:\nconsent revoked"), f"{name}: sources withdrawn"))
        else:
            crops = [a.crop.pixels for a in person.accepted]
            row.append(Figure(contact_sheet(crops), f"{name}: sources (first one pasted; {len(crops)} usable)",
                              max_side=2 * THUMB))
        t = templates[tname]
        row.append(Figure(t.image.pixels, f"template {tname} (ITA {t.ita:.1f})", max_side=THUMB))
        for variant in VARIANTS:
            rec = variants.get(variant)
            if rec is None:
                continue
            label = VARIANTS[variant][0]
            if rec.pixels is None:
                px = placeholder("withdrawn:\nconsent revoked" if name == revoked else f"failed:\n{rec.error[:28]}")
                row.append(Figure(px, f"{label}: {'withdrawn (consent revoked)' if name == revoked else rec.error}"))
            else:
                row.append(Figure(rec.pixels, f"{label}: {_identity_caption(rec)}", max_side=THUMB))
        rsec.image_rows.append(row)
    sections.append(rsec)

    if summary["refusals"]:
        csec = Section("Renders refused for consent")
        csec.paragraphs.append("The site checks consent before it seals anything; these people's renders stopped "
                               "there and nothing was sent to the render node.")
        csec.tables.append((("site", "person", "purpose", "reason", "message"),
                            [(r["site"], r["person"], r["purpose"], r["reason"], r["message"])
                             for r in summary["refusals"]]))
        sections.append(csec)

    # -- diffusion
    if diffusion is not None:
        dsec = Section("Diffusion backend with the personal adapter (TINY RANDOM MODEL, not a portrait)")
        dsec.paragraphs.append(
            "This render runs MegaPortrait's diffusion stages on the tiny model built in code, with random weights: "
            "it shows the adapter payload path (the person's DP adapter sealed to the node, loaded into the UNet for "
            "the job and unloaded after), not image quality. Real portraits need the operator's Stable Diffusion "
            "weights on a GPU host (deploy/README.md).")
        d = summary["diffusion"]
        dsec.tables.append((("person", "template", "state", "turnaround s", "face found", "identity", "params"),
                            [(d["person"], d["template"], d["state"] if d["state"] else "-", _fmt(d["turnaround_s"], 1),
                              _fmt(d["face_found"]), _fmt(d["identity"]), str(d.get("params"))[:300])]))
        t = templates[diffusion.template]
        row = [Figure(t.image.pixels, f"template {t.name}", max_side=THUMB)]
        if diffusion.pixels is not None:
            row.append(Figure(diffusion.pixels, "tiny random model output (not a portrait)", max_side=THUMB))
        else:
            row.append(Figure(placeholder("withdrawn:\nconsent revoked" if diffusion.person == revoked else
                                          "failed"), diffusion.error or "withdrawn (consent revoked)"))
        dsec.image_rows.append(row)
        sections.append(dsec)

    # -- revocation
    rv = summary["revocation"]
    vsec = Section(f"Revocation: '{rv['person']}' at {rv['site']}")
    vsec.paragraphs.append(
        "shared.consent.revoke_person revoked the person's receipts, deleted their data from every site store and "
        "checked nothing can be read back, asked the render node over gRPC to delete their jobs (destroying each "
        "job's data key) and verified the node's signed deletion statement with the node's public key. The global "
        "adapter keeps the clipped, noised contribution of past rounds (bounded by the site's epsilon); the person is "
        "out of every later round. Their images are withdrawn from this report.")
    vsec.tables.append((("step", "result"), [
        ("receipts revoked", rv["receipts_revoked"]),
        *[(f"deleted from site store {k}", f"{v} item(s)") for k, v in rv["site_deleted"].items()],
        ("render node jobs deleted (signed statement)", len(rv["node_jobs_deleted"])),
        ("per-job data keys destroyed", rv["node_keys_destroyed"]),
        ("node statement re-verified from the site's ledger", _fmt(rv["node_statement_verified"])),
        ("revocation complete",
         _fmt(rv["complete"]) + (f" (pending: {', '.join(rv['pending'])})" if rv["pending"] else "")),
    ]))
    vsec.tables.append((("check after revocation", "passed", "detail"),
                        [(what, "PASS" if ok else "FAIL", detail) for what, ok, detail in rv["checks"]]))
    sections.append(vsec)

    # -- audit
    ausec = Section("Audit logs")
    ausec.paragraphs.append("Each component's log is hash-chained and signed entry by entry, with signed "
                            "checkpoints; verification needs only the component's public key.")
    ausec.tables.append((("component", "entries", "checkpoints", "verifies", "refused/failed entries", "actions"),
                         [(a["component"], a["entries"], a["checkpoints"], "yes" if a["ok"] else "NO: " +
                           "; ".join(a["problems"][:3]), a["refused"],
                           ", ".join(f"{k} x{v}" for k, v in sorted(a["actions"].items()))) for a in summary["audit"]]))
    sections.append(ausec)

    # -- templates and timing
    tsec = Section("Templates")
    tsec.tables.append((("template", "ITA", "band", "source"),
                        [(t["file"], t["ita"], t["band"], t["provenance"]) for t in summary["templates"]]))
    sections.append(tsec)
    timing = Section("Timing")
    m = summary["machine"]
    timing.paragraphs.append(f"{m['cpus']} CPU(s), torch {m['torch']} with {m['torch_threads']} thread(s), Python "
                             f"{m['python']}; load average at the end "
                             f"{', '.join(f'{x:.1f}' for x in m['load_average'])}.")
    timing.tables.append((("step", "seconds"), [(k, f"{v:.1f}") for k, v in sec.items()]))
    sections.append(timing)

    subtitle = f"run folder {summary['run_dir']}" + (" (quick run)" if summary["quick"] else "")
    return write_report(path, "MegaPortrait demo", sections, subtitle=subtitle)
