"""The LiRA audit's statistics find members when they are there and nothing when they are not; the audit hides DP
results when its positive control has no power; a tiny real run produces every reported figure."""
from __future__ import annotations

import numpy as np
import pytest

from megaportrait.shared.evaluation import lira


def _synthetic(shift: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    adapters, photos = 16, 12
    members = np.zeros((adapters, photos), bool)
    for a in range(adapters):
        members[a, rng.choice(photos, 4, replace=False)] = True
    base = rng.normal(1.0, 0.1, photos)
    difficulty = rng.normal(0, 0.05, photos)  # per-photo offset LiRA must normalise away
    losses = base[None] - difficulty[None] - shift * members + rng.normal(0, 0.01, members.shape)
    return losses, base, members


def test_lira_separates_members_from_non_members_and_only_when_they_differ():
    losses, base, members = _synthetic(shift=0.05)
    scores, valid = lira.lira_scores(losses, base, members)
    s, lab = scores[valid], members[valid].astype(int)
    strong = lira._metrics(s, lab)
    assert strong["auc"] > 0.95 and strong["tpr_at_fpr_1pct"] > 0.5
    losses, base, members = _synthetic(shift=0.0)
    scores, valid = lira.lira_scores(losses, base, members)
    null = lira._metrics(scores[valid], members[valid].astype(int))
    assert 0.35 < null["auc"] < 0.65 and null["tpr_at_fpr_1pct"] < 0.2
    photo = np.broadcast_to(np.arange(members.shape[1]), members.shape)[valid]
    ci = lira.bootstrap_over_photos(scores[valid], members[valid].astype(int), photo, 200, 0)
    assert ci["auc"][0] < 0.5 < ci["auc"][1]


def test_adapter_calibration_removes_each_adapters_shift():
    """Adapters differ in how much they lower every photo's loss (their row count, their steps); that shift hides a
    member's extra reduction from plain LiRA and is removed by subtracting the adapter's median over the pool."""
    rng = np.random.default_rng(1)
    adapters, photos = 16, 12
    members = np.zeros((adapters, photos), bool)
    for a in range(adapters):
        members[a, rng.choice(photos, 3, replace=False)] = True
    base = rng.normal(1.0, 0.1, photos)
    shift = rng.normal(0, 0.05, (adapters, 1))
    losses = base[None] - shift - 0.02 * members + rng.normal(0, 0.004, members.shape)
    plain = lira._metrics(*(lambda s, v: (s[v], members[v].astype(int)))(*lira.lira_scores(losses, base, members)))
    offsets = lira.adapter_offsets(losses, base)
    assert offsets == pytest.approx(shift.ravel(), abs=0.01)
    scores, valid = lira.lira_scores(losses, base, members, offsets)
    calibrated = lira._metrics(scores[valid], members[valid].astype(int))
    assert plain["auc"] < 0.75 and calibrated["auc"] > 0.95, (plain, calibrated)


def test_tpr_at_fpr():
    scores = np.array([5, 4, 3, 2, 1, 0.0])
    labels = np.array([1, 1, 0, 1, 0, 0])
    assert lira.tpr_at_fpr(scores, labels, 0.0) == pytest.approx(2 / 3)
    assert lira.tpr_at_fpr(scores, labels, 0.34) == pytest.approx(1.0)


@pytest.mark.slow
def test_a_tiny_real_audit_has_power_and_compares_dp_with_its_bound(templates):
    """Positive control on a tiny config (4 adapters, 1 photo each, 400 steps, no DP): it must reach AUC 0.8. If
    the attack, the scores or the membership bookkeeping break, it does not."""
    from megaportrait.shared.evaluation.privacy import face_pool
    from megaportrait.shared.face_analysis import FaceAnalyzer

    pool, _ = face_pool(templates[:8], FaceAnalyzer(), size=64)
    settings = lira.LiraSettings(adapters=4, pool_size=4, photos_per_adapter=1, draws=8, bootstrap=50, canaries=4,
                                 arms=(lira.ArmSettings("positive_control", 400, 1e-2, None),
                                       lira.ArmSettings("production_dp", 4, 1e-3, 1.0)),
                                 curve_noise=(), curve_steps=2)
    out = lira.run_lira_audit(pool, {}, settings)
    print(out["verdict"])
    assert out["powered"] and out["arms"]["positive_control"]["auc"] >= 0.8
    dp = out["arms"]["production_dp"]
    assert dp["epsilon_per_photo"] > 0 and dp["bound_tpr_at_fpr_1pct"] == pytest.approx(
        min(1.0, np.exp(dp["epsilon_per_photo"]) * 0.01 + 1e-5))
    assert isinstance(dp["within_bound"], bool)
    assert {"exposure_mean", "exposure_at_chance"} <= set(dp["canary"])
    # Without power the DP arm is not shown.
    powered, verdict, shown = lira.power_verdict(out["arms"], 1.01)
    assert not powered and "NO POWER" in verdict and set(shown) == {"positive_control"}


@pytest.mark.slow
def test_privacy_utility_curve_accounts_each_noise_level(people):
    """The library curve (run by megaportrait eval and the demo): Obama's 4 photos, 3 trained and 1 held out, at 2
    steps: inf without noise, epsilon falling as the noise grows, per person above per photo, finite losses; no
    person with 2 photos is a clear error."""
    from megaportrait.shared.base_models import load_base_model
    from megaportrait.shared.evaluation.dataset import EvaluationError
    from megaportrait.shared.evaluation.privacy import face_pool
    from megaportrait.shared.face_analysis import FaceAnalyzer

    crops, _ = face_pool(people["obama"], FaceAnalyzer(), size=64)
    components = load_base_model(None).components
    settings = lira.LiraSettings(curve_noise=(None, 4.0, 1.0), curve_steps=2, draws=4)
    points = lira.privacy_utility_curve(components, {"obama": crops, "nobody": crops[:1]}, settings)
    assert [p.noise_multiplier for p in points] == [None, 4.0, 1.0] and {p.people for p in points} == {1}
    assert np.isinf(points[0].epsilon_per_photo) and np.isinf(points[0].epsilon_per_person)
    assert 0 < points[1].epsilon_per_photo < points[2].epsilon_per_photo < np.inf
    assert all(p.epsilon_per_person > p.epsilon_per_photo for p in points[1:])
    assert all(np.isfinite(p.heldout_denoising_loss) and p.heldout_denoising_loss > 0 for p in points)
    with pytest.raises(EvaluationError, match="at least 2 photos.*nobody: 1"):
        lira.privacy_utility_curve(components, {"nobody": crops[:1]}, settings)
