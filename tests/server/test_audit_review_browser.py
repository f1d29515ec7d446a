"""The reviewers' page in a real headless Chromium: HTTP Basic login, verdicts, and filtering through the form.

Needs Debian's `chromium` (`apt-get install -y chromium`; .ci/run installs it). Skips, saying so, when it is absent.
"""
from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlencode

import pytest

from megaportrait.server.audit_review import ReviewedLog, create_review_app, hash_password
from megaportrait.shared import audit

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed: `apt-get update && apt-get install -y chromium` to run the browser test"
)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory, serve_on_loopback):
    tmp = tmp_path_factory.mktemp("review")
    key = audit.generate_signing_key(tmp / "site.key")
    log = audit.AuditLog(tmp / "site.jsonl", key, component="site:alpha", checkpoint_every=0)
    for person, action, outcome in [("p-obama", "consent.grant", "ok"), ("p-biden", "consent.grant", "ok"),
                                    ("p-biden", "consent.check", "refused"), ("p-obama", "job.render", "ok"),
                                    ("p-obama", "consent.revoke", "ok")]:  # fmt: skip
        log.append(action, actor="operator:1", person=person, outcome=outcome, policy="cd" * 32)
    log.checkpoint()
    app = create_review_app([ReviewedLog(log.path, key.public_key())], {"rita": hash_password("s3cret-pass")})
    with serve_on_loopback(app) as port:
        yield port, log, tmp


def _dump_dom(url: str, profile: Path) -> str:
    res = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def _rows(dom: str) -> list[tuple[str, str]]:
    return [(html.unescape(p), html.unescape(a)) for p, a in re.findall(r'<tr class="entry [^"]*" data-person="([^"]*)" data-action="([^"]*)">', dom)]


def test_review_page_renders_and_filters_in_chromium(server, tmp_path):
    port, log, _ = server
    base = f"http://rita:s3cret-pass@127.0.0.1:{port}/"

    denied = _dump_dom(f"http://127.0.0.1:{port}/", tmp_path / "p0")  # no credentials: a 401 challenge, no page
    assert "Audit review" not in denied and not _rows(denied)

    dom = _dump_dom(base, tmp_path / "p1")
    assert '<b id="reviewer">rita</b>' in dom
    assert 'data-log-ok="1"' in dom and "verified, 5 entries" in dom
    assert len(_rows(dom)) == 5 and "5 matching entries" in dom
    assert '<form method="get" action="/">' in dom  # the filter form the reviewer submits

    # What submitting the form with person=p-obama produces: only that person's entries.
    dom = _dump_dom(base + "?" + urlencode({"person": "p-obama", "site": "", "action": "", "outcome": ""}), tmp_path / "p2")
    rows = _rows(dom)
    assert rows and {p for p, _ in rows} == {"p-obama"} and len(rows) == 3
    assert 'value="p-obama"' in dom

    dom = _dump_dom(base + "?" + urlencode({"action": "consent", "outcome": "refused"}), tmp_path / "p3")
    assert _rows(dom) == [("p-biden", "consent.check")]


def test_review_page_shows_tampering_in_chromium(server, tmp_path):
    port, log, _ = server
    lines = log.path.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    log.path.write_text("\n".join(lines) + "\n")
    dom = _dump_dom(f"http://rita:s3cret-pass@127.0.0.1:{port}/", tmp_path / "p4")
    assert 'data-log-ok="0"' in dom and "reordered" in dom and "line 3 (seq 1)" in dom
