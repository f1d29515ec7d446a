"""The staff console in a real headless Chromium, driven over the DevTools protocol against a real render node on
loopback: sign in, capture consent, upload photos (the refused one shown with its reason), upload a template and
render with live progress, the gallery, and revocation with its confirmation step. A screenshot of each page goes to
the test's folder (and to deploy/docs/images/ with MEGAPORTRAIT_WRITE_SCREENSHOTS=1).

Needs Debian's `chromium` (`apt-get install -y chromium`); skips, saying so, when it is absent.
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed: `apt-get install -y chromium` to run the browser test")]
REPO = Path(__file__).resolve().parents[2]
PERSON = "p-7f3a"
STAFF, PASSWORD = "rita", "s3cret-pass"


class Browser:
    """A headless Chromium page over the DevTools protocol (just what the test needs)."""

    def __init__(self, profile: Path) -> None:
        from websockets.sync.client import connect

        self.proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                      "--disable-background-networking", "--disable-component-update",
                                      "--disable-sync", "--window-size=1200,1000", f"--user-data-dir={profile}",
                                      "--remote-debugging-port=0", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json"))
        page = next(p for p in pages if p["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=2**26)
        self.ids = itertools.count(1)
        for method in ("Page.enable", "DOM.enable", "Network.enable"):
            self.call(method)
        self.call("Page.setBypassCSP", enabled=True)  # the test's own evaluate calls; the page runs no script

    def call(self, method: str, **params):
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=120))
            if msg.get("id") == msg_id:
                assert "error" not in msg, (method, msg["error"])
                return msg.get("result", {})

    def wait_loaded(self, selector: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.js(f"document.readyState === 'complete' && !!document.querySelector({json.dumps(selector)})"):
                return
            time.sleep(0.2)
        raise AssertionError(f"{selector} never appeared; page: {self.text()[:2000]}")

    def go(self, url: str, selector: str = "h1") -> None:
        self.call("Page.navigate", url=url)
        time.sleep(0.2)
        self.wait_loaded(selector)

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def set_files(self, selector: str, files: list[Path]) -> None:
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", nodeId=node, files=[str(f) for f in files])

    def submit(self, form: str, selector: str = "h1") -> None:
        self.js(f"document.querySelector({json.dumps(form)}).submit()")
        time.sleep(0.3)
        self.wait_loaded(selector)

    def screenshot(self, path: Path) -> None:
        height = self.js("document.documentElement.scrollHeight") or 1000
        self.call("Emulation.setDeviceMetricsOverride", width=1200, height=min(int(height), 1800),
                  deviceScaleFactor=1, mobile=False)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def console(loopback_site, serve_on_loopback):
    import yaml

    from megaportrait.client.console import create_console_app
    from megaportrait.client.site import open_site
    from megaportrait.server.audit_review import hash_password
    from megaportrait.shared.config import load_settings

    site = loopback_site
    site.cli("audit", "keygen", str(site.var / "site" / "audit" / "signing.key"))
    site.trust_site()
    doc = yaml.safe_load(site.config.read_text())
    doc["policy"]["reviewers"] = {STAFF: hash_password(PASSWORD)}
    site.config.write_text(yaml.safe_dump(doc))
    settings = load_settings(site.config)
    opened = open_site(settings)
    app = create_console_app(settings, settings.policy.reviewers, site=opened)
    with serve_on_loopback(app) as port:
        yield site, f"http://127.0.0.1:{port}"
    opened.close()


def test_console_flow_in_chromium(console, people, shared_data, templates, tmp_path):
    import httpx

    site, base = console
    shots = tmp_path / "shots"
    shots.mkdir()
    r = httpx.get(base + "/")
    assert r.status_code == 401 and "MegaPortrait" not in r.text
    r = httpx.get(base + "/", auth=(STAFF, PASSWORD))
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert r.headers["x-frame-options"] == "DENY" and "default-src 'none'" in r.headers["content-security-policy"]
    r = httpx.post(base + "/consent", auth=(STAFF, PASSWORD), data={"person": PERSON, "purposes": ["render"],
                                                                    "csrf": "forged"})
    assert r.status_code == 403 and PERSON not in httpx.get(base + "/", auth=(STAFF, PASSWORD)).text

    browser = Browser(tmp_path / "profile")
    try:
        auth = base64.b64encode(f"{STAFF}:{PASSWORD}".encode()).decode()
        browser.call("Network.setExtraHTTPHeaders", headers={"Authorization": f"Basic {auth}"})
        browser.go(base + "/", "#consent-form")
        browser.js(f"""(() => {{const f = document.querySelector('#consent-form');
            f.person.value = {json.dumps(PERSON)}; f.expires.value = '90d';
            for (const b of f.querySelectorAll('input[name=purposes]'))
                b.checked = ['render', 'classic_face_crop_payload'].includes(b.value);}})()""")
        browser.screenshot(shots / "console-consent.png")
        browser.submit("#consent-form", "#upload-form")
        assert "classic_face_crop_payload, render" in browser.text() and "active" in browser.text()

        browser.set_files("#upload-form input[type=file]", people["obama"][:2] + [shared_data / "hard" / "two_faces.jpg"])
        browser.submit("#upload-form", "#intake")
        text = browser.text()
        assert "two_faces.jpg" in text and "refused: several_faces" in text and text.count("accepted") == 2, text
        browser.screenshot(shots / "console-photos.png")

        browser.go(f"{base}/person/{PERSON}", "#render-form")
        template = tmp_path / "studio-1.jpg"
        shutil.copy(templates[0], template)
        browser.set_files("#render-form input[name=template_file]", [template])
        browser.screenshot(shots / "console-person.png")
        browser.submit("#render-form", "#job-state")
        progress_seen = bool(browser.js("!!document.querySelector('#progress')"))
        if progress_seen:
            browser.screenshot(shots / "console-render-progress.png")
        browser.wait_loaded(".card img", timeout=300)  # the page reloads itself until the portrait is in
        assert browser.js("document.querySelector('.card img').naturalWidth") > 0
        assert "AI-generated image" in browser.text() and "skin tone ITA" in browser.text()
        browser.screenshot(shots / "console-job.png")

        browser.go(base + "/gallery", "#gallery .card")
        assert "identity 0." in browser.text()
        browser.screenshot(shots / "console-gallery.png")

        browser.go(f"{base}/person/{PERSON}/revoke", "#revoke-form")
        browser.screenshot(shots / "console-revoke-confirm.png")
        browser.js("document.querySelector('#revoke-form input[name=confirm]').checked = true")
        browser.submit("#revoke-form", "#verdict")
        text = browser.text()
        assert "Revocation complete" in text and "signed statement verified" in text, text
        browser.screenshot(shots / "console-revoked.png")
    finally:
        browser.close()
    assert not (site.var / "site" / "photos" / PERSON).exists()
    assert not list((site.var / "site" / "federation" / "portraits").glob(f"{PERSON}/*"))
    if os.environ.get("MEGAPORTRAIT_WRITE_SCREENSHOTS") == "1":
        out = REPO / "deploy" / "docs" / "images"
        out.mkdir(parents=True, exist_ok=True)
        for shot in shots.iterdir():
            shutil.copy(shot, out / shot.name)
