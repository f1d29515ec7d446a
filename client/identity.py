"""Identity Net: a person's LoRA on the base model's UNet, learnt from a few face crops, with or without DP.

DreamBooth-style: the crops are paired with the prompt "a photo of {token} {class_word}" and the UNet's attention
projections get low-rank adapters (peft) trained on the usual denoising loss; optionally, images that the base
model itself generates for "a photo of {class_word}" are mixed in (prior preservation) so the class keeps its
meaning. Only the LoRA parameters train; the base model is frozen.

Differential privacy is a wrapper, not a second training loop: `train_lora` builds the ordinary model, optimizer
and data loader, and when `settings.dp_enabled` hands them to Opacus (`PrivacyEngine.make_private` with
`settings.noise_multiplier`, or `make_private_with_epsilon` when `settings.target_epsilon` is set), which adds
Poisson sampling, per-sample clipping to `max_grad_norm` and Gaussian noise. The privacy unit is one crop (one
photo): augmentation (mirroring) is drawn per step, never by adding rows, so a photo is one record to the
accountant. Epsilon is read from the accountant (`engine.get_epsilon(delta)`).

Note on the numbers: with 3-20 photos a sample rate near 1 is unavoidable, so per-photo epsilon from local
training alone is large unless the noise is large; the federation adds client-level DP on top.

Consent: `train_identity_adapter` runs only while the person's `personal_adapter` consent holds in the site's
`ConsentLedger` (checked before and after training). What leaves the site: nothing from this module. It returns an `IdentityAdapter` in memory; sealing it for a render
node (client/payload.py) and sending it are separate, consent-checked steps. Photos and crops never leave it, and
logs name records only by hash.

The small pieces (`attach_lora`, `lora_state_dict`, `get_lora_arrays`, `set_lora_arrays`, `train_lora`,
`denoising_loss`) are what the Flower client (client/federation.py) reuses for federated rounds.
"""
from __future__ import annotations

import logging
import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from megaportrait.shared.base_models import BaseModel, load_base_model
from megaportrait.shared.config import IdentitySettings
from megaportrait.shared.consent import PERSONAL_ADAPTER_PURPOSE, ConsentError, ConsentLedger
from megaportrait.shared.errors import MegaPortraitError
from megaportrait.shared.records import FaceCrop, IdentityAdapter, PrivacyReport

log = logging.getLogger("megaportrait.client.identity")

ADAPTER_NAME = "identity"
MIN_CROPS = 3
MAX_CROPS = 20


class IdentityTrainingError(MegaPortraitError):
    """Identity Net training cannot run on what it was given; `reason` says why, the message what to change."""

    reason = "identity_training"


# --- prompts -------------------------------------------------------------------------------------------------


def instance_prompt(settings: IdentitySettings) -> str:
    """The prompt the person's crops are trained with: "a photo of sks person"."""
    return f"a photo of {settings.token} {settings.class_word}"


def class_prompt(settings: IdentitySettings) -> str:
    """The prompt for prior-preservation images: "a photo of person"."""
    return f"a photo of {settings.class_word}"


# --- LoRA plumbing -------------------------------------------------------------------------------------------


