"""Identity Net training on real face crops (people/obama), tiny embedded base model, with and without Opacus DP."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from megaportrait.client import identity
from megaportrait.client.faces import intake_photos
from megaportrait.shared.base_models import load_base_model, unet_sha256
from megaportrait.shared.config import IdentitySettings
from megaportrait.shared import audit, consent
from megaportrait.shared.errors import ModelNotFound
from megaportrait.shared.policy import load_consent_policy


pytestmark = pytest.mark.usefixtures("one_torch_thread")


REPO = Path(__file__).resolve().parents[2]
CONSENTING = ("p" * 64, "ab" * 32, "c" * 64, "x")


def _ledger(tmp_path: Path) -> consent.ConsentLedger:
    """The site's real consent ledger (shipped consent policy, its own audit log)."""
    key = audit.generate_signing_key(tmp_path / "site.key")
    log = audit.AuditLog(tmp_path / "audit.jsonl", key, component="site:alpha", checkpoint_every=0)
    return consent.ConsentLedger(tmp_path / "consent.sqlite", site="alpha", key=key,
                                 policy=load_consent_policy(REPO / "policies" / "consent.yaml"), audit=log)  # fmt: skip


@pytest.fixture()
def ledger(tmp_path):
    """A ledger where the persons these tests train for gave `personal_adapter` consent."""
    ledger = _ledger(tmp_path)
    for ref in CONSENTING:
        ledger.grant(ref, ["personal_adapter"], granted_by="subject", actor="operator:1")
    yield ledger
    ledger.close()


@pytest.fixture(scope="module")
def obama(people) -> tuple[list[np.ndarray], list[str]]:
    """Obama's photos through the site's intake (client/faces.py): aligned face crops and the photos' hashes."""
    report = intake_photos(people["obama"], show_progress=False)
    assert not report.rejected, report.reasons()
    return [a.crop.pixels for a in report.accepted], [a.image_sha256 for a in report.accepted]


# Per-sample gradient norms of the tiny model are ~0.1, so clip there; small rank keeps the noise dimension low.
DP = dict(rank=2, alpha=2.0, max_grad_norm=0.1, learning_rate=3e-2, noise_multiplier=0.5, dp_enabled=True)


def test_dp_training_lowers_the_loss_on_the_persons_photos_and_reports_the_accountants_epsilon(obama):
    from opacus.accountants import RDPAccountant

    crops, _ = obama
    settings = IdentitySettings(**DP, steps=60)
    base = load_base_model(None)
    base_hash = unet_sha256(base.components["unet"])
    ts = identity.prepare_training_set(base.components, crops, settings)
    unet = identity.attach_lora(base.components["unet"], settings)
    before = identity.denoising_loss(base.components, ts, seed=7)
    losses, report = identity.train_lora(base.components, ts, settings, progress=False, dp_noise_seed=3)
    after = identity.denoising_loss(base.components, ts, seed=7)

    assert after < before * 0.98, (before, after)
    assert len(losses) == report.steps == 60
    # The epsilon is the accountant's: an independent RDP accountant fed the same mechanism agrees.
    assert report.sample_rate == 1.0  # 4 crops, batch 4
    independent = RDPAccountant()
    independent.history = [(settings.noise_multiplier, report.sample_rate, report.steps)]
    assert report.epsilon == pytest.approx(independent.get_epsilon(settings.delta), rel=1e-9)
    assert (report.noise_multiplier, report.max_grad_norm, report.accountant) == (0.5, 0.1, "rdp")
    # Only the LoRA trained: the base weights hash as before, and Opacus left no hooks behind.
    assert unet_sha256(unet) == base_hash
    assert not unet._forward_hooks and all(not m._forward_hooks for m in unet.modules())


def test_poisson_sampling_empty_batches_release_noise_and_are_accounted(obama):
    from opacus.accountants import RDPAccountant

    crops, _ = obama
    settings = IdentitySettings(**{**DP, "batch_size": 1}, steps=12)
    base = load_base_model(None)
    ts = identity.prepare_training_set(base.components, crops, settings)
    identity.attach_lora(base.components["unet"], settings)
    before = identity.get_lora_arrays(base.components["unet"])
    losses, report = identity.train_lora(base.components, ts, settings, progress=False, dp_noise_seed=0)

    assert report.sample_rate == 0.25 and report.steps == 12
    assert any(math.isnan(x) for x in losses), "seeded run expected to draw an empty Poisson batch"
    independent = RDPAccountant()
    independent.history = [(settings.noise_multiplier, 0.25, 12)]
    assert report.epsilon == pytest.approx(independent.get_epsilon(settings.delta), rel=1e-9)
    after = identity.get_lora_arrays(base.components["unet"])
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


