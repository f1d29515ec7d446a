"""deploy/docs/site-client.md "Connect the site" and "Day to day", run as written: every `<!-- doctest -->` block in
order, as shell commands in a fresh temporary site against a real render node on loopback (mutual TLS). Between
blocks the test checks from the outside: the photo refused with its reason, two portraits rendered and labelled, and
after revocation nothing of the person at the site (stores, job book) or at the node (its job store)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "deploy" / "docs" / "site-client.md"
PERSON = "p-7f3a"


def doctest_blocks(text: str, sections: tuple[str, ...]) -> list[str]:
    """The ```bash blocks marked `<!-- doctest -->` inside the named `## ` sections, in document order."""
    out = []
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        title, _, body = part.partition("\n")
        if title.strip() in sections:
            out += re.findall(r"^<!-- doctest -->\n```bash\n(.*?)^```", body, flags=re.M | re.S)
    return out


def run_block(block: str, site) -> str:
    env = {**os.environ, "MEGAPORTRAIT_CONFIG": str(site.config),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "COLUMNS": "200"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", site.substitute(block)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=site.root)
    assert proc.returncode == 0, f"block failed ({proc.returncode}):\n{block}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "GetPrototype" not in proc.stderr and "XNNPACK" not in proc.stderr, proc.stderr  # no third-party noise
    return proc.stdout


def test_day_to_day_section_runs_as_written(loopback_site, people, shared_data, templates):
    from megaportrait.server.render.jobs import JobStore

    site = loopback_site
    intake = site.var / "intake" / PERSON
    intake.mkdir(parents=True)
    for photo in people["obama"][:2] + [shared_data / "hard" / "two_faces.jpg"]:
        shutil.copy(photo, intake / photo.name)
    (site.var / "templates").mkdir()
    for i, template in enumerate(templates[:2], 1):
        shutil.copy(template, site.var / "templates" / f"studio-{i}.jpg")

    blocks = doctest_blocks(DOC.read_text(), ("Connect the site to the render node", "Day to day"))
    assert len(blocks) == 5, blocks
    keygen, consent, enrol, render, revoke = blocks

    run_block(keygen, site)
    site.trust_site()  # the node operator, with the .pub file keygen wrote

    out = run_block(consent, site)
    assert "consent" in out and "classic_face_crop_payload, render" in out and "active" in out

    out = run_block(enrol, site)
    assert "refused  two_faces.jpg: several_faces" in out and f"{PERSON}: 2 accepted, 1 refused" in out
    photos = site.var / "site" / "photos" / PERSON
    assert len(list(photos.iterdir())) == 2

    out = run_block(render, site)
    assert len(re.findall(r"^portrait /", out, flags=re.M)) == 2 and out.count("skin tone ITA") == 2, out
    assert out.count("label    AI-generated image") == 2, out
    identity = [float(x) for x in re.findall(r"identity (\d\.\d+) \(site", out)]
    assert len(identity) == 2 and all(v > 0.3 for v in identity), out  # held-out photo vs portrait, SFace cosine
    assert (site.var / "out" / f"{PERSON}-1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(re.findall(r" collected ", out)) == 2, out
    state = site.var / "site" / "federation"
    assert len(list((state / "portraits" / PERSON).iterdir())) == 2
    assert not (state / "payloads" / PERSON).exists()  # staged payloads go once the node has finished
    store = JobStore(site.node_state / "jobs.sqlite", store_key=(site.node_state / "keys" / "store.key").read_bytes())
    try:
        assert len(store.person_job_ids(PERSON)) == 2
    finally:
        store.close()

    out = run_block(revoke, site)
    assert "revocation complete" in out and "2 job(s) deleted, 2 key(s) destroyed; signed statement verified" in out
    assert "revoked" in out and "render node render-node-1 at" in out and "reachable" in out
    for folder in (photos, state / "crops" / PERSON, state / "portraits" / PERSON, state / "payloads" / PERSON):
        assert not folder.exists(), folder
    import sqlite3

    db = sqlite3.connect(state / "render_jobs.sqlite")
    try:
        assert db.execute("SELECT COUNT(*) FROM jobs WHERE person_ref = ?", (PERSON,)).fetchone() == (0,)
    finally:
        db.close()
    store = JobStore(site.node_state / "jobs.sqlite", store_key=(site.node_state / "keys" / "store.key").read_bytes())
    try:
        assert store.person_job_ids(PERSON) == []
    finally:
        store.close()

    # The site kept the node's signed checkpoints from its replies: they verify against the node's log, and they
    # catch the node cutting entries from the end of it.
    from megaportrait.shared import audit

    node_log = site.node_state / "audit" / "audit.jsonl"
    node_key = audit.load_public_key(site.node_state / "audit" / "signing.key.pub")
    kept = audit.WitnessStore(state / "witness").checkpoints(node_key)
    assert len(kept) >= 3, kept
    assert audit.verify(str(node_log), node_key, trusted_checkpoints=kept).ok
    lines = node_log.read_bytes().splitlines(keepends=True)
    node_log.write_bytes(b"".join(lines[: max(cp.size for cp in kept) - 2]))
    (site.node_state / "audit" / "audit.jsonl.checkpoints").unlink(missing_ok=True)
    cut = audit.verify(str(node_log), node_key, trusted_checkpoints=kept)
    assert "truncated" in [p.kind for p in cut.problems], cut
