"""Diffusion parameters: defaults, layering, and refusals that name the bad key."""
from __future__ import annotations

import pytest

from megaportrait.server.render.diffusion.params import DiffusionParams, InvalidRenderParams, parse_params


def test_layers_merge_key_by_key_with_later_layers_winning():
    p = parse_params({"scheduler": "ddim", "shading": {"strength": 0.5}},
                     {"shading": {"steps": 12}, "identity": {"controls": "depth"}})
    assert p.scheduler == "ddim"
    assert p.shading.strength == 0.5 and p.shading.steps == 12
    assert p.shading.controls == DiffusionParams().shading.controls
    assert p.identity.controls == ("depth",) and p.identity.control_scales == (1.0,)
    assert parse_params() == DiffusionParams()


@pytest.mark.parametrize("bad, where", [
    ({"sheduler": "ddim"}, "sheduler"),
    ({"scheduler": "heun-2"}, "scheduler"),
    ({"resolution": 100}, "resolution"),
    ({"prompt": "a photo of a person"}, "prompt"),
    ({"shading": {"strength": 1.5}}, "shading.strength"),
    ({"shading": {"stregth": 0.3}}, "shading.stregth"),
    ({"identity": {"controls": ["openpose"]}}, "identity.controls"),
    ({"harmonize": {"controls": ["tile"], "control_scales": [0.5, 0.5]}}, "harmonize.control_scales"),
    ({"identity": {"steps": "many"}}, "identity.steps"),
    ({"harmonize": {"steps": 2, "strength": 0.2}}, "harmonize"),
    ({"identity": 3}, "identity"),
])
def test_bad_params_are_refused_naming_the_key(bad, where):
    with pytest.raises(InvalidRenderParams) as info:
        parse_params(bad)
    assert str(info.value).startswith(where)
    assert info.value.reason == "render_params_invalid"


def test_metadata_holds_every_value():
    md = parse_params({"harmonize": {"strength": 0.3}}).as_metadata()
    assert md["harmonize"]["strength"] == 0.3
    assert {"resolution", "scheduler", "prompt", "negative_prompt", "identity", "shading", "harmonize"} <= set(md)
    assert set(md["identity"]) == {"steps", "guidance", "strength", "controls", "control_scales", "lora_scale"}
