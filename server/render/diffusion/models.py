"""The diffusion backend's models: the operator's base model and ControlNets, loaded once from local paths.

Sources (all from `RenderSettings`): `diffusion_base_model` (a diffusers directory or a single SD-1.5 file with
`diffusion_base_config`; None = the tiny model built in code) and `diffusion_controlnets`, condition name -> a
diffusers ControlNet directory or a single `.safetensors` file with its `config.json` beside it. With the tiny base
model, conditions without a configured path get tiny ControlNets built in code. Nothing is downloaded; a missing
path raises `ModelNotFound` naming it. On CUDA the weights run in fp16 with attention slicing (both configurable).

Pipelines are thin views over the shared components: building one per stage costs nothing and copies no weights.
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from megaportrait.shared.base_models import SINGLE_FILE_SUFFIXES, load_base_model
from megaportrait.shared.config import RenderSettings
from megaportrait.shared.errors import MegaPortraitError, ModelNotFound
from megaportrait.shared.logs import short_hash
from megaportrait.shared.records import BaseModelRef, IdentityAdapter

from .params import CONDITION_NAMES, StageParams

log = logging.getLogger("megaportrait.render.diffusion")


def resolve_device(spec: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; otherwise the named device (CUDA asked for but absent is an error)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MegaPortraitError(f"render.diffusion_device is {spec!r} but no CUDA device is available",
                                reason="device_unavailable")
    return device


def make_scheduler(name: str, config: Any) -> Any:
    """A fresh scheduler of kind `name` (see params.SCHEDULER_NAMES) on the base model's noise schedule."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)

    kinds: dict[str, tuple[Any, dict[str, Any]]] = {
        "ddim": (DDIMScheduler, {}),
        "dpm++": (DPMSolverMultistepScheduler, {}),
        "dpm++karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
        "euler": (EulerDiscreteScheduler, {}),
        "euler_a": (EulerAncestralDiscreteScheduler, {}),
        "unipc": (UniPCMultistepScheduler, {}),
        "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    }
    if name not in kinds:
        raise KeyError(f"unknown scheduler {name!r}; known: {', '.join(kinds)}")
    cls, extra = kinds[name]
    return cls.from_config(config, **extra)


def load_controlnet(name: str, path: Path, dtype: torch.dtype) -> Any:
    """A ControlNetModel from a diffusers directory, or a single file whose `config.json` sits beside it."""
    from diffusers import ControlNetModel

    path = Path(path).expanduser()
    what = f"ControlNet for condition '{name}'"
    if not path.exists():
        raise ModelNotFound(what, path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{what} (config.json)", path / "config.json")
        return ControlNetModel.from_pretrained(path, dtype=dtype, local_files_only=True)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelNotFound(what, path, hint=f"Expected a directory or one of {', '.join(SINGLE_FILE_SUFFIXES)}.")
    if not (path.parent / "config.json").is_file():
        raise ModelNotFound(f"{what} config.json beside the single file", path.parent / "config.json")
    return ControlNetModel.from_single_file(str(path), config=str(path.parent), dtype=dtype,
                                            local_files_only=True)


@dataclass
class DiffusionModels:
    """Loaded components (shared by every pipeline) plus where each came from.

    controlnets: condition name -> ControlNetModel, filled lazily by `controlnet`.
    sources: condition name -> configured path, or "tiny-embedded" for ones built in code.
    """

    components: dict[str, Any]
    base_model: BaseModelRef
    device: torch.device
    dtype: torch.dtype
    attention_slicing: bool
    vae_slicing: bool = True
    controlnet_paths: dict[str, Path] = field(default_factory=dict)
    controlnets: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- ControlNets ---------------------------------------------------------------------------------------------
    def controlnet(self, name: str) -> Any:
        """The ControlNet for condition `name`, loaded on first use."""
        if name not in CONDITION_NAMES:
            raise KeyError(f"unknown condition {name!r}")
        with self._lock:
            if name not in self.controlnets:
                if name in self.controlnet_paths:
                    net = load_controlnet(name, self.controlnet_paths[name], self.dtype)
                    self.sources[name] = str(self.controlnet_paths[name])
                elif self.base_model.kind == "tiny-embedded":
                    from megaportrait.shared.tiny_models import build_tiny_controlnet

                    net = build_tiny_controlnet(self.components["unet"], seed=100 + CONDITION_NAMES.index(name))
                    self.sources[name] = "tiny-embedded"
                else:
                    raise ModelNotFound(f"ControlNet for condition '{name}'",
                                        f"render.diffusion_controlnets['{name}'] (not configured)",
                                        hint="Map the condition to a local ControlNet in the render config, or "
                                             "drop it from the stage's controls.")
                self.controlnets[name] = net.to(device=self.device, dtype=self.dtype).eval()
                log.info("controlnet %s loaded from %s", name, self.sources[name])
            return self.controlnets[name]

    def _controlnet_for(self, controls: Sequence[str]) -> Any:
        from diffusers.models.controlnets import MultiControlNetModel

        nets = [self.controlnet(c) for c in controls]
        return nets[0] if len(nets) == 1 else MultiControlNetModel(nets)

    # -- pipelines -----------------------------------------------------------------------------------------------
    def _finish(self, pipe: Any) -> Any:
        pipe.set_progress_bar_config(disable=True)
        if self.device.type == "cuda":
            if self.attention_slicing:
                pipe.enable_attention_slicing()
            if self.vae_slicing:
                pipe.vae.enable_slicing()  # batched crops decode one at a time: bounds peak memory
        return pipe

    def _shared(self, scheduler: str) -> dict[str, Any]:
        c = self.components
        return dict(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"],
                    scheduler=make_scheduler(scheduler, c["scheduler"].config), safety_checker=None,
                    feature_extractor=None, requires_safety_checker=False)

    def inpaint_pipeline(self, controls: Sequence[str], scheduler: str) -> Any:
        """Masked generation: ControlNet inpainting, or plain SD inpainting when `controls` is empty."""
        from diffusers import StableDiffusionControlNetInpaintPipeline, StableDiffusionInpaintPipeline

        if controls:
            return self._finish(StableDiffusionControlNetInpaintPipeline(
                **self._shared(scheduler), controlnet=self._controlnet_for(controls)))
        return self._finish(StableDiffusionInpaintPipeline(**self._shared(scheduler)))

    def img2img_pipeline(self, controls: Sequence[str], scheduler: str) -> Any:
        """Partial re-noising of a whole crop: ControlNet img2img, or plain SD img2img when `controls` is empty."""
        from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionImg2ImgPipeline

        if controls:
            return self._finish(StableDiffusionControlNetImg2ImgPipeline(
                **self._shared(scheduler), controlnet=self._controlnet_for(controls)))
        return self._finish(StableDiffusionImg2ImgPipeline(**self._shared(scheduler)))

    # -- identity LoRA -------------------------------------------------------------------------------------------
    @contextmanager
    def identity_lora(self, adapter: IdentityAdapter) -> Iterator[None]:
        """The person's LoRA loaded into the shared UNet (`shared.adapters.apply_adapter`) for the duration of the
        block, then unloaded, layers and all, so no trace of it reaches the next job.

        Raises `shared.adapters.BaseModelMismatch` when the adapter was trained on another base model (UNet hash).
        """
        from diffusers import StableDiffusionPipeline

        from megaportrait.shared.adapters import apply_adapter

        pipe = StableDiffusionPipeline(**self.components, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        apply_adapter(pipe, adapter, base_model=self.base_model)
        try:
            yield
        finally:
            pipe.unload_lora_weights()


def load_models(settings: RenderSettings, *, device: torch.device | None = None) -> DiffusionModels:
    """Load the configured base model (ControlNets load lazily on first use).

    Raises ModelNotFound naming the path when a configured model is missing.
    """
    device = device or resolve_device(settings.diffusion_device)
    dtype = torch.float16 if (device.type == "cuda" and settings.diffusion_fp16) else torch.float32
    for name, path in settings.diffusion_controlnets.items():
        if name not in CONDITION_NAMES:
            raise ModelNotFound(f"ControlNet for unknown condition '{name}'", path,
                                hint=f"Condition names are: {', '.join(CONDITION_NAMES)}.")
        if not Path(path).expanduser().exists():
            raise ModelNotFound(f"ControlNet for condition '{name}'", path)
    base = load_base_model(settings.diffusion_base_model, config_dir=settings.diffusion_base_config,
                           dtype=dtype, device=device)
    for module in base.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    log.info("diffusion models: base %s (%s) on %s %s", base.ref.name, short_hash(base.ref.sha256), device, dtype)
    return DiffusionModels(components=base.components, base_model=base.ref, device=device, dtype=dtype,
                           attention_slicing=settings.diffusion_attention_slicing,
                           vae_slicing=settings.diffusion_vae_slicing,
                           controlnet_paths={k: Path(v) for k, v in settings.diffusion_controlnets.items()})


StepFn = Callable[[float], None]


def run_pipeline(
    pipe: Any,
    *,
    prompt: str,
    negative_prompt: str,
    stage: StageParams,
    images: Sequence[np.ndarray],
    seeds: Sequence[int],
    controls: Sequence[Sequence[np.ndarray]],
    masks: Sequence[np.ndarray] | None = None,
    batch_size: int = 4,
    on_progress: StepFn | None = None,
) -> list[np.ndarray]:
    """Run `pipe` over crops in batches; one CPU generator per crop, so a crop's result depends on its seed only.

    images: N (S, S, 3) uint8 crops; masks: N (S, S) uint8 {0, 255} (inpainting: 255 = regenerate);
    controls: per control, N (S, S, 3) uint8 control images. Returns N (S, S, 3) uint8 crops.
    """
    from PIL import Image

    n = len(images)
    size = int(images[0].shape[0])
    out: list[np.ndarray] = []
    chunks = [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    for ci, idx in enumerate(chunks):
        kwargs: dict[str, Any] = dict(
            prompt=[prompt] * len(idx), negative_prompt=[negative_prompt] * len(idx),
            image=[Image.fromarray(images[i]) for i in idx], height=size, width=size,
            num_inference_steps=stage.steps, guidance_scale=stage.guidance, strength=stage.strength,
            generator=[torch.Generator("cpu").manual_seed(int(seeds[i])) for i in idx], output_type="np",
            cross_attention_kwargs={"scale": stage.lora_scale})
        if masks is not None:
            kwargs["mask_image"] = [Image.fromarray(masks[i]) for i in idx]
        if controls:
            # One (B, 3, S, S) float tensor in [0, 1] per ControlNet: the form MultiControlNet accepts per-crop.
            per_control = [torch.from_numpy(np.stack([c[i] for i in idx])).permute(0, 3, 1, 2).float() / 255.0
                           for c in controls]
            kwargs["control_image"] = per_control[0] if len(controls) == 1 else per_control
            scales = list(stage.control_scales)
            kwargs["controlnet_conditioning_scale"] = scales[0] if len(controls) == 1 else scales
        if on_progress is not None:
            total = max(int(stage.steps * stage.strength), 1)

            def _step(p: Any, i: int, t: Any, kw: dict, _ci: int = ci) -> dict:
                on_progress(min((_ci + (i + 1) / total) / len(chunks), 1.0))
                return {}

            kwargs["callback_on_step_end"] = _step
            kwargs["callback_on_step_end_tensor_inputs"] = []
        with torch.inference_mode():
            result = pipe(**kwargs).images
        out.extend(np.round(np.asarray(result, np.float32) * 255).clip(0, 255).astype(np.uint8))
    return out
