"""deploy/docs/site-client.md run as written through the doc runner: its marked blocks ("Connect the site" and
"Day to day") in order, in a fresh temporary site, against a real render node on loopback (mutual TLS).

What the doc leaves to others is done here first, as they would: the coordinator's `pki init`, the node operator's
keygen, node and `trust-site` (once the doc has made the site's key), the site's installed `site.yaml`, and the
staff's intake folder and templates. Between blocks the test checks from the outside: the photo refused with its
reason, two portraits rendered and labelled, and after revocation nothing of the person at the site (stores, job
book) or at the node (its job store), whose log verifies against the checkpoints the site kept.
"""
from __future__ import annotations

import re
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest

from .doc_runner import REPO, DocBlock, DocRun, DocTree, extract_blocks, leftover_processes

pytestmark = pytest.mark.slow

DOC = REPO / "deploy" / "docs" / "site-client.md"
PERSON = "p-7f3a"

# The coordinator's and the node operator's side, on this host; the node as one-machine.md runs it (no GPU).
OPERATORS = """\
megaportrait pki init --out pki --sites alpha --render-node-names localhost
mkdir -p /etc/megaportrait/pki
cp -r pki/sites/alpha /etc/megaportrait/pki/site
cp -r pki/render-node /etc/megaportrait/pki/render-node
cp -r /opt/megaportrait/policies /etc/megaportrait/policies
sed 's#render-node.example.org:#localhost:#' deploy/site-client/site.yaml > /etc/megaportrait/site.yaml
sed -e 's#diffusion_base_model: .*#diffusion_base_model: null#' -e 's#diffusion_device: cuda#diffusion_device: cpu#' \\
    -e 's#diffusion_fp16: true#diffusion_fp16: false#' deploy/render-node/render-node.yaml \\
    > /etc/megaportrait/render-node.yaml
megaportrait render-node keygen --state-dir /var/lib/megaportrait/render-node
cp /var/lib/megaportrait/render-node/node_public.json /etc/megaportrait/node_public.json
"""
NODE = """\
exec megaportrait render-node serve --config /etc/megaportrait/render-node.yaml \\
    --state-dir /var/lib/megaportrait/render-node --tls-dir /etc/megaportrait/pki/render-node \\
    --cert-name render-node --listen 127.0.0.1:50051
"""
TRUST = ("megaportrait render-node trust-site --site-id alpha --key /var/lib/megaportrait/site/audit/signing.key.pub "
         "--state-dir /var/lib/megaportrait/render-node\n")


def _setup(code: str, background: bool = False) -> DocBlock:
    return DocBlock(Path(__file__), 0, code, background)


def _job_ids(node_state: Path) -> list[str]:
    from megaportrait.server.render.jobs import JobStore

    store = JobStore(node_state / "jobs.sqlite", store_key=(node_state / "keys" / "store.key").read_bytes())
    try:
        return store.person_job_ids(PERSON)
    finally:
        store.close()


def test_site_client_doc_runs_as_written(people, shared_data, templates):
    from megaportrait.shared import audit

    blocks = extract_blocks(DOC)
    assert len(blocks) == 8, [b.where for b in blocks]
    keygen, consent, enrol, render, revoke, *console = blocks
    root = Path(tempfile.mkdtemp(prefix="megaportrait-doctest-site-client-"))
    tree = DocTree(root)
    var, node_state = root / "var", root / "var" / "render-node"
    intake = var / "intake" / PERSON
    intake.mkdir(parents=True)
    for photo in people["obama"][:2] + [shared_data / "hard" / "two_faces.jpg"]:
        shutil.copy(photo, intake / photo.name)
    (var / "templates").mkdir()
    for i, template in enumerate(templates[:2], 1):
        shutil.copy(template, var / "templates" / f"studio-{i}.jpg")

    run = DocRun(tree)
    try:
        run.run(_setup(OPERATORS))
        run.run(_setup(NODE, background=True))
        run.run(keygen)
        run.run(_setup(TRUST))  # the node operator, with the .pub file the doc's keygen wrote

        out = run.run(consent)
        assert "classic_face_crop_payload, render" in out and "active" in out, out
        for noise in ("GetPrototype", "XNNPACK"):  # no third-party noise in any of the day-to-day commands
            assert noise not in out, out

        out = run.run(enrol)
        assert "refused  two_faces.jpg: several_faces" in out and f"{PERSON}: 2 accepted, 1 refused" in out, out
        photos = var / "site" / "photos" / PERSON
        assert len(list(photos.iterdir())) == 2

        out = run.run(render)
        assert len(re.findall(r"^portrait /", out, flags=re.M)) == 2 and out.count("skin tone ITA") == 2, out
        assert out.count("label    AI-generated image") == 2, out
        identity = [float(x) for x in re.findall(r"identity (\d\.\d+) \(site", out)]
        assert len(identity) == 2 and all(v > 0.3 for v in identity), out  # held-out photo vs portrait, SFace cosine
        assert (var / "out" / f"{PERSON}-1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(re.findall(r" collected ", out)) == 2, out
        state = var / "site" / "federation"
        assert len(list((state / "portraits" / PERSON).iterdir())) == 2
        assert not (state / "payloads" / PERSON).exists()  # staged payloads go once the node has finished
        assert len(_job_ids(node_state)) == 2

        out = run.run(revoke)
        assert "revocation complete" in out and "2 job(s) deleted, 2 key(s) destroyed; signed statement verified" in out
        assert "revoked" in out and "render node render-node at" in out and "reachable" in out, out
        for folder in (photos, state / "crops" / PERSON, state / "portraits" / PERSON, state / "payloads" / PERSON):
            assert not folder.exists(), folder
        db = sqlite3.connect(state / "render_jobs.sqlite")
        try:
            assert db.execute("SELECT COUNT(*) FROM jobs WHERE person_ref = ?", (PERSON,)).fetchone() == (0,)
        finally:
            db.close()
        assert _job_ids(node_state) == []

        for block in console:  # a staff login, the console, and its people page (the revoked person is listed)
            run.run(block)
    finally:
        run.close()
        left = leftover_processes(root / "home")
        print("site-client.md: " + ", ".join(f"{where.split(':')[-1]}={s:.0f}s" for where, s in run.timings))
    assert not left, f"processes outlived site-client.md's render node: {left}"

    # The site kept the node's signed checkpoints from its replies: they verify against the node's log, and they
    # catch the node cutting entries from the end of it.
    node_log = node_state / "audit" / "audit.jsonl"
    node_key = audit.load_public_key(node_state / "audit" / "signing.key.pub")
    kept = audit.WitnessStore(state / "witness").checkpoints(node_key)
    assert len(kept) >= 3, kept
    assert audit.verify(str(node_log), node_key, trusted_checkpoints=kept).ok
    lines = node_log.read_bytes().splitlines(keepends=True)
    node_log.write_bytes(b"".join(lines[: max(cp.size for cp in kept) - 2]))
    (node_state / "audit" / "audit.jsonl.checkpoints").unlink(missing_ok=True)
    cut = audit.verify(str(node_log), node_key, trusted_checkpoints=kept)
    assert "truncated" in [p.kind for p in cut.problems], cut
    shutil.rmtree(root, ignore_errors=True)
