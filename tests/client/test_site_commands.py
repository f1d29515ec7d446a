"""`megaportrait client ...` against a real render node on loopback: each bad input and fault gets its own message
with the fix and loses nothing; a re-run after the node went away picks up the same job; consent revoked while a
job waits means the portrait is never saved; revocation clears the crop cache too; and a personal adapter goes from
`client personalise` to a rendered portrait through the node."""
from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

PERSON = "p-7f3a"


def _prepare(site, photos, purposes="render,classic_face_crop_payload") -> None:
    site.cli("audit", "keygen", str(site.var / "site" / "audit" / "signing.key"))
    site.trust_site()
    site.cli("client", "consent", "grant", PERSON, "--purposes", purposes)
    site.cli("client", "enrol", PERSON, *map(str, photos))


def _node_jobs(site, person: str) -> list[str]:
    from megaportrait.server.render.jobs import JobStore

    store = JobStore(site.node_state / "jobs.sqlite", store_key=(site.node_state / "keys" / "store.key").read_bytes())
    try:
        return store.person_job_ids(person)
    finally:
        store.close()


def _settings_with(site, **link) -> Path:
    import yaml

    doc = yaml.safe_load(site.config.read_text())
    doc["site"]["render_node"].update({k: str(v) for k, v in link.items()})
    path = site.root / f"site-{len(list(site.root.glob('site-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_each_bad_input_gets_its_own_message(loopback_site, people, templates, astronaut):
    site = loopback_site
    site.cli("audit", "keygen", str(site.var / "site" / "audit" / "signing.key"))
    site.trust_site()
    r = site.cli("client", "consent", "grant", PERSON, "--purposes", "render,selfies", ok=False)
    assert r.exit_code == 2 and "unknown purpose(s) selfies" in r.stderr and "classic_face_crop_payload" in r.stderr
    r = site.cli("client", "enrol", PERSON, str(people["obama"][0]), ok=False)
    assert r.exit_code == 2 and f"unknown person '{PERSON}'" in r.stderr and "consent grant" in r.stderr
    assert not (site.var / "site" / "photos" / PERSON).exists()  # nothing stored without consent
    r = site.cli("client", "render", "p-nobody", str(templates[0]), ok=False)
    assert r.exit_code == 2 and "unknown person 'p-nobody'" in r.stderr

    # consent only for training: the classic render is refused naming the person and the purpose; nothing sealed
    site.cli("client", "consent", "grant", PERSON, "--purposes", "personal_adapter")
    site.cli("client", "enrol", PERSON, *map(str, people["obama"][:2]))
    r = site.cli("client", "render", PERSON, str(templates[0]), ok=False)
    assert r.exit_code == 1 and PERSON in r.stderr and "classic_face_crop_payload" in r.stderr, r.stderr
    assert not list((site.var / "site" / "federation" / "payloads").glob("*/*")) and _node_jobs(site, PERSON) == []

    site.cli("client", "consent", "grant", PERSON, "--purposes", "render,classic_face_crop_payload")
    from PIL import Image

    no_face = site.root / "landscape.png"
    Image.fromarray(np.ascontiguousarray(astronaut[300:, 300:][::-1, ::-1] * 0 + 90)).save(no_face)
    r = site.cli("client", "render", PERSON, str(no_face), ok=False)
    assert r.exit_code == 1 and "has no face" in r.stderr and "choose a portrait template" in r.stderr

    # a certificate from another CA, a node whose keys differ from node_public.json, a node that is not there
    from megaportrait.shared import pki

    foreign = pki.issue_certificate(pki.create_ca("Foreign CA"), "alpha", role="client")
    foreign.save(site.root / "foreign", "alpha")
    bad = _settings_with(site, cert=site.root / "foreign" / "alpha.pem", key=site.root / "foreign" / "alpha.key")
    r = site.cli("client", "render", PERSON, str(templates[0]), "--config", str(bad), ok=False)
    assert r.exit_code == 3 and "refused this site's TLS connection" in r.stderr and "site.render_node.cert" in r.stderr
    site.cli("render-node", "keygen", "--state-dir", str(site.root / "other-node"), "--node-id", "impostor")
    bad = _settings_with(site, node_public=site.root / "other-node" / "node_public.json")
    r = site.cli("client", "render", PERSON, str(templates[0]), "--config", str(bad), ok=False)
    assert r.exit_code == 3 and "does not hold the keys in the site's node_public.json" in r.stderr
    bad = _settings_with(site, cert=site.root / "missing.pem")
    r = site.cli("client", "render", PERSON, str(templates[0]), "--config", str(bad), ok=False)
    assert r.exit_code == 3 and "site.render_node.cert: cannot read" in r.stderr
    site.server.stop(None)
    r = site.cli("client", "render", PERSON, str(templates[0]), ok=False)
    assert r.exit_code == 3 and f"render node at localhost:{site.port} is not reachable" in r.stderr
    assert len(list((site.var / "site" / "photos" / PERSON).iterdir())) == 2  # nothing lost on the way