def test_target_epsilon_mode_stays_within_the_target(obama, ledger, recwarn, caplog):
    crops, hashes = obama
    settings = IdentitySettings(**{**DP, "noise_multiplier": None}, target_epsilon=8.0, steps=6)
    with caplog.at_level("INFO", logger="megaportrait"):
        adapter = identity.train_identity_adapter(crops, settings, ledger=ledger, person_ref="p" * 64,
                                                  photo_sha256=hashes, progress=False, dp_noise_seed=1)
    # the secure-RNG decision is stated once in our own words (deploy/docs/site-client.md), not as Opacus' warning
    assert not [w for w in recwarn if "Secure RNG" in str(w.message)]
    assert "Opacus secure_mode off" in caplog.text
    assert adapter.privacy.epsilon is not None and adapter.privacy.epsilon <= 8.0
    assert adapter.privacy.epsilon > 7.0  # the accountant picked the smallest noise that fits, not a huge one
    assert adapter.privacy.noise_multiplier > 1.0 and adapter.privacy.steps == 6


def test_non_dp_run_reports_no_epsilon_and_returns_a_complete_adapter(obama, ledger):
    crops, hashes = obama
    settings = IdentitySettings(dp_enabled=False, steps=4)
    base = load_base_model(None)
    adapter = identity.train_identity_adapter(crops, settings, ledger=ledger, person_ref="ab" * 32, photo_sha256=hashes,
                                              base=base, progress=False)
    assert adapter.privacy.epsilon is None and adapter.privacy.accountant == "none"
    assert adapter.photo_sha256 == tuple(hashes)
    assert adapter.base_model == base.ref and adapter.base_model.kind == "tiny-embedded"
    assert (adapter.token, adapter.rank, adapter.alpha) == ("sks", 4, 4.0)
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in adapter.lora_state)
    assert any("to_out.0.lora_B" in k for k in adapter.lora_state)
    # The base UNet is handed back bare.
    assert not getattr(base.components["unet"], "peft_config", None)
    assert not any("lora" in k for k in base.components["unet"].state_dict())


def test_lora_arrays_roundtrip_in_a_stable_order():
    settings = IdentitySettings()
    a = identity.attach_lora(load_base_model(None).components["unet"], settings)
    b = identity.attach_lora(load_base_model(None).components["unet"], settings)
    assert identity.lora_parameter_names(a) == identity.lora_parameter_names(b)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(x.shape).astype(np.float32) for x in identity.get_lora_arrays(a)]
    identity.set_lora_arrays(b, arrays)
    assert all(np.array_equal(x, y) for x, y in zip(arrays, identity.get_lora_arrays(b)))
    with pytest.raises(identity.IdentityTrainingError):
        identity.set_lora_arrays(b, arrays[:-1])


def test_prior_preservation_mixes_in_class_images_from_the_base_model(obama, ledger):
    crops, hashes = obama
    settings = IdentitySettings(dp_enabled=False, steps=2, prior_preservation=True, num_class_images=2,
                                class_inference_steps=2, prior_loss_weight=0.5)
    base = load_base_model(None)
    images = identity.generate_class_images(base.components, settings, 2)
    assert len(images) == 2 and images[0].shape == (64, 64, 3) and images[0].dtype == np.uint8
    ts = identity.prepare_training_set(base.components, crops, settings, images)
    assert len(ts) == 6 and ts.n_instance == 4
    assert ts.prompt_index.tolist() == [0, 0, 0, 0, 1, 1] and ts.loss_weight.tolist()[-1] == 0.5
    adapter = identity.train_identity_adapter(crops, settings, ledger=ledger, person_ref="c" * 64, photo_sha256=hashes,
                                              base=base, progress=False)
    assert adapter.privacy.steps == 2


def test_bad_inputs_are_refused_with_a_reason(obama, tmp_path, ledger):
    crops, hashes = obama
    settings = IdentitySettings(dp_enabled=False, steps=1)
    with pytest.raises(identity.IdentityTrainingError) as exc:
        identity.train_identity_adapter(crops[:2], settings, ledger=ledger, person_ref="x", photo_sha256=hashes[:2])
    assert exc.value.reason == "crop_count"
    with pytest.raises(identity.IdentityTrainingError) as exc:
        identity.train_identity_adapter([c[:, :40] for c in crops], settings, ledger=ledger, person_ref="x", photo_sha256=hashes)
    assert exc.value.reason == "bad_crop"
    with pytest.raises(identity.IdentityTrainingError) as exc:
        identity.train_identity_adapter(crops, settings, ledger=ledger, person_ref="x")
    assert exc.value.reason == "missing_photo_hashes"
    missing = tmp_path / "no-such-sd15"
    with pytest.raises(ModelNotFound, match=str(missing)):
        identity.train_identity_adapter(crops, IdentitySettings(base_model=missing), ledger=ledger, person_ref="x",
                                        photo_sha256=hashes)
    with pytest.raises(identity.IdentityTrainingError) as exc:
        identity.train_identity_adapter(
            crops, IdentitySettings(noise_multiplier=None, target_epsilon=None, steps=1), ledger=ledger, person_ref="x",
            photo_sha256=hashes, progress=False)
    assert exc.value.reason == "dp_config"


