"""The evaluation's building blocks on small, known inputs: AUC, verification counts, degradations, band spread."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megaportrait.shared.evaluation.dataset import EvaluationError, Template, find_folders, spread_over_bands
from megaportrait.shared.evaluation.identity import verification
from megaportrait.shared.evaluation.privacy import rank_auc
from megaportrait.shared.evaluation.robustness import blur, jpeg, low_light, low_resolution


def test_rank_auc_matches_pair_counting():
    assert rank_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert rank_auc([0, 1], [2, 3]) == 0.0
    assert rank_auc([1, 1], [1, 1]) == 0.5
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(0.5, 1, 40).round(1), rng.normal(0, 1, 30).round(1)  # rounding makes ties
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert rank_auc(pos, neg) == pytest.approx(pairs)
    with pytest.raises(ValueError):
        rank_auc([], [1.0])


def test_verification_counts_missing_faces_as_rejections():
    v = verification([0.9, 0.5, 0.2], [0.1, 0.4], n_genuine_missing=1, n_impostor_missing=2, threshold=0.363)
    assert v["n_genuine_pairs"] == 4 and v["n_impostor_pairs"] == 4
    assert v["tar"] == pytest.approx(2 / 4)
    assert v["far"] == pytest.approx(1 / 4)
    assert v["accuracy"] == pytest.approx((2 + 3) / 8)


def test_degradations_get_worse_with_severity(astronaut):
    face_px = 200.0
    means = [low_light(astronaut, e).mean() for e in (0.35, 0.12, 0.04)]
    assert means[0] < astronaut.mean() and means[0] > means[1] > means[2]
    small = low_resolution(astronaut, face_px, 50.0)
    assert small.shape == (128, 128, 3) and small.dtype == np.uint8
    assert low_resolution(astronaut, face_px, 400.0).shape == astronaut.shape  # never upsampled

    def err(x):
        return float(np.abs(x.astype(float) - astronaut).mean())

    assert err(jpeg(astronaut, 30)) < err(jpeg(astronaut, 12)) < err(jpeg(astronaut, 4))
    assert err(blur(astronaut, face_px, 0.002)) < err(blur(astronaut, face_px, 0.008))


def _template(name: str, ita: float, band: str) -> Template:
    return Template(name=name, image=None, face=None, ita=ita, band=band)  # type: ignore[arg-type]


def test_spread_over_bands_covers_bands_before_repeating():
    ts = [_template("a", 60, "very light"), _template("b", 58, "very light"), _template("c", 30, "intermediate"),
          _template("d", 5, "brown"), _template("e", 3, "brown")]
    picked = spread_over_bands(ts, 3)
    assert {t.band for t in picked} == {"very light", "intermediate", "brown"}
    assert [t.name for t in spread_over_bands(ts, None)] == ["a", "b", "c", "d", "e"]


def test_find_folders_refuses_missing_or_single_person(tmp_path: Path):
    with pytest.raises(EvaluationError, match="does not exist"):
        find_folders(tmp_path / "nope", tmp_path)
    (tmp_path / "people" / "solo").mkdir(parents=True)
    (tmp_path / "people" / "solo" / "a.jpg").write_bytes(b"x")
    (tmp_path / "templates").mkdir()
    with pytest.raises(EvaluationError, match="at least 2"):
        find_folders(tmp_path / "people", tmp_path / "templates")


def test_attack_latents_and_fixed_draw_losses():
    import torch

    from megaportrait.client.identity import TrainingSet
    from megaportrait.shared.evaluation.privacy import per_crop_losses, sd_like
    from megaportrait.shared.tiny_models import tiny_scheduler, tiny_unet

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    moments = torch.cat([torch.randn(5, 2, 4, 8, 8, generator=gen) * 0.2, torch.ones(5, 2, 4, 8, 8)], dim=2)
    ts = TrainingSet(moments=moments, prompt_index=torch.zeros(5, dtype=torch.long), loss_weight=torch.ones(5),
                     prompt_embeds=torch.randn(2, 77, 32, generator=gen), n_instance=5, scaling_factor=0.18215)
    like = sd_like(ts)
    assert torch.equal(like.moments[:, :, :4], moments[:, :, :4]) and float(like.moments[:, :, 4:].abs().max()) == 0.0
    assert float((like.moments[:, :, :4] * like.scaling_factor).std()) == pytest.approx(1.0, rel=1e-4)
    components = {"unet": tiny_unet(0), "scheduler": tiny_scheduler("ddpm")}
    a = per_crop_losses(components, like, seed=3, draws=2, max_timestep=100)
    b = per_crop_losses(components, like, seed=3, draws=2, max_timestep=100)
    c = per_crop_losses(components, like, seed=4, draws=2, max_timestep=100)
    assert a.shape == (5,) and np.all(a > 0) and np.array_equal(a, b) and not np.array_equal(a, c)
