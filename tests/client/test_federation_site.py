"""A site's own pieces, without Flower running: its privacy ledger, where it finds its photos and consent records,
its consent check each round (and declining when nobody may take part), and the clipping mod."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.compat.common import recorddict_compat as compat

from megaportrait.client import federation


def test_site_ledger_composes_releases_with_the_opacus_accountant(tmp_path):
    from opacus.accountants import RDPAccountant

    ledger = federation.SitePrivacyLedger(tmp_path / "ledger.json", "rdp", 1e-5)
    assert ledger.epsilon() == 0.0
    projected = ledger.epsilon([(2.0, 1.0, 4)])
    eps1 = ledger.record(2.0, 1.0, 4, run="r", round=1)
    assert eps1 == pytest.approx(projected)
    eps2 = ledger.record(2.0, 0.5, 4, run="r", round=2)
    reference = RDPAccountant()
    reference.history = [(2.0, 1.0, 4), (2.0, 0.5, 4)]
    assert eps2 == pytest.approx(reference.get_epsilon(1e-5))
    assert eps1 < eps2
    reloaded = federation.SitePrivacyLedger(tmp_path / "ledger.json")
    assert reloaded.epsilon() == pytest.approx(eps2) and [r["round"] for r in reloaded.rounds] == [1, 2]


def test_planned_sample_rate_matches_the_loader_train_lora_builds():
    assert federation.planned_sample_rate(4, 4) == 1.0
    assert federation.planned_sample_rate(3, 4) == 1.0  # batch shrinks to the data
    assert federation.planned_sample_rate(10, 4) == pytest.approx(1 / 3)


def _context(node_config, run_config):
    return Context(run_id=1, node_id=2, node_config=node_config, state=RecordDict(), run_config=run_config)


def test_site_folders_from_node_config_or_simulation_partition(tmp_path):
    photos = tmp_path / "photos"
    for site in ("site-x", "site-y"):
        (photos / site / "person").mkdir(parents=True)
    deployed = federation.site_from_context(_context(
        {"data-dir": str(photos / "site-y"), "state-dir": str(tmp_path / "state-y")}, {}))
    assert deployed.site_id == "site-y" and deployed.state_dir.is_dir()
    simulated = federation.site_from_context(_context(
        {"partition-id": 1, "num-partitions": 2}, {"sim-sites-dir": str(photos), "sim-state-dir": str(tmp_path / "s")}))
    assert simulated.site_id == "site-y" and simulated.state_dir == tmp_path / "s" / "site-y"
    with pytest.raises(federation.SiteError, match="state-dir"):
        federation.site_from_context(_context({"data-dir": str(photos / "site-x")}, {}))
    with pytest.raises(federation.SiteError, match="no site folder"):
        federation.site_from_context(_context({"partition-id": 5}, {"sim-sites-dir": str(photos)}))
    with pytest.raises(federation.SiteError, match="no site data"):
        federation.site_from_context(_context({}, {}))


# --- consent, checked by the site every round ---------------------------------------------------------------


def test_consent_paths_from_node_config_settings_file_or_simulation_map(tmp_path, monkeypatch):
    photos = tmp_path / "photos" / "site-x"
    (photos / "p1").mkdir(parents=True)
    monkeypatch.delenv("MEGAPORTRAIT_CONFIG", raising=False)
    node = {"data-dir": str(photos), "state-dir": str(tmp_path / "state"), "consent-ledger": str(tmp_path / "c.db"),
            "consent-key": str(tmp_path / "site.key")}
    site = federation.site_from_context(_context(node, {}))
    assert site.consent == federation.SiteConsent(tmp_path / "c.db", tmp_path / "site.key",
                                                  tmp_path / "state" / "audit.jsonl", federation.DEFAULT_POLICY)
    with pytest.raises(federation.SiteError, match="consent-key"):
        federation.site_from_context(_context({k: v for k, v in node.items() if k != "consent-key"}, {}))
    bare = {"data-dir": str(photos), "state-dir": str(tmp_path / "state")}
    assert federation.site_from_context(_context(bare, {})).consent is None
    settings = tmp_path / "site.yaml"
    settings.write_text(f"policy:\n  consent_ledger: {tmp_path / 'l.db'}\n  audit_key: {tmp_path / 'k'}\n"
                        f"  audit_log: {tmp_path / 'a.jsonl'}\n")
    monkeypatch.setenv("MEGAPORTRAIT_CONFIG", str(settings))
    assert federation.site_from_context(_context(bare, {})).consent.ledger == tmp_path / "l.db"
    monkeypatch.delenv("MEGAPORTRAIT_CONFIG")
    consent_map = tmp_path / "sim-consent.json"
    consent_map.write_text(json.dumps({"site-x": federation.SiteConsent.in_folder(tmp_path / "cx").to_json()}))
    sim = federation.site_from_context(_context({"partition-id": 0}, {
        "sim-sites-dir": str(photos.parent), "sim-state-dir": str(tmp_path / "s"), "sim-consent": str(consent_map)}))
    assert sim.consent == federation.SiteConsent.in_folder(tmp_path / "cx")


@pytest.fixture()
def lonely_site(tmp_path, people):
    """A site with one person folder (one real photo) and a consent ledger that has no grant yet."""
    data = tmp_path / "photos" / "site-x"
    (data / "person-1").mkdir(parents=True)
    shutil.copy(people["biden"][0], data / "person-1" / people["biden"][0].name)
    consent = federation.SiteConsent.in_folder(tmp_path / "consent")
    federation.record_federated_consent(consent, "site-x", [], actor="test")
    site = federation.SiteConfig("site-x", data, tmp_path / "state", consent)
    site.state_dir.mkdir()
    return site


def _train_entries(site):
    from megaportrait.shared import audit

    return [e for e in audit.read_entries(site.consent.audit_log) if e.action == "federation.train"]


def test_a_site_with_nobody_consented_declines_cleanly_and_audits_it(lonely_site):
    from megaportrait.shared.consent import FEDERATED_TRAINING_PURPOSE

    assert federation.FEDERATED_TRAINING == FEDERATED_TRAINING_PURPOSE
    site = lonely_site
    client = federation.GlobalAdapterClient(site, {"local-steps": 2}, run_id=7)
    answer = client.get_properties({"local-steps": 2, "server-round": 3})
    assert answer["declined"] == 1 and answer["decline-reason"] == "no_consented_person"
    assert answer["n-examples"] == 0 and answer["epsilon-next"] == answer["epsilon"] == 0.0
    arrays = [np.arange(6, dtype=np.float32)]
    back, n, metrics = client.fit(arrays, {"local-steps": 2, "server-round": 3})
    assert n == 0 and metrics["declined"] == 1 and metrics["decline-reason"] == "no_consented_person"
    np.testing.assert_array_equal(back[0], arrays[0])
    assert set(metrics) == set(federation.METRIC_KEYS) and set(answer) == set(federation.PROPERTY_KEYS)
    assert not (site.state_dir / federation.LEDGER_FILE).exists()  # no DP release happened
    assert not list(site.state_dir.glob("crops-*.npz"))  # no face analysis of a non-consented person
    from megaportrait.shared import audit

    checks = [e for e in audit.read_entries(site.consent.audit_log) if e.action == "consent.check"]
    assert [(e.person, e.outcome, e.detail["purpose"]) for e in checks] == \
        [("person-1", "refused", "federated_training")] * 2
    entries = _train_entries(site)
    assert [(e.outcome, e.detail["stage"], e.detail["reason"], e.detail["round"]) for e in entries] == \
        [("refused", "budget-query", "no_consented_person", 3), ("refused", "train", "no_consented_person", 3)]
    assert audit.verify(site.consent.audit_log, site.consent.key.with_name("site.key.pub").read_text().strip()).ok


def test_a_site_without_consent_records_declines(lonely_site):
    site = federation.SiteConfig("site-x", lonely_site.data_dir, lonely_site.state_dir, None)
    answer = federation.GlobalAdapterClient(site, {}, run_id=1).get_properties({"server-round": 1})
    assert answer["declined"] == 1 and answer["decline-reason"] == "consent_not_configured"


def test_only_consented_people_are_loaded_and_a_revoked_persons_crops_leave_the_cache(lonely_site, people):
    site = lonely_site
    (site.data_dir / "person-2").mkdir()
    shutil.copy(people["obama"][0], site.data_dir / "person-2" / people["obama"][0].name)
    federation.record_federated_consent(site.consent, site.site_id, ["person-1", "person-2"], actor="test")
    both = federation.consented_round_data(site, 64, stage="train")
    assert both.people == ("person-1", "person-2") and sorted(set(both.crops.person)) == ["person-1", "person-2"]
    with site.consent.open(site.site_id) as ledger:
        ledger.revoke("person-2", by="test")
    one = federation.consented_round_data(site, 64, stage="train")
    assert one.people == ("person-1",) and one.excluded == 1 and set(one.crops.person) == {"person-1"}
    caches = list(site.state_dir.glob("crops-*.npz"))
    assert len(caches) == 1
    with np.load(caches[0]) as z:
        assert set(z["person"].tolist()) == {"person-1"}


def _train_message(arrays, **config):
    from flwr.app import Message
    from flwr.common import FitIns, ndarrays_to_parameters

    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(arrays), config), keep_input=True)
    return Message(content, dst_node_id=1, message_type="train")


def _fit_reply(msg, arrays, n, **metrics):
    from flwr.app import Message
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, dict(metrics))
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


@pytest.fixture()
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 11), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_clipping_mod_clips_updates_and_hands_a_decline_on_untouched(mode, task_identity):
    from flwr.common import parameters_to_ndarrays

    sent = [np.zeros(4, np.float32)]
    msg = _train_message(sent, clipping=mode, clipping_norm=0.5)
    trained = federation.clipping_mod(msg, None, lambda m, c: _fit_reply(m, [np.full(4, 2.0, np.float32)], 300,
                                                                         declined=0, **{"n-examples": 300}))
    res = compat.recorddict_to_fitres(trained.content, keep_input=True)
    assert np.linalg.norm(parameters_to_ndarrays(res.parameters)[0]) == pytest.approx(0.5)  # clipped to the norm
    assert ("norm_bit" in res.metrics) == (mode == "adaptive")
    # Sent with aggregation weight 1 (what secaggplus_mod, outside this mod, weights the masked update by); the
    # number of crops stays in the metrics.
    assert res.num_examples == federation.UNIT_WEIGHT == 1 and res.metrics["n-examples"] == 300
    declined = federation.clipping_mod(msg, None, lambda m, c: _fit_reply(m, sent, 0, declined=1))
    res = compat.recorddict_to_fitres(declined.content, keep_input=True)
    assert res.num_examples == 0 and res.metrics["declined"] == 1 and "norm_bit" not in res.metrics
    np.testing.assert_array_equal(parameters_to_ndarrays(res.parameters)[0], sent[0])


def test_a_simulation_without_consent_records_says_so_and_uses_every_person(lonely_site, caplog):
    unchecked = federation.site_from_context(_context({"partition-id": 0}, {
        "sim-sites-dir": str(lonely_site.data_dir.parent), "sim-state-dir": str(lonely_site.state_dir.parent),
        "sim-consent": federation.UNCHECKED}))
    assert unchecked.consent is None and unchecked.consent_unchecked
    with caplog.at_level("WARNING", logger="megaportrait.client.federation"):
        data = federation.consented_round_data(unchecked, 64, stage="train")
    assert not data.declined and data.people == ("person-1",) and len(data.crops) == 1
    assert "consent NOT checked" in caplog.text