def attach_lora(unet: torch.nn.Module, settings: IdentitySettings) -> torch.nn.Module:
    """Freeze `unet` and add a fresh LoRA (rank, alpha, target modules from `settings`) named "identity"; returns
    the same module. lora_B starts at zero, so the UNet's output is unchanged until training."""
    from peft import LoraConfig

    if ADAPTER_NAME in getattr(unet, "peft_config", {}):
        raise IdentityTrainingError("the UNet already carries an identity LoRA; call detach_lora first",
                                    reason="lora_attached")
    unet.requires_grad_(False)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=list(settings.target_modules),
                        init_lora_weights="gaussian", lora_dropout=0.0)
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    names = lora_parameter_names(unet)
    if not names:
        raise IdentityTrainingError(
            f"no UNet module matches target_modules {settings.target_modules}", reason="no_lora_targets")
    params = dict(unet.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    return unet


def detach_lora(unet: torch.nn.Module) -> torch.nn.Module:
    """Remove every LoRA layer from `unet`, giving back the bare base UNet (same module object)."""
    if getattr(unet, "peft_config", None):
        unet.unload_lora()
    return unet


def lora_parameter_names(unet: torch.nn.Module) -> list[str]:
    """Names of the identity LoRA parameters in `unet`, sorted: the fixed order of `get_lora_arrays`."""
    return sorted(n for n, _ in unet.named_parameters() if ".lora_" in n and f".{ADAPTER_NAME}." in n)


def get_lora_arrays(unet: torch.nn.Module) -> list[np.ndarray]:
    """The identity LoRA parameters as float32 arrays in `lora_parameter_names` order (raw, scale not folded):
    what a federated round exchanges."""
    params = dict(unet.named_parameters())
    return [params[n].detach().to("cpu", torch.float32).numpy().copy() for n in lora_parameter_names(unet)]


def set_lora_arrays(unet: torch.nn.Module, arrays: Sequence[np.ndarray]) -> None:
    """Load arrays from `get_lora_arrays` (same order, same shapes) into `unet`'s identity LoRA, in place."""
    names = lora_parameter_names(unet)
    if len(arrays) != len(names):
        raise IdentityTrainingError(f"expected {len(names)} LoRA arrays, got {len(arrays)}", reason="lora_mismatch")
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, array in zip(names, arrays):
            p = params[name]
            if tuple(array.shape) != tuple(p.shape):
                raise IdentityTrainingError(f"{name}: expected shape {tuple(p.shape)}, got {tuple(array.shape)}",
                                            reason="lora_mismatch")
            p.copy_(torch.as_tensor(np.asarray(array), dtype=p.dtype, device=p.device))


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The identity LoRA in diffusers' layout (``unet.<module>.lora_A.weight`` / ``.lora_B.weight``), float32 on
    CPU, with the LoRA scale alpha/rank folded into lora_B.

    Folding makes the tensors self-describing: `pipe.load_lora_weights(state_dict)` assumes alpha == rank when
    given a bare state dict, and with the scale folded in that assumption reproduces the trained adapter exactly.
    """
    from peft.utils import get_peft_model_state_dict

    config = unet.peft_config[ADAPTER_NAME]
    scale = config.lora_alpha / config.r
    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).clone()
        if ".lora_B." in name:
            tensor *= scale
        out[f"unet.{name}"] = tensor.contiguous()
    return out


# --- data ----------------------------------------------------------------------------------------------------


@dataclass
class TrainingSet:
    """Everything a training step reads, precomputed once from the crops (the VAE and text encoder are frozen).

    moments: (N, 2, 2C, h, w) float32: per row, for the crop and its mirror image, the VAE posterior's mean and std
        stacked on the channel axis (latents are sampled from them every step).
    prompt_index: (N,) int64, 0 = instance prompt, 1 = class prompt.
    loss_weight: (N,) float32, 1 for the person's crops, `prior_loss_weight` for class images.
    prompt_embeds: (2, 77, D) float32 text-encoder states for the instance and class prompts.
    n_instance: how many leading rows are the person's crops.
    """

    moments: torch.Tensor
    prompt_index: torch.Tensor
    loss_weight: torch.Tensor
    prompt_embeds: torch.Tensor
    n_instance: int
    scaling_factor: float

    def __len__(self) -> int:
        return int(self.moments.shape[0])


def _to_model_input(images: Sequence[np.ndarray], resolution: int) -> torch.Tensor:
    """(H, W, 3) uint8 RGB arrays -> (N, 3, R, R) float32 in [-1, 1], resized with area/cubic interpolation."""
    import cv2

    out = []
    for img in images:
        if img.shape[0] != resolution or img.shape[1] != resolution:
            interp = cv2.INTER_AREA if img.shape[0] > resolution else cv2.INTER_CUBIC
            img = cv2.resize(img, (resolution, resolution), interpolation=interp)
        out.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))
    return torch.stack(out).float().div(127.5).sub(1.0)


@torch.no_grad()
def encode_prompts(components: dict[str, Any], prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder hidden states (len(prompts), 77, D) for `prompts`, padded to the tokenizer's max length."""
    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    return text_encoder(ids)[0].float()


@torch.no_grad()
def prepare_training_set(components: dict[str, Any], crops: Sequence[np.ndarray], settings: IdentitySettings,
                         class_images: Sequence[np.ndarray] = ()) -> TrainingSet:
    """Encode the person's crops ((S, S, 3) uint8 RGB, resized to `settings.resolution`) and optional class
    images with the frozen VAE and the two prompts with the frozen text encoder."""
    vae = components["vae"]
    rows = list(crops) + list(class_images)
    pixels = _to_model_input(rows, settings.resolution).to(vae.device, vae.dtype)
    moments = []
    for view in (pixels, torch.flip(pixels, dims=[3])):
        dist = vae.encode(view).latent_dist
        moments.append(torch.cat([dist.mean, dist.std], dim=1).float())
    n_inst, n_cls = len(crops), len(class_images)
    return TrainingSet(
        moments=torch.stack(moments, dim=1),
        prompt_index=torch.tensor([0] * n_inst + [1] * n_cls, dtype=torch.long),
        loss_weight=torch.tensor([1.0] * n_inst + [settings.prior_loss_weight] * n_cls, dtype=torch.float32),
        prompt_embeds=encode_prompts(components, [instance_prompt(settings), class_prompt(settings)]),
        n_instance=n_inst,
        scaling_factor=float(vae.config.scaling_factor),
    )


@torch.no_grad()
def generate_class_images(components: dict[str, Any], settings: IdentitySettings, n: int) -> list[np.ndarray]:
    """`n` images of the class prompt from the base model itself (no LoRA active), (R, R, 3) uint8 RGB, seeded by
    `settings.seed`: the prior-preservation set. They depend on no photo, so they cost no privacy."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(settings.seed)
    images = []
    for _ in range(n):
        out = pipe(class_prompt(settings), num_inference_steps=settings.class_inference_steps,
                   height=settings.resolution, width=settings.resolution, generator=gen, output_type="np")
        images.append((np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8))
    return images


# --- training ------------------------------------------------------------------------------------------------


def _diffusion_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise IdentityTrainingError(f"unsupported scheduler prediction_type {kind!r}", reason="scheduler")


def _per_sample_loss(model: Any, scheduler: Any, ts: TrainingSet, rows: tuple[torch.Tensor, ...],
                     gen: torch.Generator, device: torch.device, dtype: torch.dtype,
                     orientation: torch.Tensor | None = None, sample_latents: bool = True) -> torch.Tensor:
    """Denoising MSE per row, (B,): sample latents from the stored posterior, noise them at random timesteps,
    and compare the model's prediction with the scheduler's target. Random draws come from `gen`."""
    moments, prompt_index, weight = rows
    b = moments.shape[0]
    if orientation is None:
        orientation = torch.randint(0, 2, (b,), generator=gen)
    mean, std = moments[torch.arange(b), orientation].chunk(2, dim=1)
    eps_latent = torch.randn(mean.shape, generator=gen)
    latents = (mean + std * eps_latent if sample_latents else mean) * ts.scaling_factor
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen)
    noisy = scheduler.add_noise(latents, noise, t)
    target = _diffusion_target(scheduler, latents, noise, t)
    cond = ts.prompt_embeds[prompt_index]
    pred = model(noisy.to(device, dtype), t.to(device), encoder_hidden_states=cond.to(device, dtype)).sample
    return (pred.float() - target.to(device)).pow(2).mean(dim=(1, 2, 3)) * weight.to(device)


@torch.no_grad()
def denoising_loss(components: dict[str, Any], ts: TrainingSet, *, seed: int = 0, draws: int = 8) -> float:
    """Mean denoising loss of `components["unet"]` (as it is, LoRA included) on the person's crops only, with
    `draws` fixed (timestep, noise) pairs per crop from `seed`: comparable before and after training."""
    unet, scheduler = components["unet"], components["scheduler"]
    was_training = unet.training
    unet.eval()
    gen = torch.Generator().manual_seed(seed)
    n = ts.n_instance
    rows = (ts.moments[:n], ts.prompt_index[:n], torch.ones(n))
    total = 0.0
    for _ in range(draws):
        loss = _per_sample_loss(unet, scheduler, ts, rows, gen, unet.device, unet.dtype,
                                orientation=torch.zeros(n, dtype=torch.long), sample_latents=False)
        total += float(loss.double().mean())
    unet.train(was_training)
    return total / draws


def _private_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for DP noise or Poisson sampling on `device` (noise is drawn where the gradients live). Seeded
    from the OS entropy pool unless `seed` is given: a known seed lets anyone recompute and subtract the noise, so
    a fixed seed is for tests only."""
    if seed is not None:
        log.warning("DP noise and sampling use a fixed seed: reproducible, and therefore NOT private")
    return torch.Generator(device=device).manual_seed(seed if seed is not None else secrets.randbits(63))


def _noise_only_step(optimizer: Any) -> None:
    """Poisson sampling drew an empty batch: release noise alone (the mechanism still ran and is accounted)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_lora(components: dict[str, Any], ts: TrainingSet, settings: IdentitySettings, *,
               steps: int | None = None, dp_noise_seed: int | None = None, progress: bool = True,
               ) -> tuple[list[float], PrivacyReport]:
    """Train the identity LoRA already attached to `components["unet"]` (see `attach_lora`) for `steps` optimizer
    steps (default `settings.steps`) on `ts`; DP per `settings`.

    Returns the per-step training losses (NaN for a DP step whose Poisson batch was empty) and the privacy report
    (epsilon from the Opacus accountant; None without DP). The epsilon covers this call only: for repeated calls
    on the same photos (federated rounds) use `compose_epsilon` over all their reports. The UNet is left in eval mode with its trained LoRA.
    `dp_noise_seed` fixes DP noise and sampling for reproducible tests; leave it None in real use.
    """
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm.auto import tqdm

    unet, scheduler = components["unet"], components["scheduler"]
    steps = settings.steps if steps is None else steps
    names = lora_parameter_names(unet)
    if not names:
        raise IdentityTrainingError("no identity LoRA on the UNet: call attach_lora first", reason="no_lora")
    params = dict(unet.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    if trainable != [n for n in params if n in set(names)]:
        raise IdentityTrainingError("parameters other than the identity LoRA are trainable", reason="not_frozen")
    lora_params = [params[n] for n in names]

    batch_size = min(settings.batch_size, len(ts))
    sample_gen = _private_generator(dp_noise_seed) if settings.dp_enabled else torch.Generator().manual_seed(
        settings.seed)
    dataset = TensorDataset(ts.moments, ts.prompt_index, ts.loss_weight)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=sample_gen)
    optimizer = torch.optim.AdamW(lora_params, lr=settings.learning_rate, weight_decay=0.0)
    model: Any = unet
    engine = None
    sample_rate = 1 / len(loader)
    step_gen = torch.Generator().manual_seed(settings.seed)
    losses: list[float] = []
    unet.train()  # Opacus records activations only in training mode (the UNet has no dropout or batch norm)
    bar = None
    try:
        if settings.dp_enabled:
            noise_gen = sample_gen if unet.device.type == "cpu" else _private_generator(
                None if dp_noise_seed is None else dp_noise_seed + 1, unet.device)
            model, optimizer, loader, engine = _make_private(unet, optimizer, loader, settings, steps, noise_gen)
        bar = tqdm(total=steps, desc="Identity Net LoRA" + (" (DP)" if engine else ""), disable=not progress,
                   leave=False)
        with warnings.catch_warnings():
            # Opacus' hooks see LoRA inputs that need no gradient (the frozen base feeds them); torch warns per step.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            while len(losses) < steps:
                for rows in loader:
                    if len(losses) >= steps:
                        break
                    if rows[0].shape[0] == 0:
                        _noise_only_step(optimizer)
                        losses.append(math.nan)
                    else:
                        loss = _per_sample_loss(model, scheduler, ts, tuple(rows), step_gen, unet.device,
                                                unet.dtype).mean()
                        loss.backward()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        losses.append(float(loss.detach()))
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        if bar is not None:
            bar.close()
        unet.eval()
        if engine is not None:
            model.to_standard_module()  # removes Opacus' hooks and per-sample buffers from the UNet

    if engine is None:
        report = PrivacyReport(epsilon=None, delta=settings.delta, noise_multiplier=0.0, max_grad_norm=0.0,
                               steps=len(losses), sample_rate=sample_rate, accountant="none")
    else:
        report = PrivacyReport(epsilon=float(engine.get_epsilon(settings.delta)), delta=settings.delta,
                               noise_multiplier=float(optimizer.noise_multiplier),
                               max_grad_norm=float(settings.max_grad_norm), steps=len(losses),
                               sample_rate=sample_rate, accountant=settings.accountant)
    return losses, report


def compose_epsilon(reports: Sequence[PrivacyReport], delta: float) -> float:
    """Epsilon of several DP training runs on the same photos (e.g. federated rounds), from an Opacus accountant
    fed each run's (noise multiplier, sample rate, steps). All runs must use the same accountant kind."""
    from opacus.accountants import create_accountant

    kinds = {r.accountant for r in reports}
    if not reports or None in {r.epsilon for r in reports} or len(kinds) != 1:
        raise IdentityTrainingError("compose_epsilon needs DP reports from one accountant kind", reason="dp_config")
    accountant = create_accountant(mechanism=kinds.pop())
    accountant.history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in reports]
    return float(accountant.get_epsilon(delta))


