"""Privacy: a membership-inference attack on Identity Net adapters trained with and without DP.

The attacker holds the adapter and a candidate face crop, and guesses whether the crop was in the training set.
Attack (loss threshold, calibrated): the adapter's denoising loss on the crop, with noise and timesteps fixed by a
seed, minus the base model's loss on the same crop with the same draws; training pulls members' losses down more
than non-members'. AUC (area under the ROC of that score, members vs non-members) is the attack's success: 0.5 is
guessing. Each adapter is trained on a random half of a pool of face crops (the members) and attacked on all of the
pool; several adapters (seeds) give a stable pooled AUC. The DP arm trains the same way through Opacus and reports
epsilon from its accountant (`PrivacyReport`), never computed here.

Runs on the tiny in-code base model (`shared.tiny_models`) at 64 px: this measures the *training procedure's*
leakage on CPU; the figure for a real base model comes from running the same code with `base_model` set.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from megaportrait.client.faces import crop_face
from megaportrait.shared.config import IdentitySettings
from megaportrait.shared.errors import PhotoRejected
from megaportrait.shared.face_analysis import FaceAnalyzer
from megaportrait.shared.imaging import load_image

from .dataset import PHOTO_SUFFIXES, EvaluationError

log = logging.getLogger("megaportrait.evaluation")

MIN_POOL = 8


@dataclass(frozen=True)
class AttackSettings:
    """How the attack is run. `steps`, `learning_rate`, `rank`, `noise_multiplier`, `max_grad_norm`, `batch_size` are
    the Identity Net training settings of both arms (DP off / on); the learning rate is 10x the production default
    so the non-DP arm memorises as much as it can in a CPU budget (a worst case for privacy). `draws`: fixed
    (noise, timestep) pairs per crop, timesteps below `max_timestep` (low noise, where a denoiser that memorised a
    crop gains most).

    sd_like_latents: the tiny model's random VAE has a posterior std near 1 while crops differ by ~0.14 in the
    posterior mean, so sampled training latents are mostly VAE noise and nothing about a crop can be learnt (or
    leaked). SD's VAE has a posterior std near 0.01 and its scaled latents have roughly unit variance; with this set,
    both arms train on posterior means rescaled to unit variance, which makes the tiny model behave like SD here.
    Named in the output's settings."""

    adapters: int = 8
    steps: int = 300
    learning_rate: float = 1e-2
    rank: int = 4
    batch_size: int = 4
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    draws: int = 16
    max_timestep: int = 100
    resolution: int = 64
    sd_like_latents: bool = True
    seed: int = 0

    def identity_settings(self, dp: bool, seed: int) -> IdentitySettings:
        return IdentitySettings(steps=self.steps, learning_rate=self.learning_rate, batch_size=self.batch_size,
                                rank=self.rank, alpha=float(self.rank),
                                resolution=self.resolution, dp_enabled=dp, noise_multiplier=self.noise_multiplier,
                                max_grad_norm=self.max_grad_norm, delta=self.delta, seed=seed,
                                prior_preservation=False)


@dataclass
class ArmResult:
    """One arm (DP on or off): per-adapter AUCs, the pooled AUC and the privacy reports."""

    dp: bool
    aucs: list[float] = field(default_factory=list)
    raw_loss_aucs: list[float] = field(default_factory=list)
    member_scores: list[float] = field(default_factory=list)
    nonmember_scores: list[float] = field(default_factory=list)
    epsilons: list[float | None] = field(default_factory=list)
    privacy: list[dict] = field(default_factory=list)
    final_losses: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        eps = [e for e in self.epsilons if e is not None]
        return {
            "dp": self.dp,
            "n_adapters": len(self.aucs),
            "auc_mean": float(np.mean(self.aucs)) if self.aucs else None,
            "auc_std": float(np.std(self.aucs)) if self.aucs else None,
            "auc_per_adapter": self.aucs,
            "auc_pooled": rank_auc(self.member_scores, self.nonmember_scores) if self.member_scores else None,
            "auc_pooled_ci95": bootstrap_auc_ci(self.member_scores, self.nonmember_scores) if self.member_scores else None,
            "raw_loss_auc_mean": float(np.mean(self.raw_loss_aucs)) if self.raw_loss_aucs else None,
            "epsilon": float(np.max(eps)) if eps else None,
            "delta": self.privacy[0]["delta"] if self.privacy and self.dp else None,
            "privacy_report": self.privacy[0] if self.privacy else None,
            "mean_final_train_loss": float(np.nanmean(self.final_losses)) if self.final_losses else None,
        }


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


