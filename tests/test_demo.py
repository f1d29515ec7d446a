"""`megaportrait demo`, shortened: the real pipeline end to end on the shared photos.

One quick run (three sites, one federated round on Flower's simulation engine, a real render node over mutual-TLS
gRPC on loopback, two templates, one tiny-model diffusion render) feeds the tests below; each checks the run's
outputs from the outside: the HTML report, the site stores and the render node's job store on disk, and the audit
logs with their public keys alone.
"""
from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from megaportrait.shared.face_analysis import SFACE_THRESHOLD

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_demo(shared_data: Path, tmp_path_factory):
    import torch
    from megaportrait.shared.demo import DemoSettings, run_demo

    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("demo")
    settings = DemoSettings.quick_settings(out, data_dir=shared_data, timestamped=False)
    try:
        outcome = run_demo(settings, show_progress=False, quiet=True)
    finally:
        torch.set_num_threads(threads)
    return outcome


def test_report_holds_images_and_numbers(quick_demo):
    s = quick_demo.summary
    html = quick_demo.report.read_text()
    assert quick_demo.report.is_file() and quick_demo.report.parent == quick_demo.run_dir
    assert json.loads(quick_demo.summary_path.read_text())["report"] == str(quick_demo.report)
    # 3 people (one per site) x 2 templates x 3 variants through the node, all succeeded
    assert len(s["renders"]) == 18 and {r["state"] for r in s["renders"]} == {"succeeded"}
    assert {r["variant"] for r in s["renders"]} == {"identity", "identity+shading", "full"}
    # image rows: sources, template and 3 variants per (person, template), plus the diffusion pair
    images = re.findall(r"<img src='data:image/png;base64,", html)
    assert len(images) == 3 * 2 * 5 + 2 + 1  # + the privacy-utility plot
    # identity: Obama's portraits are still Obama against his held-out photos; the astronaut has none to compare
    obama_full = [r for r in s["renders"] if r["person"] == "obama" and r["variant"] == "full"]
    assert len(obama_full) == 2 and all(r["identity"] >= SFACE_THRESHOLD for r in obama_full), obama_full
    assert all(r["identity"] is None and r["identity_payload"] is not None
               for r in s["renders"] if r["person"] == "astronaut")
    for r in obama_full:
        assert f"{r['identity']:.3f}" in html and f"{r['ita_output']:.1f}" in html
    assert "collateral %" in html
    # epsilon per site: from each site's own privacy ledger, shown in the report
    from megaportrait.client.federation import LEDGER_FILE, SitePrivacyLedger
    from megaportrait.shared import accounting

    assert [f["site"] for f in s["federation"]["sites"]] == ["site-a", "site-b", "site-c"]
    for f in s["federation"]["sites"]:
        ledger = SitePrivacyLedger(Path(s["run_dir"]) / "work" / "federation" / "site-state" / f["site"] / LEDGER_FILE)
        rounds_only = accounting.epsilon(ledger.history, ledger.delta, ledger.accountant)  # before personalisation
        assert f["epsilon"] == pytest.approx(rounds_only) and f["epsilon"] > 0 and f["rounds"] == [1]
        assert f"{f['epsilon']:.3f}" in html
        # per site: the federation noise, from the coordinator's own accountant, within the default 8
        assert 0 < f["site_epsilon"] <= 8.0 and f"{f['site_epsilon']:.3f}" in html
    adapter = next(a for a in s["adapters"] if a["person"] == "obama")
    assert adapter["epsilon"] > 0 and adapter["composed_epsilon"] > adapter["epsilon"]
    site_a = SitePrivacyLedger(Path(s["run_dir"]) / "work" / "federation" / "site-state" / adapter["site"] / LEDGER_FILE)
    assert len(site_a.personal) == 1 and adapter["composed_epsilon"] == pytest.approx(site_a.epsilon())
    # the headline figures: every training run on a site's photos, in the three units, from the site's own ledger
    assert [f["site"] for f in s["privacy"]] == ["site-a", "site-b", "site-c"]
    for f in s["privacy"]:
        ledger = SitePrivacyLedger(Path(s["run_dir"]) / "work" / "federation" / "site-state" / f["site"] / LEDGER_FILE)
        want = ledger.figures()
        assert (f["per_photo"], f["per_person"], f["per_site"]) == pytest.approx(
            (want.per_photo, want.per_person, want.per_site))
        assert f"{f['per_photo']:.2f} / {f['per_person']:.2f} / {f['per_site']:.2f}" in html
    # site-a's per-photo figure includes Obama's personal adapter, not only the rounds
    assert next(f for f in s["privacy"] if f["site"] == "site-a")["per_photo"] == pytest.approx(
        adapter["composed_epsilon"])
    assert {a["skipped"] for a in s["adapters"] if a["person"] != "obama"} == {
        "needs 3 usable photos, has 2", "needs 3 usable photos, has 1"}
    # the diffusion render went through the node with the sealed adapter, and says what it is
    assert s["diffusion"]["state"] == "succeeded" and s["diffusion"]["backend"] == "diffusion"
    assert "TINY RANDOM MODEL" in html
    assert set(s["seconds"]) >= {"federation", "adapters", "classic_renders", "revocation", "audit", "total"}


