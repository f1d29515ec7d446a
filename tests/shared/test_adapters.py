"""Identity adapters: safetensors bytes/file roundtrip, diffusers `load_lora_weights` compatibility, base checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megaportrait.client import identity
from megaportrait.shared import adapters
from megaportrait.shared.base_models import load_base_model
from megaportrait.shared.config import IdentitySettings
from megaportrait.shared.records import IdentityAdapter, PrivacyReport

PROMPT = "a photo of sks person"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _render(pipe) -> np.ndarray:
    out = pipe(PROMPT, num_inference_steps=3, height=64, width=64, generator=torch.Generator().manual_seed(0),
               output_type="np")
    return out.images[0]


@pytest.fixture(scope="module")
def trained(astronaut):
    """An adapter trained on crops of the astronaut's face, with alpha != rank so the folded scale matters, plus
    the image the trained UNet (LoRA as trained, unfolded) renders."""
    torch.set_num_threads(1)
    face = astronaut[20:260, 130:370]  # the face and hair region of skimage's astronaut portrait
    crops = [face, face[::-1, ::-1].copy(), astronaut[30:250, 150:370], astronaut[10:270, 120:380]]
    settings = IdentitySettings(dp_enabled=False, steps=30, rank=4, alpha=8.0, learning_rate=1e-2)
    base = load_base_model(None)
    ts = identity.prepare_training_set(base.components, crops, settings)
    unet = identity.attach_lora(base.components["unet"], settings)
    identity.train_lora(base.components, ts, settings, progress=False)
    # Make the LoRA strong enough that a lost alpha/rank factor of 2 would show in the image.
    identity.set_lora_arrays(unet, [a * 3 for a in identity.get_lora_arrays(unet)])
    trained_image = _render(base.pipeline())
    adapter = IdentityAdapter(
        person_ref="f" * 64, token=settings.token, rank=settings.rank, alpha=settings.alpha,
        target_modules=settings.target_modules, lora_state=identity.lora_state_dict(unet), base_model=base.ref,
        privacy=PrivacyReport(epsilon=None, delta=1e-5, noise_multiplier=0.0, max_grad_norm=0.0, steps=30,
                                       sample_rate=1.0, accountant="none"),
        photo_sha256=("a" * 64, "b" * 64))
    identity.detach_lora(unet)
    return adapter, trained_image


def test_bytes_roundtrip_keeps_tensors_and_metadata(trained):
    adapter, _ = trained
    data = adapters.adapter_to_bytes(adapter)
    assert not data.startswith(b"\x80")  # safetensors (u64 header length + JSON), not a pickle
    back = adapters.adapter_from_bytes(data)
    assert adapters.adapter_metadata(back) == adapters.adapter_metadata(adapter)
    assert back.lora_state.keys() == adapter.lora_state.keys()
    assert all(torch.equal(back.lora_state[k], adapter.lora_state[k]) for k in adapter.lora_state)
    with pytest.raises(adapters.AdapterError):
        adapters.adapter_from_bytes(data[:100])
    with pytest.raises(adapters.AdapterError):
        adapters.adapter_from_bytes(b"not an adapter at all")


def test_saved_file_loads_into_a_stock_pipeline_and_renders_like_the_trained_unet(trained, tmp_path):
    adapter, trained_image = trained
    path = adapters.save_adapter(adapter, tmp_path / "person.safetensors")
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["base_model"]["kind"] == "tiny-embedded" and side["privacy"]["epsilon"] is None
    with pytest.raises(adapters.AdapterError):
        adapters.save_adapter(adapter, path)  # refuses to replace what is stored
    loaded = adapters.load_adapter(path)
    assert adapters.adapter_metadata(loaded) == adapters.adapter_metadata(adapter)

    base_image = _render(load_base_model(None).pipeline())
    pipe = load_base_model(None).pipeline()
    pipe.load_lora_weights(str(path))  # diffusers' own loader, straight from the file
    from_file = _render(pipe)
    pipe = load_base_model(None).pipeline()
    pipe.load_lora_weights(dict(loaded.lora_state))  # ... and from a bare state dict
    from_dict = _render(pipe)
    in_memory = _render(adapters.apply_adapter(load_base_model(None).pipeline(), adapter))

    assert np.abs(from_file - base_image).max() > 1e-3  # the adapter changes the picture
    np.testing.assert_allclose(from_file, in_memory, atol=1e-5)
    np.testing.assert_allclose(from_dict, in_memory, atol=1e-5)
    np.testing.assert_allclose(in_memory, trained_image, atol=1e-4)  # folded alpha/rank reproduces training


def test_adapter_for_another_base_model_is_refused(trained):
    adapter, _ = trained
    other = load_base_model(None, seed=1)
    with pytest.raises(adapters.BaseModelMismatch, match="retrain"):
        adapters.apply_adapter(other.pipeline(), adapter)
    with pytest.raises(adapters.BaseModelMismatch):
        adapters.apply_adapter(load_base_model(None).pipeline(), adapter, base_model=other.ref)
    assert not getattr(other.components["unet"], "peft_config", None)  # nothing was loaded


def test_a_file_that_is_not_an_adapter_is_refused(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 2)}, plain)
    with pytest.raises(adapters.AdapterError, match="not a MegaPortrait identity adapter"):
        adapters.load_adapter(plain)
    with pytest.raises(adapters.AdapterError, match="does not exist"):
        adapters.load_adapter(tmp_path / "missing.safetensors")
