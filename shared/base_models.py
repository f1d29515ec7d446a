"""Load the base diffusion model that Identity Net adapters are trained on and applied to.

Three sources, chosen by the operator (`IdentitySettings.base_model`, `RenderSettings.diffusion_base_model`):

- None: the tiny model built in code (`shared.tiny_models`), kind "tiny-embedded"; for tests and the demo.
- a directory in diffusers layout (`model_index.json`, `unet/`, `vae/`, ...), kind "diffusers-dir";
- a single SD-1.5 checkpoint file (`.safetensors` / `.ckpt`), kind "single-file". A single file holds no
  tokenizer or component configs, so it also needs `config_dir`, a diffusers-layout directory of SD 1.5's configs
  and tokenizer (weights not needed there), unless the Hugging Face cache on this machine already holds them.

Nothing is ever downloaded: loading runs with `local_files_only=True` and `HF_HUB_OFFLINE=1`, and a missing path
raises `ModelNotFound` naming it.

The model's identity (`BaseModelRef.sha256`) is `unet_sha256(unet)`: a hash over the UNet's weights, whatever
file or layout they came from, so a render node can check an adapter against the pipeline it actually holds
without re-reading files. See `unet_sha256` for exactly what is hashed.
"""
from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import ModelNotFound

TINY_MODEL_NOTE = ("tiny embedded test model (no base_model weights configured): it exercises the whole path, but "
                   "its diffusion output is NOT a portrait")
from .records import BaseModelRef

log = logging.getLogger("megaportrait.base_models")

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# SD 1.5's UNet (CompVis/runwayml v1 configs): used by benchmarks to time training at full size with random weights.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}


@dataclass
class BaseModel:
    """A loaded base model: diffusers components (unet, vae, text_encoder, tokenizer, scheduler) and its ref."""

    components: dict[str, Any]
    ref: BaseModelRef

    def pipeline(self) -> Any:
        """A StableDiffusionPipeline over these components (shared, not copied), without a safety checker."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(**self.components, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _lora_free_items(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The base weights of a (possibly peft-wrapped) module: LoRA tensors dropped, `.base_layer` folded back."""
    for name in sorted(state):
        if "lora_" in name or "lora_magnitude_vector" in name:
            continue
        yield name.replace(".base_layer.", "."), state[name]


def unet_sha256(unet: torch.nn.Module) -> str:
    """sha256 over the UNet's base weights: for every tensor in name order, its name, shape and its values rounded
    to float16 (little-endian bytes).

    LoRA layers are ignored (a pipeline with an adapter loaded hashes like the bare base model), and rounding to
    half precision makes a checkpoint loaded in float32 and in float16 hash alike, so a client training in fp32
    and a render node running fp16 agree. Cost: one pass over the weights (~2 s for SD 1.5 on a CPU).
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in _lora_free_items(unet.state_dict()):
            half = tensor.detach().to(dtype=torch.float16).cpu().contiguous()
            digest.update(name.encode())
            digest.update(repr(tuple(half.shape)).encode())
            digest.update(half.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


@contextmanager
def _offline() -> Iterator[None]:
    """Force huggingface_hub and transformers offline for the duration of a load."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_base_model(
    path: str | Path | None,
    *,
    config_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> BaseModel:
    """Load the base model at `path` (a diffusers directory or a single SD-1.5 checkpoint file), or the tiny
    embedded model when `path` is None (`seed` picks its weights).

    Raises ModelNotFound naming the path when it does not exist, or when a directory lacks `model_index.json`, or
    when a single file needs SD-1.5 configs that are neither in `config_dir` nor in the local cache.
    """
    if path is None:
        from . import tiny_models

        components = tiny_models.tiny_pipeline_components(seed)
        if dtype != torch.float32 or torch.device(device).type != "cpu":
            for module in components.values():
                if isinstance(module, torch.nn.Module):
                    module.to(device=device, dtype=dtype)
        ref = BaseModelRef(name=f"{tiny_models.TINY_MODEL_NAME}-seed{seed}", sha256=unet_sha256(components["unet"]),
                           kind="tiny-embedded")
        log.info("base model: tiny embedded (seed %d, unet %s)", seed, ref.sha256[:12])
        return BaseModel(components, ref)

    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFound("base diffusion model", path)
    from diffusers import StableDiffusionPipeline

    with _offline():
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ModelNotFound("diffusers model_index.json", path / "model_index.json",
                                    hint="Give a diffusers-layout directory or a single .safetensors checkpoint.")
            pipe = StableDiffusionPipeline.from_pretrained(
                path, local_files_only=True, dtype=dtype, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
            kind = "diffusers-dir"
        else:
            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                raise ModelNotFound("SD-1.5 single-file checkpoint", path,
                                    hint=f"Expected one of {', '.join(SINGLE_FILE_SUFFIXES)}.")
            kwargs: dict[str, Any] = {}
            if config_dir is not None:
                config_dir = Path(config_dir).expanduser()
                if not (config_dir / "model_index.json").is_file():
                    raise ModelNotFound("SD-1.5 config directory (model_index.json)", config_dir)
                kwargs["config"] = str(config_dir)
            try:
                pipe = StableDiffusionPipeline.from_single_file(
                    str(path), local_files_only=True, dtype=dtype, safety_checker=None,
                    feature_extractor=None, requires_safety_checker=False, **kwargs)
            except (OSError, ValueError) as exc:
                if config_dir is not None:
                    raise
                # Without config_dir diffusers looks for SD-1.5's configs in the hub cache, offline.
                raise ModelNotFound(
                    "SD-1.5 component configs and tokenizer for the single-file checkpoint", path,
                    hint="Set identity.base_model_config (or pass config_dir) to a diffusers-layout SD-1.5 "
                         f"directory (configs and tokenizer; weights not needed). Loader said: {exc}") from exc
            kind = "single-file"
    components = {k: pipe.components[k] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.to(device)
    ref = BaseModelRef(name=path.name, sha256=unet_sha256(components["unet"]), kind=kind)
    log.info("base model: %s %s (unet %s)", kind, path.name, ref.sha256[:12])
    return BaseModel(components, ref)


def sd15_sized_unet(seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> torch.nn.Module:
    """A UNet2DConditionModel with SD 1.5's exact config and random (seeded) weights, for timing only."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD15_UNET_CONFIG).to(device=device, dtype=dtype)