def bootstrap_auc_ci(positives: Sequence[float], negatives: Sequence[float], n: int = 1000, seed: int = 0,
                     ) -> tuple[float, float]:
    """95% percentile bootstrap interval of `rank_auc` (positives and negatives resampled separately)."""
    rng = np.random.default_rng(seed)
    pos, neg = np.asarray(positives, float), np.asarray(negatives, float)
    stats = [rank_auc(rng.choice(pos, len(pos)), rng.choice(neg, len(neg))) for _ in range(n)]
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


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
    scaled means unit standard deviation, as SD's VAE latents have. See `AttackSettings.sd_like_latents`."""
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


def run_membership_inference(crops: Sequence[np.ndarray], attack: AttackSettings, *,
                             advance: Callable[[int], None] | None = None) -> dict:
    """Train `attack.adapters` adapters per arm (DP off, DP on) on random halves of `crops` and attack each.

    crops: (S, S, 3) uint8 RGB face crops (the pool). Returns {"settings", "pool_size", "arms": {"no_dp", "dp"}}.
    `advance(n)` is called with the number of training steps done.
    """
    import torch

    from megaportrait.client.identity import attach_lora, detach_lora, prepare_training_set, train_lora
    from megaportrait.shared.base_models import load_base_model

    if len(crops) < MIN_POOL:
        raise EvaluationError(f"the attack needs at least {MIN_POOL} face crops in its pool, got {len(crops)}")
    base = load_base_model(None)
    components = base.components
    ts = prepare_training_set(components, list(crops), attack.identity_settings(False, attack.seed))
    if attack.sd_like_latents:
        ts = sd_like(ts)
    loss_seed = attack.seed + 10_000
    base_losses = per_crop_losses(components, ts, seed=loss_seed, draws=attack.draws,
                              max_timestep=attack.max_timestep)
    arms = {}
    for arm, dp in (("no_dp", False), ("dp", True)):
        result = ArmResult(dp=dp)
        for k in range(attack.adapters):
            seed = attack.seed + k
            rng = np.random.default_rng(seed)
            order = rng.permutation(len(ts))
            members, non = np.sort(order[: len(ts) // 2]), np.sort(order[len(ts) // 2:])
            settings = attack.identity_settings(dp, seed)
            unet = attach_lora(components["unet"], settings)
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)  # LoRA A's random init
                    losses, report = train_lora(components, _subset(ts, members), settings, progress=False,
                                                dp_noise_seed=seed if dp else None)
                adapted = per_crop_losses(components, ts, seed=loss_seed, draws=attack.draws,
                              max_timestep=attack.max_timestep)
            finally:
                detach_lora(unet)
            score = base_losses - adapted  # how much training lowered the loss on this crop
            result.aucs.append(rank_auc(score[members], score[non]))
            result.raw_loss_aucs.append(rank_auc(-adapted[members], -adapted[non]))
            result.member_scores += score[members].tolist()
            result.nonmember_scores += score[non].tolist()
            result.epsilons.append(report.epsilon)
            result.privacy.append(asdict(report))
            tail = [v for v in losses[-10:] if v == v]
            result.final_losses.append(float(np.mean(tail)) if tail else float("nan"))
            if advance:
                advance(attack.steps)
        arms[arm] = result
    after = per_crop_losses(components, ts, seed=loss_seed, draws=attack.draws,
                              max_timestep=attack.max_timestep)
    if not np.allclose(after, base_losses, rtol=1e-5, atol=1e-7):
        raise EvaluationError("the base UNet changed during the attack (LoRA not fully detached); results invalid")
    return {
        "settings": asdict(attack),
        "pool_size": len(ts),
        "members_per_adapter": len(ts) // 2,
        "arms": {name: r.summary() for name, r in arms.items()},
        "scores": {name: {"members": r.member_scores, "non_members": r.nonmember_scores} for name, r in arms.items()},
    }
