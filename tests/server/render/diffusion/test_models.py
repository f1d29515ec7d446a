"""Model loading for the diffusion backend: local paths only, clear errors naming what is missing."""
from __future__ import annotations

import pytest
import torch

from megaportrait.server.render.diffusion.models import load_models, make_scheduler, resolve_device
from megaportrait.server.render.diffusion.params import SCHEDULER_NAMES
from megaportrait.shared.config import RenderSettings
from megaportrait.shared.errors import MegaPortraitError, ModelNotFound


def test_missing_base_model_names_the_path(tmp_path):
    missing = tmp_path / "sd15-not-here"
    with pytest.raises(ModelNotFound, match=str(missing)):
        load_models(RenderSettings(diffusion_device="cpu", diffusion_base_model=missing))
    not_diffusers = tmp_path / "empty-dir"
    not_diffusers.mkdir()
    with pytest.raises(ModelNotFound, match="model_index.json"):
        load_models(RenderSettings(diffusion_device="cpu", diffusion_base_model=not_diffusers))


def test_missing_or_unknown_controlnet_names_the_path(tmp_path):
    gone = tmp_path / "controlnet-depth"
    with pytest.raises(ModelNotFound, match=str(gone)):
        load_models(RenderSettings(diffusion_device="cpu", diffusion_controlnets={"depth": gone}))
    gone.mkdir()
    with pytest.raises(ModelNotFound, match="unknown condition 'openpose'"):
        load_models(RenderSettings(diffusion_device="cpu", diffusion_controlnets={"openpose": gone}))


def test_local_diffusers_dirs_load_and_unconfigured_controlnets_refuse(tmp_path):
    """A base model and a ControlNet saved as diffusers folders load offline; a condition with no configured
    ControlNet is refused for a real (non-tiny) base model, naming the config key."""
    from diffusers import StableDiffusionPipeline

    from megaportrait.shared import tiny_models

    components = tiny_models.tiny_pipeline_components(seed=3)
    StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "base")
    tiny_models.build_tiny_controlnet(components["unet"], seed=4).save_pretrained(tmp_path / "cn-depth")

    models = load_models(RenderSettings(diffusion_device="cpu", diffusion_base_model=tmp_path / "base",
                                        diffusion_controlnets={"depth": tmp_path / "cn-depth"}))
    assert models.base_model.kind == "diffusers-dir" and models.dtype == torch.float32
    net = models.controlnet("depth")
    assert models.sources["depth"] == str(tmp_path / "cn-depth")
    assert next(net.parameters()).dtype == torch.float32
    with pytest.raises(ModelNotFound, match=r"diffusion_controlnets\['landmarks'\]"):
        models.controlnet("landmarks")
    # The loaded weights are the saved ones: same UNet hash as the in-code model with that seed.
    from megaportrait.shared.base_models import unet_sha256

    assert models.base_model.sha256 == unet_sha256(components["unet"])


def test_single_file_controlnet_needs_its_config_beside_it(tmp_path):
    from megaportrait.server.render.diffusion.models import load_controlnet

    f = tmp_path / "cn" / "control_depth.safetensors"
    f.parent.mkdir()
    f.write_bytes(b"not really weights")
    with pytest.raises(ModelNotFound, match="config.json"):
        load_controlnet("depth", f, torch.float32)


def test_device_and_precision_follow_the_config():
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(MegaPortraitError, match="no CUDA device"):
            resolve_device("cuda")


def test_every_named_scheduler_builds_on_the_base_schedule(tiny_models):
    config = tiny_models.components["scheduler"].config
    for name in SCHEDULER_NAMES:
        sched = make_scheduler(name, config)
        assert sched.config.num_train_timesteps == config.num_train_timesteps
        assert sched.config.beta_schedule == config.beta_schedule
    with pytest.raises(KeyError):
        make_scheduler("heun-2", config)


def test_single_file_controlnet_loads_with_its_config(tmp_path):
    from safetensors.torch import save_file

    from megaportrait.server.render.diffusion.models import load_controlnet
    from megaportrait.shared import tiny_models

    net = tiny_models.build_tiny_controlnet(tiny_models.tiny_unet(0), seed=7)
    net.save_pretrained(tmp_path / "as-dir")
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text((tmp_path / "as-dir" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, single / "control_depth.safetensors")
    loaded = load_controlnet("depth", single / "control_depth.safetensors", torch.float32)
    ref = net.state_dict()
    assert all(torch.equal(loaded.state_dict()[k], ref[k]) for k in ref)