def _grad_sample_mode(mode: str, unet: torch.nn.Module) -> str:
    """Resolve "auto" to the per-sample-gradient mode measured faster on the UNet's device."""
    if mode != "auto":
        return mode
    return "hooks" if next(unet.parameters()).device.type == "cuda" else "ew"


def _make_private(unet: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: Any, settings: IdentitySettings,
                  steps: int, generator: torch.Generator) -> tuple[Any, Any, Any, Any]:
    """Wrap the ordinary model/optimizer/loader with Opacus; the loader's own generator drives Poisson sampling and
    `generator` (on the gradients' device) the noise."""
    import warnings

    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        # Opacus' secure_mode needs torchcsprng, which has no build for torch 2 (its last release, 0.2.1, targets
        # torch 1.8). The noise generator is seeded from the OS entropy pool instead (_private_generator); the
        # deploy docs state what that leaves open ("Secure RNG" in deploy/docs/site-client.md).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=settings.accountant)
    log.info("DP noise: torch generator seeded from the OS entropy pool (Opacus secure_mode off: no torchcsprng "
             "for torch 2; see deploy/docs/site-client.md, Secure RNG)")
    common = dict(module=unet, optimizer=optimizer, data_loader=loader, max_grad_norm=settings.max_grad_norm,
                  poisson_sampling=True, noise_generator=generator,
                  grad_sample_mode=_grad_sample_mode(settings.grad_sample_mode, unet))
    if settings.target_epsilon is not None:
        if settings.noise_multiplier is not None:
            log.info("target_epsilon %.3g set: the noise multiplier is chosen by the accountant, not %.3g",
                     settings.target_epsilon, settings.noise_multiplier)
        # Opacus converts epochs back to steps with int(epochs / sample_rate); the half step guards the rounding.
        epochs = (steps + 0.5) / len(loader)
        model, optimizer, loader = engine.make_private_with_epsilon(
            **common, target_epsilon=settings.target_epsilon, target_delta=settings.delta, epochs=epochs)
    elif settings.noise_multiplier is not None:
        model, optimizer, loader = engine.make_private(**common, noise_multiplier=settings.noise_multiplier)
    else:
        raise IdentityTrainingError("DP is on but neither noise_multiplier nor target_epsilon is set",
                                    reason="dp_config")
    return model, optimizer, loader, engine