def test_report_shows_the_privacy_utility_curve(quick_demo):
    """The curve (shared.demo.curve): Obama, the one person with an adapter, 3 photos trained and 1 held out; per
    noise level an epsilon that is infinite without noise and falls as the noise grows, per person above per photo,
    each recomputed from the accountant; finite held-out losses; table, plot and caveat in the report."""
    from PIL import Image

    from megaportrait.shared import accounting
    from megaportrait.shared.demo.curve import CURVE_NOISE

    s = quick_demo.summary
    curve = s["privacy_utility"]
    assert curve["people"] == {"obama": 3} and curve["steps"] == s["settings"]["adapter_steps"]
    points = curve["points"]
    assert [p["noise_multiplier"] for p in points] == list(CURVE_NOISE) and CURVE_NOISE[0] is None
    assert points[0]["epsilon_per_photo"] == points[0]["epsilon_per_person"] == float("inf")
    dp = points[1:]
    assert [p["noise_multiplier"] for p in dp] == sorted((p["noise_multiplier"] for p in dp), reverse=True)
    photo = [p["epsilon_per_photo"] for p in dp]
    assert all(np.isfinite(photo)) and photo == sorted(photo) and len(set(photo)) == len(photo) and photo[0] > 0
    for p in dp:
        # 3 training photos, batch 4: Opacus samples at q = 1; the person is a group of 3 photos
        release = [(p["noise_multiplier"], 1.0, curve["steps"])]
        assert p["epsilon_per_photo"] == pytest.approx(accounting.epsilon(release, 1e-5), rel=1e-6)
        assert p["epsilon_per_person"] == pytest.approx(
            accounting.epsilon(accounting.group_history(release, 3), 1e-5), rel=1e-6)
        assert p["epsilon_per_person"] > p["epsilon_per_photo"]
    losses = [p["heldout_denoising_loss"] for p in points]
    assert all(np.isfinite(losses)) and all(v > 0 for v in losses) and {p["people"] for p in points} == {1}
    with Image.open(curve["plot"]) as plot:
        assert plot.format == "PNG" and min(plot.size) >= 300
    html = quick_demo.report.read_text()
    assert "Privacy-utility curve (demo scale)" in html and "What it does not show" in html
    for p in dp:
        assert f"{p['epsilon_per_photo']:.2f}" in html and f"{p['epsilon_per_person']:.2f}" in html
    assert all(f"{v:.4f}" in html for v in losses) and "infinite (no DP)" in html


def test_bad_uploads_are_refused_with_their_reasons(quick_demo):
    s = quick_demo.summary
    refused = {(p["name"], r["file"]): r["reason"] for p in s["people"] for r in p["rejected"]}
    assert refused == {("obama", "two_faces.jpg"): "several_faces", ("biden", "biden_1_truncated.jpg"): "unreadable",
                       ("astronaut", "coffee.png"): "no_face"}
    html = quick_demo.report.read_text()
    for reason in ("several_faces", "unreadable", "no_face"):
        assert reason in html
    assert {p["name"]: p["accepted"] for p in s["people"]} == {"obama": 4, "biden": 2, "astronaut": 1}


