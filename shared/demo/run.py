"""The demo from start to end, each step timed and shown with a progress bar; writes report.html and demo.json.

Steps: prepare (templates and people) -> sites (consent, uploads, intake) -> federation (DP rounds) -> adapters
(personal, DP) -> privacy-utility curve -> render node (mTLS gRPC on loopback) -> classic renders (+ ablations) ->
diffusion render (tiny model) -> revocation -> audit verification -> report. The render node is stopped and every
site's ledger closed even when a step fails.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..report import json_default
from .settings import DemoError, DemoSettings

log = logging.getLogger("megaportrait.demo")

REPORT_NAME = "report.html"
JSON_NAME = "demo.json"


@dataclass
class DemoOutcome:
    """Where the run went and its JSON summary (the same dict as demo.json)."""

    run_dir: Path
    report: Path
    summary_path: Path
    summary: dict


def run_dir_for(settings: DemoSettings) -> Path:
    """The run's folder, created; an existing non-empty one is refused (a run never mixes with another's files)."""
    out = Path(settings.out_dir)
    if settings.timestamped:
        out = out / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if out.exists() and any(out.iterdir()):
        raise DemoError(f"output folder {out} is not empty; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out.resolve()


def run_demo(settings: DemoSettings, *, show_progress: bool = True, console=None, quiet: bool = False) -> DemoOutcome:
    """Run every step; returns the report's path and the summary. Raises DemoError (or the step's own error).
    `quiet`: keep the simulated sites' Flower/Ray log lines out of the terminal."""
    import cv2  # noqa: F401 - OpenCV before torch's thread setting (see DemoSettings.torch_threads)
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from megaportrait.shared.face_analysis import FaceAnalyzer

    from . import report
    from .curve import privacy_utility
    from .federate import personalise_people, run_federation
    from .render import render_diffusion, render_portraits, start_render_node
    from .revoke import revoke_one, verify_logs
    from .roster import build_roster, check_inputs
    from .sites import prepare_sites

    console = console or Console(stderr=True)
    started = time.perf_counter()
    check_inputs(settings)
    run_dir = run_dir_for(settings)
    work = run_dir / "work"
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.torch_threads)
    timings: dict[str, float] = {}
    notes: list[str] = []
    sites, node = [], None
    columns = (TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())

    @contextmanager
    def step(name: str, label: str, total: int | None, progress: Progress):
        task = progress.add_task(label, total=total)
        t = time.perf_counter()
        yield lambda n=1: progress.advance(task, n)
        timings[name] = time.perf_counter() - t
        if total is not None:
            progress.update(task, completed=total)
        else:
            progress.update(task, total=1, completed=1)

    try:
        with Progress(*columns, console=console, disable=not show_progress) as progress:
            analyzer = FaceAnalyzer()
            with step("prepare", "choosing people and templates", None, progress):
                roster = build_roster(settings, analyzer, work / "uploads")
            notes += roster.notes
            n_uploads = sum(len(p.uploads) for p in roster.people)
            with step("sites", "sites: consent, uploads, intake", n_uploads, progress) as advance:
                sites = prepare_sites(roster, work, analyzer, advance=advance)
            # The sites hold their own copies now; the demo's staging of the uploads (generated files) goes.
            shutil.rmtree(work / "uploads")

            task_label = f"federation: {settings.rounds} DP round(s)"
            with step("federation", task_label, settings.rounds, progress) as advance:
                done = {"n": 0}

                def on_round(k: int) -> None:
                    if k > done["n"]:
                        advance(k - done["n"])
                        done["n"] = k

                fed = run_federation(sites, settings, work, on_round=on_round, quiet=quiet)

            eligible = sum(1 for s in sites for p in s.people if len(p.accepted) >= 3 and p.may("personal_adapter"))
            with step("adapters", "personal adapters (DP)", max(eligible, 1), progress) as advance:
                adapters = personalise_people(sites, fed, settings, advance=advance)

            with step("privacy_curve", "privacy-utility curve", None, progress):
                curve = privacy_utility(sites, adapters, settings, run_dir)

            with step("render_node", "render node: mTLS gRPC on loopback", None, progress):
                node = start_render_node(sites, work, notes)

            n_variants = 3 if settings.ablations else 1
            n_jobs = sum(1 for s in sites for p in s.people if p.accepted and p.may("render")
                         and p.may("classic_face_crop_payload")) * len(roster.templates) * n_variants
            with step("classic_renders", "classic renders (+ ablations)", max(n_jobs, 1), progress) as advance:
                records, refusals = render_portraits(sites, node, roster.templates, settings, analyzer,
                                                     advance=advance)

            diffusion = None
            trained = [a for a in adapters if a.adapter is not None]
            if settings.diffusion and trained:
                with step("diffusion_render", "diffusion render (tiny model)", 1, progress):
                    a = trained[0]
                    site = next(s for s in sites if s.site_id == a.site)
                    diffusion = render_diffusion(site, site.person(a.person), a.adapter, node, roster.templates[0],
                                                 settings, analyzer)
            elif settings.diffusion:
                notes.append("no personal adapter was trained (nobody with 3+ usable photos and consent), so the "
                             "diffusion render was skipped")

            with step("revocation", f"revoking consent of {roster.revoke}", None, progress):
                victim_site = next(s for s in sites if any(p.name == roster.revoke for p in s.people))
                revocation = revoke_one(victim_site, roster.revoke, node, records + ([diffusion] if diffusion else []))
                for rec in records + ([diffusion] if diffusion else []):
                    if rec.person == roster.revoke:
                        rec.pixels = None  # the person's likeness leaves the report too
            node.stop()

            with step("audit", "verifying audit logs", len(sites) + (node.audit is not None), progress):
                logs = [(f"site:{s.site_id}", s.audit, s.root / "keys" / "site.key.pub") for s in sites]
                if node.audit is not None:
                    logs.append((f"render-node:{node.node_info['node_id']}", node.audit, node.audit_public_key_file))
                audits = verify_logs(logs, witnesses=[s.site.witness.directory for s in sites])

            timings["total_before_report"] = time.perf_counter() - started
            summary = build_summary(settings, run_dir, roster, sites, fed, adapters, curve, node, records,
                                    refusals, diffusion, revocation, audits, timings, notes)
            with step("report", "writing the report", None, progress):
                report_path = report.write(run_dir / REPORT_NAME, summary, roster, sites, records, diffusion)
    finally:
        torch.set_num_threads(threads)
        if node is not None:
            node.stop()
        for s in sites:
            s.ledger.close()
    timings["total"] = time.perf_counter() - started
    summary["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    summary["report"] = str(report_path)
    summary_path = run_dir / JSON_NAME
    summary_path.write_text(json.dumps(summary, indent=1, default=json_default))
    return DemoOutcome(run_dir=run_dir, report=report_path, summary_path=summary_path, summary=summary)


def build_summary(settings, run_dir, roster, sites, fed, adapters, curve, node, records, refusals, diffusion,
                  revocation, audits, timings, notes) -> dict:
    """Everything the report shows, as JSON-ready data (no pixels)."""
    import torch

    people = []
    for s in sites:
        for p in s.people:
            people.append({
                "site": s.site_id, "name": p.name, "ref": p.ref, "provenance": p.plan.provenance,
                "uploads": len(p.plan.uploads), "accepted": len(p.accepted), "accepted_files": p.accepted_files,
                "flags": p.flags, "purposes": list(p.plan.purposes), "consent_note": p.plan.consent_note,
                "rejected": [asdict(r) for r in p.rejected],
            })
    return {
        "demo": "megaportrait demo",
        "quick": settings.quick,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
        "settings": json.loads(json.dumps(asdict(settings), default=str)),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": settings.torch_threads, "platform": platform.platform(),
                    "load_average": os.getloadavg()},
        "data_dir": str(roster.data_dir) if roster.data_dir else None,
        "sites": roster.sites,
        "people": people,
        "templates": [{"name": t.name, "file": t.path.name, "ita": round(t.ita, 2), "band": t.band,
                       "provenance": t.provenance} for t in roster.templates],
        "federation": {
            "run_config": fed.run_config, "status": fed.status, "seconds": round(fed.seconds, 2),
            "left_out": fed.left_out, "fallbacks": fed.fallbacks, "budget_per_site": fed.budget.get("budget_per_site"),
            "sites": [asdict(s) for s in fed.sites],
        },
        "privacy": site_privacy_figures(sites, fed),
        "adapters": [{k: v for k, v in asdict(a).items() if k != "adapter"} for a in adapters],
        "privacy_utility": {**asdict(curve), "plot": None if curve.plot is None else str(curve.plot)},
        "render_node": node.node_info,
        "renders": [r.as_dict() for r in records],
        "refusals": [asdict(r) for r in refusals],
        "diffusion": None if diffusion is None else {**diffusion.as_dict(), "params": diffusion.metadata.get("params")},
        "revocation": {**asdict(revocation), "ok": revocation.ok},
        "audit": [{**asdict(a), "path": str(a.path), "public_key_file": str(a.public_key_file)} for a in audits],
        "notes": notes,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }


def site_privacy_figures(sites, fed) -> list[dict]:
    """Each site's epsilon in the three units after every training run on its photos (global rounds and personal
    adapters), read from the site's own privacy ledger, as `megaportrait client privacy` prints them."""
    from megaportrait.client.federation import LEDGER_FILE, SitePrivacyLedger

    out = []
    for s in sites:
        path = fed.site_state_dir / s.site_id / LEDGER_FILE
        if path.is_file():
            out.append({"site": s.site_id, **SitePrivacyLedger(path).figures().to_json()})
    return out
