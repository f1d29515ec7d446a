"""Everything a site sends during federated rounds, inspected byte by byte: no image bytes, no per-person adapter.

Three simulated sites hold real photos (../shared/data people, template portraits as extra people, skimage's
astronaut), every person with federated-training consent in their site's ledger. Site A first personalises an
adapter for one person (kept at the site, as in real use), then all three take part in two SecAgg+ rounds with
fixed clipping and distributed DP (adaptive clipping is refused under SecAgg+: its clipped bit would travel in the
clear). Every outgoing message is
captured by the site's own `outbox_audit_mod` (the exact bytes Flower pushes) and checked for: crop pixel rows, raw
photo file bytes, the per-person adapter's tensors, person refs, and any record or key outside what the site is
allowed to send.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from megaportrait.client import federation
from megaportrait.server.coordinator.checkpoint import load_checkpoint
from megaportrait.server.coordinator.deployment import default_run_config, simulate

pytestmark = pytest.mark.slow

ALLOWED_CONFIG_KEYS = {
    # answers to the budget query (GetPropertiesRes in Flower's legacy record layout)
    "getpropertiesres.properties": set(federation.PROPERTY_KEYS),
    "getpropertiesres.status": {"code", "message"},
    "fitres.metrics": set(federation.METRIC_KEYS),
    "fitres.status": {"code", "message"},
    "fitres.num_examples": {"num_examples"},
}
# What a site answers in each SecAgg+ stage: public keys; encrypted shares and their destinations; the masked
# vector; the shares it holds for its neighbours.
SECAGG_KEYS = {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST, Key.MASKED_PARAMETERS,
               Key.NODE_ID_LIST, Key.SHARE_LIST}


def make_sites(root: Path, people: dict[str, list[Path]], templates: list[Path], astronaut: np.ndarray) -> Path:
    """site-a: Obama (4 photos); site-b: Biden (2) + the astronaut; site-c: three template portraits."""
    from PIL import Image

    def put(site: str, person: str, files: list[Path]) -> None:
        folder = root / site / person
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, folder / f.name)

    put("site-a", "person-obama", people["obama"])
    put("site-b", "person-biden", people["biden"])
    (root / "site-b" / "person-astronaut").mkdir(parents=True)
    Image.fromarray(astronaut).save(root / "site-b" / "person-astronaut" / "astronaut.png")
    for i, f in enumerate(templates[:3]):
        put("site-c", f"person-template-{i}", [f])
    return root


def contains_any_window(blob: bytes, data: bytes, window: int, stride: int) -> bool:
    return any(data[i:i + window] in blob for i in range(0, max(1, len(data) - window + 1), stride))


@pytest.fixture(scope="module")
def federated(tmp_path_factory, people, templates, astronaut):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("federation")
    sites_dir = make_sites(root / "photos", people, templates, astronaut)
    site_state = root / "site-state"
    settings = federation.identity_settings_from_run_config(default_run_config())
    site_a = federation.SiteConfig("site-a", sites_dir / "site-a", site_state / "site-a")
    site_a.state_dir.mkdir(parents=True)
    crops = federation.load_site_crops(site_a, settings.resolution)
    global0, _, _ = federation.initial_global_arrays(settings, seed=0)
    person = federation.personalise_adapter(list(crops.pixels), settings, person_ref="obama-ref",
                                            global_arrays=global0, photo_sha256=list(crops.photo_sha256), steps=3)
    for site in ("site-a", "site-b", "site-c"):
        federation.record_federated_consent(federation.SiteConsent.in_folder(root / "consent" / site), site,
                                            sorted(p.name for p in (sites_dir / site).iterdir()), actor="test")
    result = simulate(sites_dir, root / "coordinator", site_state_dir=site_state, consent=root / "consent",
                      run_config={"num-server-rounds": 2, "secure-aggregation": True, "clipping": "fixed"})
    return {"root": root, "sites_dir": sites_dir, "site_state": site_state, "result": result, "person": person}


def outbox(site_state: Path, site: str) -> list[tuple[dict, bytes]]:
    folder = site_state / site / "outbox"
    entries = [json.loads(line) for line in (folder / "outbox.jsonl").read_text().splitlines()]
    return [(e, (folder / e["file"]).read_bytes()) for e in entries]


def test_rounds_complete_and_every_site_reports_its_accountant_epsilon(federated):
    result = federated["result"]
    assert result.status["state"] == "finished" and result.status["round"] == 2
    latest = load_checkpoint(result.state_dir)
    first = load_checkpoint(result.state_dir, round=0)
    assert latest.round == 2 and sorted(latest.sites) == ["site-a", "site-b", "site-c"]
    assert any(not np.allclose(a, b) for a, b in zip(latest.arrays, first.arrays))
    # Unweighted mean of the three clipped updates, noised with z * C / 3; the crop counts are only reported.
    for r in (1, 2):
        dp = load_checkpoint(result.state_dir, round=r).meta["dp"]
        assert dp["weighting"] == "unweighted" and dp["sites_aggregated"] == 3
        # Distributed DP: each site added z * C / sqrt(min-sites); the sum of three carries z * sqrt(3 / 2).
        assert dp["dp_mode"] == "distributed" and dp["noise_added_by"] == "sites"
        assert dp["noise_stddev"] == pytest.approx(dp["noise_multiplier"] * dp["clipping_norm"] * (3 / 2) ** 0.5 / 3)
        report = result.status["round_reports"][str(r)]
        # site-a trains on 4 crops; the count leaves it only as its power-of-ten bucket (1)
        assert "non_unit_weights" not in report and report["examples"]["site-a"] == 1
    for site in ("site-a", "site-b", "site-c"):
        ledger = federation.SitePrivacyLedger(federated["site_state"] / site / federation.LEDGER_FILE)
        assert len(ledger.history) == 2
        assert result.budget["sites"][site]["epsilon"] == pytest.approx(ledger.epsilon())
        assert result.budget["sites"][site]["rounds"] == [1, 2]


def test_no_image_bytes_and_no_person_adapter_leave_a_site(federated):
    site_state, sites_dir, person = federated["site_state"], federated["sites_dir"], federated["person"]
    settings = federation.identity_settings_from_run_config(default_run_config())
    person_tensors = [t.numpy().astype(np.float32).tobytes() for t in person.lora_state.values()]
    stages_seen: set[str] = set()
    for site in ("site-a", "site-b", "site-c"):
        messages = outbox(site_state, site)
        assert len(messages) >= 2 * 5  # per round: budget answer + 4 SecAgg+ stages
        blobs = [blob for _, blob in messages]
        crops = federation.load_site_crops(federation.SiteConfig(site, sites_dir / site, site_state / site),
                                           settings.resolution)
        photos = sorted(p for p in (sites_dir / site).rglob("*") if p.is_file())
        for entry, blob in messages:
            assert entry["error"] is None and entry["bytes"] == len(blob)
            stages_seen.add(str(entry["secagg_stage"]))
            # image bytes: every 4th pixel row of every crop (192-byte rows), 64-byte windows of the photo files
            for crop in crops.pixels:
                for row in crop[::4]:
                    assert row.tobytes() not in blob, f"{site}: a crop row is in {entry['file']}"
            for photo in photos:
                data = photo.read_bytes()
                assert not contains_any_window(blob, data, 64, max(64, len(data) // 50)), \
                    f"{site}: bytes of {photo.name} are in {entry['file']}"
            for tensor in person_tensors:
                assert tensor[:64] not in blob, f"{site}: a per-person adapter tensor is in {entry['file']}"
            for person in (p.name for p in (sites_dir / site).iterdir()):
                assert person.encode() not in blob, f"{site}: person ref {person} is in {entry['file']}"
            # structure: only the allowed records and keys
            for name, record in entry["records"].items():
                if record["kind"] == "arrays":
                    assert record["items"] == {}, f"{site}: unmasked arrays left the site under SecAgg+"
                elif name == "secaggplus_configs":
                    assert set(record["items"]) <= SECAGG_KEYS
                else:
                    assert name in ALLOWED_CONFIG_KEYS, f"{site}: unexpected record {name}"
                    assert set(record["items"]) <= ALLOWED_CONFIG_KEYS[name], (name, record["items"])
                if record["kind"] == "metrics":
                    # nothing unaccounted: no training loss, the crop count only as a power-of-ten bucket
                    assert "round-loss" not in record["items"] and KEY_NORM_BIT not in record["items"]
                    for key in ("n-examples", "properties.n-examples"):
                        if key in record["items"]:
                            assert record["items"][key] in (0, 1, 10, 100, 1000), (name, record["items"])
    assert {"setup", "share_keys", "collect_masked_vectors", "unmask"} <= stages_seen


def test_the_byte_search_finds_a_crop_or_an_adapter_when_they_are_there(federated):
    """Positive control: the same serialisation and search flag a message that does carry a crop and a tensor."""
    from flwr.app import Array, ArrayRecord, Message, RecordDict

    site_state, sites_dir = federated["site_state"], federated["sites_dir"]
    crops = federation.load_site_crops(federation.SiteConfig("site-a", sites_dir / "site-a", site_state / "site-a"),
                                       64)
    tensor = next(iter(federated["person"].lora_state.values())).numpy().astype(np.float32)
    leaky = Message(RecordDict({"leak": ArrayRecord({"crop": Array(crops.pixels[0]), "lora": Array(tensor)})}),
                    dst_node_id=1, message_type="train")
    blob = federation.message_wire_bytes(leaky)
    assert crops.pixels[0][8].tobytes() in blob
    assert tensor.tobytes()[:64] in blob