def test_revoked_persons_data_is_gone_everywhere(quick_demo):
    from megaportrait.server.render.jobs import JobStore

    s = quick_demo.summary
    rv = s["revocation"]
    assert rv["person"] == "biden" and rv["site"] == "site-b" and rv["ok"] and rv["complete"]
    ref = rv["person_ref"]
    work = Path(s["run_dir"]) / "work"
    # site: no folder of the person in any store; their crop-cache file is gone; the others' data is still there
    stores = work / "sites" / "site-b" / "stores"
    assert not any((d / ref).exists() for d in stores.iterdir())
    assert not (work / "federation" / "inputs" / "site-b" / ref).exists()
    for cache in (work / "federation" / "site-state" / "site-b").glob("crops-*.npz"):
        with np.load(cache) as z:
            assert ref not in set(z["person"].tolist())
    obama = next(p["ref"] for p in s["people"] if p["name"] == "obama")
    assert (work / "sites" / "site-a" / "stores" / "photos" / obama).is_dir()
    # render node: no job of the person left in its store; the other people's jobs are there
    node = work / "render-node"
    store = JobStore(node / "jobs.sqlite", store_key=(node / "keys" / "store.key").read_bytes())
    try:
        assert store.person_job_ids(ref) == []
        obama_jobs = [r["job_id"] for r in s["renders"] if r["ref"] == obama] + [s["diffusion"]["job_id"]]
        assert sorted(store.person_job_ids(obama)) == sorted(obama_jobs)
    finally:
        store.close()
    assert sorted(rv["node_jobs_deleted"]) == sorted(r["job_id"] for r in s["renders"] if r["ref"] == ref)
    assert rv["node_keys_destroyed"] == 6
    # consent: every receipt of the person is revoked in the site's ledger
    db = sqlite3.connect(work / "sites" / "site-b" / "consent.sqlite")
    try:
        rows = db.execute("SELECT r.receipt_id, v.revoked_at FROM receipts r LEFT JOIN revocations v USING "
                          "(receipt_id) WHERE r.person_ref = ?", (ref,)).fetchall()
    finally:
        db.close()
    assert rows and all(revoked for _, revoked in rows)
    checks = {what: ok for what, ok, _ in rv["checks"]}
    assert checks["the person's next render is refused by the site"]
    assert checks["the node no longer serves the person's portraits"]
    # their likeness left the report: placeholders instead of their images
    assert "biden: sources withdrawn" in quick_demo.report.read_text()


def test_every_audit_log_verifies_and_tampering_is_caught(quick_demo, tmp_path):
    from megaportrait.shared import audit

    logs = quick_demo.summary["audit"]
    assert {a["component"] for a in logs} >= {"site:site-a", "site:site-b", "site:site-c"}
    for a in logs:
        report = audit.verify(Path(a["path"]), Path(a["public_key_file"]))
        assert report.ok, report.summary()
        assert report.entries == a["entries"] > 0
    site_b = next(a for a in logs if a["component"] == "site:site-b")
    assert {"consent.grant", "photo.intake", "payload.seal", "consent.revoke", "revocation.render_delete"} <= set(
        site_b["actions"])
    # positive control: the same check fails on an edited copy
    lines = Path(site_b["path"]).read_text().splitlines()
    lines[1] = lines[1].replace('"outcome":"ok"', '"outcome":"refused"', 1) if '"outcome":"ok"' in lines[1] else \
        lines[1].replace('"outcome":"refused"', '"outcome":"ok"', 1)
    forged = tmp_path / "audit.jsonl"
    forged.write_text("\n".join(lines) + "\n")
    assert not audit.verify(forged, Path(site_b["public_key_file"])).ok


def test_user_photos_with_bad_files_are_refused_not_fatal(tmp_path, astronaut, templates):
    """`--photos DIR` intake on the user's files: a face is accepted, a no-face photo and a corrupt file are refused
    with their reasons; nothing crashes (roster and site steps only, no federation)."""
    import skimage.data
    from megaportrait.shared.demo import DemoSettings
    from megaportrait.shared.demo.roster import build_roster
    from megaportrait.shared.demo.sites import prepare_sites
    from megaportrait.shared.face_analysis import FaceAnalyzer
    from PIL import Image

    photos = tmp_path / "mine"
    (photos / "eileen").mkdir(parents=True)
    Image.fromarray(astronaut).save(photos / "eileen" / "portrait.png")
    (photos / "eileen" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "nobody").mkdir()
    Image.fromarray(skimage.data.coffee()).save(photos / "nobody" / "cup.jpg")
    settings = DemoSettings(out_dir=tmp_path / "out", photos_dir=photos, template=templates[0], people_per_site=1)
    analyzer = FaceAnalyzer()
    roster = build_roster(settings, analyzer, tmp_path / "uploads")
    assert [p.name for p in roster.at("site-a")] == ["eileen", "nobody"] and len(roster.templates) == 1
    sites = prepare_sites(roster, tmp_path / "work", analyzer)
    try:
        site_a = sites[0]
        eileen, nobody = site_a.person("eileen"), site_a.person("nobody")
        assert len(eileen.accepted) == 1
        assert [(r.file, r.reason) for r in eileen.rejected] == [("broken.jpg", "unreadable")]
        assert nobody.accepted == [] and [(r.file, r.reason) for r in nobody.rejected] == [("cup.jpg", "no_face")]
    finally:
        for s in sites:
            s.ledger.close()


def test_cli_refuses_missing_inputs_with_a_clear_message(tmp_path):
    from megaportrait.shared.cli import app

    result = CliRunner().invoke(app, ["demo", "--photos", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    text = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 1
    assert "--photos" in text and "nowhere: not a folder" in text
    assert not (tmp_path / "o").exists()
    result = CliRunner().invoke(app, ["demo", "--template", str(tmp_path / "none.jpg"), "--out", str(tmp_path / "o")])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "--template" in text and "no such file" in text