def test_epsilon_of_repeated_runs_composes_through_the_accountant():
    from opacus.accountants import RDPAccountant

    from megaportrait.shared.records import PrivacyReport

    reports = [PrivacyReport(epsilon=1.0, delta=1e-5, noise_multiplier=1.1, max_grad_norm=0.1, steps=10,
                             sample_rate=0.5, accountant="rdp") for _ in range(3)]
    acc = RDPAccountant()
    acc.history = [(1.1, 0.5, 10)] * 3
    assert identity.compose_epsilon(reports, 1e-5) == pytest.approx(acc.get_epsilon(1e-5))
    assert identity.compose_epsilon(reports, 1e-5) > identity.compose_epsilon(reports[:1], 1e-5)


def test_expanded_weights_and_hooks_give_the_same_per_sample_gradients(obama):
    """The default Opacus mode ("ew", faster) computes the same per-sample LoRA gradients as "hooks"."""
    from opacus import GradSampleModule
    from opacus.grad_sample.gsm_exp_weights import GradSampleModuleExpandedWeights

    crops, _ = obama
    settings = IdentitySettings()
    rng = np.random.default_rng(0)
    arrays, grads = None, {}
    for name, wrap in (("hooks", GradSampleModule), ("ew", GradSampleModuleExpandedWeights)):
        base = load_base_model(None)
        ts = identity.prepare_training_set(base.components, crops[:3], settings)
        unet = identity.attach_lora(base.components["unet"], settings)
        arrays = arrays or [rng.standard_normal(a.shape).astype(np.float32) * 0.1
                            for a in identity.get_lora_arrays(unet)]
        identity.set_lora_arrays(unet, arrays)  # non-zero lora_B, so lora_A gets gradients too
        model = wrap(unet.train())
        rows = (ts.moments, ts.prompt_index, ts.loss_weight)
        loss = identity._per_sample_loss(model, base.components["scheduler"], ts, rows,
                                         torch.Generator().manual_seed(0), unet.device, unet.dtype).mean()
        loss.backward()
        params = dict(unet.named_parameters())
        grads[name] = [params[n].grad_sample.detach().clone() for n in identity.lora_parameter_names(unet)]
        model.to_standard_module()
    assert grads["ew"][0].shape[0] == 3
    for a, b in zip(grads["hooks"], grads["ew"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# --- the consent gate ----------------------------------------------------------------------------------------


def _refused_checks(ledger) -> list[str]:
    return [e.detail["reason"] for e in audit.read_entries(ledger.audit.path) if e.action == "consent.check" and e.outcome == "refused"]


def test_training_is_refused_without_personal_adapter_consent(obama, tmp_path):
    crops, hashes = obama
    ledger = _ledger(tmp_path)
    ledger.grant("p-1", ["render"], granted_by="subject", actor="operator:1")  # another purpose does not count
    missing = tmp_path / "no-such-sd15"  # the check runs before the base model is even looked for
    with pytest.raises(consent.ConsentMissing) as err:
        identity.train_identity_adapter(crops, IdentitySettings(base_model=missing), ledger=ledger, person_ref="p-1",
                                        photo_sha256=hashes)
    assert (err.value.person, err.value.purpose) == ("p-1", "personal_adapter")
    assert _refused_checks(ledger) == ["consent_missing"]


def test_training_is_refused_after_expiry_and_after_revocation(obama, tmp_path):
    from datetime import datetime, timedelta, timezone

    crops, hashes = obama
    ledger = _ledger(tmp_path)
    long_ago = datetime.now(timezone.utc) - timedelta(days=400)  # personal_adapter: max 1y
    ledger.grant("p-old", ["personal_adapter"], granted_by="subject", actor="operator:1", at=long_ago)
    ledger.grant("p-rev", ["personal_adapter"], granted_by="subject", actor="operator:1")
    ledger.revoke("p-rev", by="subject")
    missing = tmp_path / "no-such-sd15"
    with pytest.raises(consent.ConsentExpired):
        identity.train_identity_adapter(crops, IdentitySettings(base_model=missing), ledger=ledger, person_ref="p-old", photo_sha256=hashes)
    with pytest.raises(consent.ConsentRevoked):
        identity.train_identity_adapter(crops, IdentitySettings(base_model=missing), ledger=ledger, person_ref="p-rev", photo_sha256=hashes)
    assert _refused_checks(ledger) == ["consent_expired", "consent_revoked"]


def test_consent_revoked_during_training_discards_the_adapter(obama, tmp_path):
    crops, hashes = obama
    ledger = _ledger(tmp_path)
    ledger.grant("p-1", ["personal_adapter"], granted_by="subject", actor="operator:1")
    checks = []
    real_require = ledger.require

    def require(person_ref, purpose, at=None, *, actor="system"):
        receipt = real_require(person_ref, purpose, at, actor=actor)
        checks.append(purpose)
        if len(checks) == 1:  # the person withdraws consent while their adapter trains
            ledger.revoke(person_ref, by="subject")
        return receipt

    ledger.require = require  # the ledger itself is real; only the moment of revocation is staged
    with pytest.raises(consent.ConsentRevoked):
        identity.train_identity_adapter(crops, IdentitySettings(dp_enabled=False, steps=1), ledger=ledger, person_ref="p-1",
                                        photo_sha256=hashes, progress=False)
    assert checks == ["personal_adapter"] and _refused_checks(ledger) == ["consent_revoked"]
