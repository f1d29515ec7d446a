"""Privacy evaluation helpers: face pools, the per-crop denoising loss an attacker scores, AUC.

The audit itself (LiRA, positive control, canaries, person level, privacy-utility curve) is in lira.py. Runs on the
tiny in-code base model (`shared.tiny_models`) at 64 px with SD-like latents (`sd_like`): it measures the
*training procedure's* leakage on CPU.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from megaportrait.client.faces import crop_face
from megaportrait.shared.errors import PhotoRejected
from megaportrait.shared.face_analysis import FaceAnalyzer
from megaportrait.shared.imaging import load_image

from .dataset import PHOTO_SUFFIXES

log = logging.getLogger("megaportrait.evaluation")


def rank_auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """ROC AUC of scores where higher means "positive", as the Mann-Whitney U statistic over average ranks (ties
    count half): P(score of a random positive > score of a random negative)."""
    from scipy.stats import rankdata

    pos, neg = np.asarray(positives, float), np.asarray(negatives, float)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUC needs at least one positive and one negative score")
    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def face_pool(paths: Sequence[Path], analyzer: FaceAnalyzer, *, size: int = 128, min_face_px: float = 40.0,
              ) -> tuple[list[np.ndarray], list[str]]:
    """Aligned (size, size, 3) uint8 RGB crops of every face (detector score >= 0.8, at least `min_face_px`) in
    the photos, and a label per crop ("<file>#<face index>"). Unreadable files are skipped and logged."""
    crops, labels = [], []
    for path in paths:
        try:
            image = load_image(path)
        except PhotoRejected as exc:
            log.warning("attack pool: skipped unreadable photo (%s)", exc.reason)
            continue
        for k, face in enumerate(analyzer.detect(image)):
            if face.quality.face_px < min_face_px:
                continue
            crops.append(crop_face(image, face, size).pixels)
            labels.append(f"{Path(path).name}#{k}")
    return crops, labels


def photos_in(folders: Sequence[Path]) -> list[Path]:
    """Every photo file in the folders and their sub-folders, sorted."""
    out = []
    for d in folders:
        out += [p for p in Path(d).rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES]
    return sorted(out)


def sd_like(ts):
    """The TrainingSet with zero posterior std (latents = posterior means) and a scaling factor that gives the
    scaled means unit standard deviation, as SD's VAE latents have. The tiny model's random VAE has a posterior std near 1 while crops differ by ~0.14
    in the posterior mean, so sampled latents would be mostly VAE noise; SD's VAE has a posterior std near 0.01."""
    import torch

    channels = ts.moments.shape[2] // 2
    mean = ts.moments[:, :, :channels]
    moments = torch.cat([mean, torch.zeros_like(mean)], dim=2)
    return replace(ts, moments=moments, scaling_factor=1.0 / max(float(mean.std()), 1e-6))


def _subset(ts, rows: np.ndarray):
    idx = list(map(int, rows))
    return replace(ts, moments=ts.moments[idx], prompt_index=ts.prompt_index[idx], loss_weight=ts.loss_weight[idx],
                   n_instance=len(idx))


def per_crop_losses(components: dict, ts, *, seed: int, draws: int, max_timestep: int | None = None) -> np.ndarray:
    """(N,) denoising loss of the UNet as it is (LoRA included) on each crop of `ts` (a `client.identity`
    TrainingSet): the crop's posterior-mean latent, unmirrored, noised with `draws` (noise, timestep) pairs drawn
    from `seed` (timesteps below `max_timestep`) and shared by every crop, so crops and adapters are compared on
    identical draws."""
    import torch

    unet, scheduler = components["unet"], components["scheduler"]
    was_training = unet.training
    unet.eval()
    gen = torch.Generator().manual_seed(seed)
    mean = ts.moments[:, 0].chunk(2, dim=1)[0]
    latents = (mean * ts.scaling_factor).to(unet.device, unet.dtype)
    cond = ts.prompt_embeds[ts.prompt_index].to(unet.device, unet.dtype)
    n = latents.shape[0]
    total = torch.zeros(n, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(draws):
            noise = torch.randn(latents.shape[1:], generator=gen).expand_as(latents).to(latents)
            top = min(max_timestep or scheduler.config.num_train_timesteps, scheduler.config.num_train_timesteps)
            t = torch.randint(0, top, (1,), generator=gen).expand(n)
            noisy = scheduler.add_noise(latents, noise, t)
            kind = scheduler.config.prediction_type
            target = noise if kind == "epsilon" else scheduler.get_velocity(latents, noise, t)
            pred = unet(noisy, t.to(unet.device), encoder_hidden_states=cond).sample
            total += (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3)).double().cpu()
    unet.train(was_training)
    return (total / draws).numpy()