# --- the whole stage -----------------------------------------------------------------------------------------


def _validated_crops(crops: Sequence[FaceCrop | np.ndarray], photo_sha256: Sequence[str] | None,
                     ) -> tuple[list[np.ndarray], tuple[str, ...]]:
    arrays = [c.pixels if isinstance(c, FaceCrop) else c for c in crops]
    if photo_sha256 is None:
        if not all(isinstance(c, FaceCrop) for c in crops):
            raise IdentityTrainingError("crops given as arrays need their source photo hashes (photo_sha256)",
                                        reason="missing_photo_hashes")
        photo_sha256 = [c.source_sha256 for c in crops]  # type: ignore[union-attr]
    if len(photo_sha256) != len(arrays):
        raise IdentityTrainingError(f"{len(arrays)} crops but {len(photo_sha256)} photo hashes",
                                    reason="missing_photo_hashes")
    if not MIN_CROPS <= len(arrays) <= MAX_CROPS:
        raise IdentityTrainingError(
            f"Identity Net needs {MIN_CROPS} to {MAX_CROPS} face crops, got {len(arrays)}; add or remove photos",
            reason="crop_count")
    for i, a in enumerate(arrays):
        if not (isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
                and a.shape[0] == a.shape[1] and a.shape[0] >= 16):
            shape = getattr(a, "shape", None)
            raise IdentityTrainingError(
                f"crop {i} (photo {photo_sha256[i][:12]}) must be a square (S, S, 3) uint8 RGB array with S >= 16, "
                f"got {shape} {getattr(a, 'dtype', type(a))}", reason="bad_crop")
    return arrays, tuple(dict.fromkeys(photo_sha256))


