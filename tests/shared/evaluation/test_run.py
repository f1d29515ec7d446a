"""A quick evaluation on a subset of the real photos, through the `megaportrait eval` command.

One run (about a minute on 2 cores) feeds every test here: JSON keys and sane values, plots, HTML.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from megaportrait.shared.face_analysis import SFACE_THRESHOLD


@pytest.fixture(scope="module")
def quick_eval(shared_data: Path, tmp_path_factory) -> tuple[dict, Path]:
    from megaportrait.shared.cli import app

    out = tmp_path_factory.mktemp("eval")
    result = CliRunner().invoke(app, ["eval", "--quick", "--people", str(shared_data / "people"), "--templates",
                                      str(shared_data / "templates"), "--extra-faces", str(shared_data / "hard"),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "eval.json").read_text()), out


def test_identity_full_renders_verify_genuine_and_reject_impostors(quick_eval):
    res, _ = quick_eval
    ident = res["identity"]
    assert set(ident["by_stage"]) == {"none", "identity", "identity+shading", "full"}
    full = [r for r in ident["renders"] if r["stage"] == "full"]
    # 2 people x 2 photos (leave one out) x 2 templates
    assert len(full) == 8 and all(r["face_found"] for r in full)
    for r in full:
        assert r["identity"] >= SFACE_THRESHOLD, r
        assert min(r["genuine"]) >= SFACE_THRESHOLD, r
        assert max(r["impostor"]) < SFACE_THRESHOLD, r
    assert ident["by_stage"]["full"]["tar"] == 1.0 and ident["by_stage"]["full"]["far"] == 0.0
    # Collateral change (issue 17) is reported beside identity; the full render keeps the template's hair/background.
    assert all(r["collateral"] is not None for r in full)
    assert ident["by_stage"]["full"]["max_collateral"] <= 0.03
    # Control: the template alone is not the person.
    none = ident["by_stage"]["none"]
    assert none["tar"] == 0.0 and none["mean_template_leak"] > 0.99
    assert res["headline"]["full"]["accuracy"] == ident["by_stage"]["full"]["accuracy"]


def test_fairness_groups_by_both_bands_and_says_when_too_few(quick_eval):
    res, _ = quick_eval
    fair = res["fairness"]
    tpl_bands = {v["band"] for v in res["meta"]["templates"].values()}
    assert set(fair["template_band"]["by_band"]) == tpl_bands
    assert sum(g["n_renders"] for g in fair["template_band"]["by_band"].values()) == 8
    person = fair["person_band"]
    assert set(person["by_band"]) == {v["band"] for v in res["meta"]["people"].values()}
    assert person["conclusive"] is False and "few people" in person["verdict"]
    for grouping in (fair["template_band"], person):
        for g in grouping["by_band"].values():
            assert 0.0 <= g["tar"] <= 1.0 and -1.0 <= g["mean_identity"] <= 1.0
        if len(grouping["by_band"]) >= 2:
            gap = grouping["gaps"]["mean_identity"]
            values = [g["mean_identity"] for g in grouping["by_band"].values()]
            assert gap["gap"] == pytest.approx(max(values) - min(values))


def test_robustness_degradations_are_ordered_and_refusals_reported(quick_eval):
    res, _ = quick_eval
    rob = res["robustness"]["by_degradation"]
    assert set(rob) == {"low_light", "low_resolution", "blur", "jpeg"}
    for kind, v in rob.items():
        assert len(v["levels"]) == 3
        assert v["failures_grow_with_severity"], (kind, v["levels"])
        for level in v["levels"]:
            assert level["n_refused"] == sum(level["refusal_reasons"].values())
    # The darkest exposure is refused by intake as too dark, with that reason recorded per photo.
    assert rob["low_light"]["levels"][-1]["refusal_reasons"].get("too_dark") == 2
    # JPEG at quality 4 costs more identity than at quality 30.
    jpeg = rob["jpeg"]["levels"]
    assert jpeg[-1]["mean_drop"] > jpeg[0]["mean_drop"] + 0.03
    refused = [c for c in res["robustness"]["cases"] if c["refused"]]
    assert refused and all(c["refusal_detail"] and not c["identity"] for c in refused)


def test_privacy_audit_reports_every_figure_and_no_dp_result_without_power(quick_eval):
    res, _ = quick_eval
    priv = res["privacy"]
    control = priv["arms"]["positive_control"]
    assert control["n_scores"] > 0 and 0.0 <= control["auc"] <= 1.0 and control["epsilon_per_photo"] is None
    assert control["ci95"]["auc"][0] <= control["auc"] <= control["ci95"]["auc"][1]
    assert {"tpr_at_fpr_1pct", "tpr_at_fpr_0.1pct", "canary", "person_level"} <= set(control)
    # the quick audit is too small for its positive control: the report must say so and hide the DP arm
    assert priv["powered"] == (control["auc"] >= 0.8)
    if not priv["powered"]:
        assert "NO POWER" in priv["verdict"] and "production_dp" not in priv["arms"]
    else:
        dp = priv["arms"]["production_dp"]
        assert dp["epsilon_per_photo"] > 0 and "bound_tpr_at_fpr_1pct" in dp
    curve = priv["curve"]
    assert [r["noise_multiplier"] for r in curve] == [None, 1.0]
    assert curve[1]["epsilon_per_person"] > curve[1]["epsilon_per_photo"] > 0


def test_outputs_plots_and_html(quick_eval):
    res, out = quick_eval
    for name in ("identity_by_stage", "fairness_by_band", "robustness", "privacy_audit"):
        png = out / "plots" / f"{name}.png"
        img = np.asarray(Image.open(png).convert("RGB"))
        assert img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 10, name
    html = (out / "report.html").read_text()
    for title in ("Identity preservation by stage", "Fairness by skin tone", "Robustness to poor source photos",
                  "Privacy: LiRA membership audit"):
        assert title in html
    assert len(re.findall(r"data:image/png;base64,", html)) >= 4 + 4  # 4 plots + 4 example renders
    assert set(res) >= {"meta", "identity", "fairness", "robustness", "privacy", "headline"}


def test_without_base_model_the_curve_has_no_identity_axis_and_says_why(quick_eval):
    """No --base-model: eval.json's curve and config are as before the option (no identity keys), and the report
    says the identity axis needs a configured base model."""
    res, out = quick_eval
    assert all("render_identity" not in r for r in res["privacy"]["curve"])
    assert "curve_render" not in res["meta"]["config"]
    assert "Identity on the privacy-utility curve needs a configured base model" in (out / "report.html").read_text()


@pytest.fixture(scope="module")
def tiny_diffusers_dir(tmp_path_factory) -> Path:
    """The tiny in-code model saved in diffusers layout: a base-model path that loads offline."""
    from megaportrait.shared.base_models import load_base_model

    path = tmp_path_factory.mktemp("tiny-base")
    load_base_model(None).pipeline().save_pretrained(path)
    return path


@pytest.mark.slow
def test_base_model_gives_the_curve_a_render_identity_axis(shared_data: Path, tiny_diffusers_dir: Path,
                                                          tmp_path: Path):
    """--base-model: each noise level's adapter trains on that model and renders with the diffusion backend; the
    tiny random model draws no face, so identity is None with that reason (no made-up number), recorded in
    eval.json, the report table and the plot's second axis."""
    from megaportrait.shared.cli import app

    params = json.dumps({"resolution": 64, "scheduler": "ddim", "identity": {"steps": 2}})
    result = CliRunner().invoke(app, ["eval", "--quick", "--people", str(shared_data / "people"), "--templates",
                                      str(shared_data / "templates"), "--extra-faces", str(shared_data / "hard"),
                                      "--out", str(tmp_path), "--base-model", str(tiny_diffusers_dir),
                                      "--diffusion-device", "cpu"],
                                env={"MEGAPORTRAIT_RENDER__DIFFUSION_PARAMS": params,
                                     "MEGAPORTRAIT_IDENTITY__RESOLUTION": "96"})
    assert result.exit_code == 0, result.output
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["meta"]["config"]["curve_render"]["diffusion_base_model"] == str(tiny_diffusers_dir)
    # the curve's adapters train as the site trains them on that model (identity.resolution), the audit's at 64
    assert res["meta"]["config"]["attack"]["curve_resolution"] == 96
    assert res["meta"]["config"]["attack"]["resolution"] == 64
    curve = res["privacy"]["curve"]
    assert [r["noise_multiplier"] for r in curve] == [None, 1.0]
    for r in curve:
        ri = r["render_identity"]
        assert ri["base_model"]["kind"] == "diffusers-dir" and ri["template"]
        people = set(ri["by_person"])
        assert people and people <= set(res["meta"]["people"])
        assert ri["mean_cosine"] is None and ri["faces_found"] == 0
        assert set(ri["by_person"].values()) == {None}
        assert "no face detected in the render" in ri["note"]
    html = (tmp_path / "report.html").read_text()
    assert "render identity (SFace cosine to the held-out photo)" in html
    assert "none: no face detected in any render" in html and "needs a configured base model" not in html


def test_missing_base_model_fails_naming_the_path(shared_data: Path, tmp_path: Path):
    from megaportrait.shared.cli import app

    missing = tmp_path / "no-such-model"
    result = CliRunner().invoke(app, ["eval", "--quick", "--people", str(shared_data / "people"), "--templates",
                                      str(shared_data / "templates"), "--out", str(tmp_path / "out"),
                                      "--base-model", str(missing)])
    assert result.exit_code == 1
    assert "model_not_found" in result.output and str(missing) in result.output.replace("\n", "")
    assert not (tmp_path / "out" / "eval.json").exists()