def test_rerun_after_the_node_went_away_picks_up_the_same_job(loopback_site, people, templates):
    site = loopback_site
    _prepare(site, people["obama"][:2])
    r = site.cli("client", "render", PERSON, str(templates[0]), "--detach")
    job_id = re.search(r"job (\S+) submitted", r.stdout).group(1)
    site.server.stop(None)  # the node goes away mid-job
    r = site.cli("client", "jobs", "fetch", job_id, ok=False)
    assert r.exit_code == 3 and f"localhost:{site.port} is not reachable" in r.stderr and "run the same" in r.stderr
    site.restart_server()
    r = site.cli("client", "render", PERSON, str(templates[0]))
    assert f"job {job_id} " in r.stdout and "portrait " in r.stdout
    db = sqlite3.connect(site.var / "site" / "federation" / "render_jobs.sqlite")
    try:
        assert db.execute("SELECT job_id, state FROM jobs").fetchall() == [(job_id, "collected")]
    finally:
        db.close()
    assert _node_jobs(site, PERSON) == [job_id]  # one job at the node: nothing sent twice
    r = site.cli("client", "render", PERSON, str(templates[0]))  # done already: the same portrait, no new job
    assert f"job {job_id} collected" in r.stdout and _node_jobs(site, PERSON) == [job_id]
    assert len(list((site.var / "site" / "federation" / "portraits" / PERSON).iterdir())) == 1
    r = site.cli("client", "jobs", "list")
    assert job_id in r.stdout and "collected" in r.stdout
    r = site.cli("client", "enrol", PERSON, *map(str, people["obama"][:2]))  # enrolling again keeps one copy
    assert r.stdout.count("already enrolled") == 2 and "2 photo(s) held" in r.stdout
    assert len(list((site.var / "site" / "photos" / PERSON).iterdir())) == 2


def test_consent_revoked_while_queued_means_no_portrait_and_node_deletion(loopback_site, people, templates):
    from megaportrait.client.site import open_site
    from megaportrait.shared.config import load_settings

    site = loopback_site
    _prepare(site, people["obama"][:2])
    r = site.cli("client", "render", PERSON, str(templates[0]), "--detach")
    job_id = re.search(r"job (\S+) submitted", r.stdout).group(1)
    with open_site(load_settings(site.config)) as s:  # consent ends at the site (the ledger only)
        s.ledger.revoke(PERSON, by="subject")
    r = site.cli("client", "jobs", "fetch", job_id, ok=False)
    assert r.exit_code == 1 and PERSON in r.stderr and "classic_face_crop_payload" in r.stderr
    assert "revoked" in r.stderr and "deleted at the render node and no portrait was saved" in r.stderr
    assert _node_jobs(site, PERSON) == []
    assert not list((site.var / "site" / "federation" / "portraits").glob("*/*"))
    assert "withdrawn" in site.cli("client", "jobs", "show", job_id).stdout


def test_revocation_deletes_the_crop_cache_rows_and_says_where(loopback_site, people, templates):
    site = loopback_site
    _prepare(site, people["obama"][:2])
    state = site.var / "site" / "federation"
    cache = state / "crops-0123456789ab.npz"
    np.savez(cache, pixels=np.zeros((3, 8, 8, 3), np.uint8), photo_sha256=np.array(["a", "b", "c"]),
             person=np.array([PERSON, PERSON, "p-other"]))
    site.cli("client", "render", PERSON, str(templates[0]))
    r = site.cli("client", "revoke", PERSON, "--yes")
    assert "revocation complete" in r.stdout
    lines = {ln.split()[1]: ln for ln in r.stdout.splitlines() if ln.startswith("site ")}
    assert "1 deleted, nothing readable after" in lines["face_crop_cache"]
    assert "2 deleted" in lines["source_photos"] and "1 deleted" in lines["portraits"]
    assert not cache.exists() and _node_jobs(site, PERSON) == []
    from megaportrait.shared.audit import read_entries

    stores = {e.detail["store"]: e.outcome for e in read_entries(site.var / "site" / "audit" / "audit.jsonl")
              if e.action == "revocation.site_delete"}
    assert stores["face_crop_cache"] == "ok" and stores["staged_payloads"] == "ok" and stores["render_jobs"] == "ok"


TINY = {"diffusion_params": {"resolution": 64, "scheduler": "ddim", "identity": {"steps": 2},
                             "shading": {"steps": 2, "strength": 0.67}, "harmonize": {"steps": 2, "strength": 0.67}}}


@pytest.mark.parametrize("loopback_site", [TINY], indirect=True)
def test_personalise_to_a_diffusion_portrait_through_the_node(loopback_site, people, templates, one_torch_thread):
    import yaml

    from megaportrait.client.federation import GLOBAL_ADAPTER_FILE, initial_global_arrays
    from megaportrait.shared.config import IdentitySettings

    site = loopback_site
    doc = yaml.safe_load(site.config.read_text())
    doc["identity"] = {"base_model": None, "dp_enabled": True, "noise_multiplier": 1.0, "steps": 2}
    site.config.write_text(yaml.safe_dump(doc))
    _prepare(site, people["obama"][:3], purposes="render,personal_adapter")
    state = site.var / "site" / "federation"
    arrays, _, _ = initial_global_arrays(IdentitySettings(), seed=0)
    np.savez(state / GLOBAL_ADAPTER_FILE, *arrays, server_round=np.int64(1))
    photos = site.var / "site" / "photos"
    site.cli("client", "personalise", str(photos / PERSON), "--data-dir", str(photos), "--state-dir", str(state),
             "--person-ref", PERSON, "--site-id", "alpha", "--steps", "2")
    from megaportrait.shared.adapters import load_adapter

    adapter = load_adapter(next((state / "adapters" / PERSON).glob("*.safetensors")))
    assert adapter.person_ref == PERSON and adapter.privacy.epsilon > 0  # one format, with its privacy report
    r = site.cli("client", "render", PERSON, str(templates[0]), "--backend", "diffusion")
    assert "diffusion" in r.stdout and "label    AI-generated image" in r.stdout, r.stdout
    assert len(_node_jobs(site, PERSON)) == 1
