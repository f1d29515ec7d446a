"""Tiny in-code diffusion components and base-model loading (tiny, diffusers directory, single file, missing)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megaportrait.shared import tiny_models
from megaportrait.shared.base_models import load_base_model, unet_sha256
from megaportrait.shared.errors import ModelNotFound


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tokenizer_knows_the_prompt_words_and_the_rare_token():
    tok = tiny_models.tiny_tokenizer()
    ids = tok("a photo of sks person").input_ids
    assert tok.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "photo</w>", "of</w>", "sks</w>", "person</w>", "<|endoftext|>"]
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of sks person"
    # An unknown word is still encoded (byte by byte), as CLIP's BPE would.
    assert len(tok("qzx").input_ids) == 2 + 3
    padded = tok("a photo of sks person", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and max(padded) < tiny_models.tiny_text_encoder().config.vocab_size


def test_same_seed_same_weights_and_the_global_rng_is_left_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_models.tiny_unet(0)
    assert torch.equal(torch.rand(3), expected)
    assert unet_sha256(a) == unet_sha256(tiny_models.tiny_unet(0)) != unet_sha256(tiny_models.tiny_unet(1))


def test_pipeline_renders_and_lora_targets_exist():
    from diffusers import StableDiffusionPipeline

    components = tiny_models.tiny_pipeline_components(0)
    names = [n for n, _ in components["unet"].named_modules()]
    for target in ("to_q", "to_k", "to_v", "to_out.0"):
        assert any(n.endswith("attn2." + target) for n in names)
    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    run = lambda p: pipe(p, num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0),
                         output_type="np").images[0]
    image = run("a photo of sks person")
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    assert np.abs(image - run("a photo of person")).max() > 0  # the prompt reaches the UNet


def test_controlnet_conditioning_changes_the_output():
    from diffusers import StableDiffusionControlNetPipeline

    components = tiny_models.tiny_pipeline_components(0)
    controlnet = tiny_models.build_tiny_controlnet(components["unet"])
    pipe = StableDiffusionControlNetPipeline(**components, controlnet=controlnet, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    from PIL import Image

    def run(control: np.ndarray) -> np.ndarray:
        return pipe("a photo of sks person", image=Image.fromarray(control), num_inference_steps=2, height=64,
                    width=64, generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    dark, edges = np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64, 3), np.uint8)
    edges[16:48, 30:34] = 255
    assert np.abs(run(dark) - run(edges)).max() > 1e-4


def test_tiny_base_model_is_labelled_and_hashed():
    base = load_base_model(None)
    assert base.ref.kind == "tiny-embedded" and base.ref.sha256 == unet_sha256(base.components["unet"])
    assert load_base_model(None, seed=1).ref.sha256 != base.ref.sha256


def test_diffusers_directory_loads_offline_with_the_same_identity_in_any_precision(tmp_path):
    base = load_base_model(None)
    base.pipeline().save_pretrained(tmp_path / "sd")
    loaded = load_base_model(tmp_path / "sd")
    assert loaded.ref.kind == "diffusers-dir" and loaded.ref.name == "sd"
    assert loaded.ref.sha256 == base.ref.sha256
    half = load_base_model(tmp_path / "sd", dtype=torch.float16)
    assert half.components["unet"].dtype == torch.float16 and half.ref.sha256 == base.ref.sha256
    ids = loaded.components["tokenizer"]("a photo of sks person").input_ids
    assert ids == base.components["tokenizer"]("a photo of sks person").input_ids


def test_missing_or_unusable_paths_raise_model_not_found_naming_them(tmp_path):
    for path in (tmp_path / "nowhere", tmp_path / "nowhere.safetensors"):
        with pytest.raises(ModelNotFound, match=str(path)) as exc:
            load_base_model(path)
        assert exc.value.path == path
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="model_index.json"):
        load_base_model(tmp_path / "empty")
    odd = tmp_path / "weights.txt"
    odd.write_text("not a checkpoint")
    with pytest.raises(ModelNotFound, match="single-file"):
        load_base_model(odd)
    ckpt = tmp_path / "sd15.safetensors"
    ckpt.write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFound, match="config"):
        load_base_model(ckpt, config_dir=tmp_path / "no-configs")


def test_single_file_without_configs_names_what_is_missing(tmp_path):
    ckpt = tmp_path / "sd15.safetensors"
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, ckpt)
    with pytest.raises(ModelNotFound, match="base_model_config") as exc:
        load_base_model(ckpt)
    assert exc.value.path == ckpt
