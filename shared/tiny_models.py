"""Tiny Stable-Diffusion-shaped components built in code, for tests, demos and CPU benchmarks.

Every component is created from a config written here and initialised from a fixed seed, so the same seed gives
bit-identical weights on every machine; nothing is read from disk or downloaded. The shapes follow SD 1.5 where it
matters for the code paths under test (VAE downsampling factor 8, 4 latent channels, cross-attention in the UNet
with `to_q`/`to_k`/`to_v`/`to_out.0` projections, a CLIP text encoder with 77-token prompts), at a size that trains
in milliseconds per step on a CPU: at 64 px the latents are 8 x 8.

They produce noise-like images: they test plumbing (LoRA, Opacus, save/load, ControlNet conditioning), not
quality. Anything produced with them is labelled `BaseModelRef(kind="tiny-embedded")` by
`shared.base_models.load_base_model(None)`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Literal

import torch

TINY_MODEL_NAME = "tiny-embedded-sd"
TINY_RESOLUTION = 64  # pixels; the tiny UNet's sample_size is TINY_RESOLUTION // 8
TINY_CROSS_ATTENTION_DIM = 32

# Whole words the tiny tokenizer knows as single tokens (the rare DreamBooth token among them); anything else is
# spelt out byte by byte, as CLIP's BPE does for unknown words.
TINY_WORDS = (
    "a", "an", "the", "of", "in", "and", "with", "photo", "portrait", "picture", "headshot", "face", "person",
    "man", "woman", "people", "light", "lighting", "studio", "style", "background", "sks", "ohwx", "zwx",
)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for weight initialisation only; the caller's RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_unet(seed: int = 0, sample_size: int = TINY_RESOLUTION // 8) -> "UNet2DConditionModel":  # noqa: F821
    """A two-level UNet2DConditionModel with cross-attention in every down, mid and up block (~1 M params)."""
    from diffusers import UNet2DConditionModel

    with _seeded(seed):
        return UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY_CROSS_ATTENTION_DIM,
            attention_head_dim=8,
            norm_num_groups=32,
        ).eval()


def tiny_vae(seed: int = 0) -> "AutoencoderKL":  # noqa: F821
    """An AutoencoderKL with SD's downsampling factor 8 (four levels) and 4 latent channels."""
    from diffusers import AutoencoderKL

    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(32, 32, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=TINY_RESOLUTION,
        ).eval()


def tiny_tokenizer() -> "CLIPTokenizer":  # noqa: F821
    """A CLIP BPE tokenizer whose vocabulary is built here: all 256 byte symbols (plain and word-final) plus the
    whole words in `TINY_WORDS`, so "a photo of sks person" is five word tokens between start and end tokens."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())  # the 256 printable stand-ins for bytes that byte-level BPE uses
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:
        # Merge left to right: ((w o) r) d</w>; each merge's result is a vocabulary entry.
        left = word[0] if len(word) > 1 else None
        if left is None:
            continue  # one-letter words are already byte symbols ("a</w>")
        for i, ch in enumerate(word[1:], start=1):
            right = ch + "</w>" if i == len(word) - 1 else ch
            pair = (left, right)
            if pair not in merges:
                merges.append(pair)
            left = left + right
            vocab.setdefault(left, len(vocab))
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_text_encoder(seed: int = 0, vocab_size: int | None = None) -> "CLIPTextModel":  # noqa: F821
    """A 2-layer CLIPTextModel (hidden size 32) whose token ids match `tiny_tokenizer()`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_tokenizer()
    config = CLIPTextConfig(
        vocab_size=vocab_size or len(tok),
        hidden_size=TINY_CROSS_ATTENTION_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with _seeded(seed):
        return CLIPTextModel(config).eval()


def tiny_scheduler(kind: Literal["ddim", "ddpm"] = "ddim") -> Any:
    """SD 1.5's noise schedule (scaled-linear betas 0.00085..0.012, 1000 steps) as a DDIM or DDPM scheduler."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False)
    if kind == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=False, steps_offset=1)
    if kind == "ddpm":
        return DDPMScheduler(**common)
    raise ValueError(f"unknown scheduler kind {kind!r}: use 'ddim' or 'ddpm'")


def build_tiny_controlnet(unet: Any | None = None, seed: int = 0, random_zero_convs: bool = True) -> Any:
    """A ControlNetModel copied from `unet` (the tiny UNet for `seed` when None), conditioning at 64 px.

    A fresh ControlNet's zero convolutions (its outputs and the end of its conditioning encoder) make it change
    nothing; with `random_zero_convs` they (and the
    conditioning encoder) get seeded He-normal weights instead, as diffusers' own ControlNet tests re-initialise
    them, so a test can see the conditioning act.
    """
    from diffusers import ControlNetModel

    unet = unet if unet is not None else tiny_unet(seed)
    with _seeded(seed + 1):
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 32, 32))
    if random_zero_convs:
        embedding = controlnet.controlnet_cond_embedding
        convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                 *[m for m in embedding.modules() if isinstance(m, torch.nn.Conv2d)]]
        with _seeded(seed + 2), torch.no_grad():
            for conv in convs:  # He-normal: keeps the control signal's scale through the conditioning encoder
                torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                conv.bias.zero_()
    return controlnet.eval()


def tiny_pipeline_components(seed: int = 0, scheduler: Literal["ddim", "ddpm"] = "ddim") -> dict[str, Any]:
    """unet, vae, text_encoder, tokenizer, scheduler for `StableDiffusionPipeline(**components,
    safety_checker=None, feature_extractor=None, requires_safety_checker=False)`; same seed, same weights."""
    return {
        "unet": tiny_unet(seed),
        "vae": tiny_vae(seed),
        "text_encoder": tiny_text_encoder(seed),
        "tokenizer": tiny_tokenizer(),
        "scheduler": tiny_scheduler(scheduler),
    }