def train_identity_adapter(crops: Sequence[FaceCrop | np.ndarray], settings: IdentitySettings, *, person_ref: str,
                           ledger: ConsentLedger, photo_sha256: Sequence[str] | None = None, base: BaseModel | None = None,
                           progress: bool = True, dp_noise_seed: int | None = None, actor: str = "site",
                           ) -> IdentityAdapter:
    """Train a person's Identity Net adapter on 3-20 face-centred crops, with their `personal_adapter` consent.

    crops: `FaceCrop` records, or (S, S, 3) uint8 RGB arrays together with `photo_sha256` (one hash per crop).
    person_ref: the pseudonymous reference (a hash) the adapter is filed under; never a name.
    ledger: the site's consent ledger. `ledger.require(person_ref, "personal_adapter")` is checked before anything is
        loaded and again when training ends (a consent revoked or expired meanwhile discards the adapter); it raises
        ConsentMissing / ConsentExpired / ConsentRevoked and audits each answer. `actor` is who the ledger records.
    base: the loaded base model; default `load_base_model(settings.base_model, config_dir=settings.base_model_config)`.
        Its UNet gets the LoRA for training and is handed back bare afterwards.
    Returns the adapter (weights folded, see `lora_state_dict`) with its privacy report. Nothing leaves the site.
    The pieces below it (`prepare_training_set`, `attach_lora`, `train_lora`) check no consent: callers own that.
    """
    ledger.require(person_ref, PERSONAL_ADAPTER_PURPOSE, actor=actor)
    arrays, hashes = _validated_crops(crops, photo_sha256)
    if base is None:
        base = load_base_model(settings.base_model, config_dir=settings.base_model_config)
    components = base.components
    class_images = (generate_class_images(components, settings, settings.num_class_images)
                    if settings.prior_preservation else [])
    ts = prepare_training_set(components, arrays, settings, class_images)
    unet = attach_lora(components["unet"], settings)
    try:
        losses, report = train_lora(components, ts, settings, progress=progress, dp_noise_seed=dp_noise_seed)
        state = lora_state_dict(unet)
    finally:
        detach_lora(unet)
    try:
        ledger.require(person_ref, PERSONAL_ADAPTER_PURPOSE, actor=actor)
    except ConsentError:
        state.clear()  # consent ended during training: the adapter is not kept
        raise
    eps = "off" if report.epsilon is None else f"{report.epsilon:.3g}"
    log.info("identity adapter for %s: %d crops, %d steps, final loss %.4f, epsilon %s (delta %g)",
             person_ref[:12], len(arrays), report.steps, losses[-1] if losses else math.nan, eps, report.delta)
    return IdentityAdapter(person_ref=person_ref, token=settings.token, rank=settings.rank, alpha=settings.alpha,
                           target_modules=tuple(settings.target_modules), lora_state=state, base_model=base.ref,
                           privacy=report, photo_sha256=hashes)
