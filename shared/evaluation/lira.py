"""Privacy audit of Identity Net adapters: a LiRA-style membership attack with a positive control, beside the bound
each arm's epsilon implies, and a privacy-utility curve.

Production setting: each adapter trains on 4 to 8 rows (a person's photo count, with 3 pool photos) with the given
steps and DP settings; `adapters` of them are trained, and each in turn is the target while the others are its
shadows (leave-one-out). Per photo and target, the attack score is the adapter's loss reduction on the photo (base
loss minus adapter loss, fixed draws) less that adapter's median reduction over the pool (its shift on every photo,
member or not); LiRA (Carlini et al. 2022, offline variant, since a photo is in few shadows)
standardises it against the shadows that did *not* train on the photo: z = (s - mean_out) / std_out. Reported:
AUC, TPR at FPR 1 % and 0.1 %, each with a 95 % bootstrap interval over *photos* (a photo's scores are resampled
together); a person-level variant (all but one of a person's photos in or out, attacked with the held-out one);
canary exposure; and for a DP arm the bound TPR <= e^eps * FPR + delta its epsilon (Opacus; per photo, and per
person for the person-level attack) implies. The positive control trains without DP and with more steps; if its
AUC is below `control_min_auc` the audit has no power and no DP result is reported.

The privacy-utility curve trains on all but one photo of a person at a few noise levels and reports epsilon per
photo and per person (group of the person's photos, `shared.accounting`) against the denoising loss on the held-out
photo of the same person, and, given an `IdentityProbe` (a configured base model), the identity of a diffusion render
of the person's adapter: SFace cosine of the render's face to the held-out photo's embedding.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from megaportrait.shared.config import IdentitySettings

from .dataset import EvaluationError
from .privacy import _subset, per_crop_losses, rank_auc, sd_like

log = logging.getLogger("megaportrait.evaluation.lira")


@dataclass(frozen=True)
class ArmSettings:
    """One arm's training: steps, learning rate and DP (noise multiplier None = no DP)."""

    name: str
    steps: int
    learning_rate: float
    noise_multiplier: float | None

    def identity_settings(self, base: "LiraSettings", seed: int) -> IdentitySettings:
        return IdentitySettings(steps=self.steps, learning_rate=self.learning_rate, batch_size=base.batch_size,
                                rank=base.rank, alpha=float(base.rank), resolution=base.resolution,
                                dp_enabled=self.noise_multiplier is not None,
                                noise_multiplier=self.noise_multiplier or 1.0, max_grad_norm=base.max_grad_norm,
                                delta=base.delta, seed=seed, prior_preservation=False)


@dataclass(frozen=True)
class LiraSettings:
    """The audit. Defaults: the production adapter (IdentitySettings' 30 steps, lr 1e-3, noise 1.0) and a positive
    control without DP at 500 steps and lr 1e-2 (on 4 to 8 rows the tiny model's adapters showed more membership
    signal at 500 steps than at 1000: benchmarks/results/eval/privacy_audit*.json); 16 adapters per arm; 3 pool
    photos per adapter (plus the people drawn in and a canary)."""

    adapters: int = 16
    photos_per_adapter: int = 3
    pool_size: int = 12
    arms: tuple[ArmSettings, ...] = (ArmSettings("positive_control", 500, 1e-2, None),
                                     ArmSettings("production_dp", 30, 1e-3, 1.0))
    rank: int = 4
    batch_size: int = 4
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    draws: int = 16
    max_timestep: int = 100
    resolution: int = 64
    control_min_auc: float = 0.8
    adapter_calibration: bool = True
    """Subtract each adapter's median loss reduction over the pool before LiRA (`adapter_offsets`)."""
    canaries: int = 16
    bootstrap: int = 500
    keep_raw: bool = False
    workers: int = 1
    """Processes training adapters at once (each with one torch thread and its own copy of the tiny model)."""
    curve_noise: tuple[float | None, ...] = (None, 4.0, 2.0, 1.0, 0.5)
    curve_steps: int = 30
    curve_resolution: int | None = None
    """Training resolution of the curve's adapters (None: `resolution`); with a real base model, the site's
    `identity.resolution`, so the adapters rendered for the identity axis are trained as the product trains them."""
    seed: int = 0


@dataclass
class ArmResult:
    name: str
    scores: list[float] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    photo: list[int] = field(default_factory=list)
    epsilon: float | None = None


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float) -> float:
    """Largest TPR over thresholds whose FPR is at most `fpr` (0 when no threshold qualifies but +inf)."""
    order = np.argsort(-scores, kind="stable")
    lab = labels[order]
    pos, neg = max(1, int(lab.sum())), max(1, int((1 - lab).sum()))
    tp, fp = np.cumsum(lab), np.cumsum(1 - lab)
    ok = fp / neg <= fpr
    return float((tp[ok] / pos).max()) if ok.any() else 0.0


def _metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
    return {"auc": rank_auc(scores[labels == 1], scores[labels == 0]), "tpr_at_fpr_1pct": tpr_at_fpr(scores, labels, 0.01),
            "tpr_at_fpr_0.1pct": tpr_at_fpr(scores, labels, 0.001)}


def bootstrap_over_photos(scores: np.ndarray, labels: np.ndarray, photo: np.ndarray, n: int, seed: int) -> dict:
    """95 % percentile intervals of `_metrics`, resampling photos (each with all its scores) with replacement."""
    rng = np.random.default_rng(seed)
    ids = np.unique(photo)
    rows = {p: np.flatnonzero(photo == p) for p in ids}
    stats: dict[str, list[float]] = {}
    for _ in range(n):
        take = np.concatenate([rows[p] for p in rng.choice(ids, len(ids))])
        if labels[take].min() == labels[take].max():
            continue
        for k, v in _metrics(scores[take], labels[take]).items():
            stats.setdefault(k, []).append(v)
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in stats.items()}


def adapter_offsets(losses: np.ndarray, base: np.ndarray) -> np.ndarray:
    """(A,) each adapter's typical loss reduction over the candidate photos (median of base - loss over the columns
    of `losses` (A, P)). Adapters trained on fewer rows or for longer lower every photo's loss, members or not;
    subtracting this shift (no membership label is used) leaves what is specific to the photo."""
    return np.median(base[None, :] - losses, axis=1)


def lira_scores(losses: np.ndarray, base: np.ndarray, members: np.ndarray, offsets: np.ndarray | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
    """Offline LiRA. losses: (A, P) adapter loss per adapter and photo; members: (A, P) bool; offsets: (A,) each
    adapter's shift to subtract first (`adapter_offsets`; None = none). For each target a, the score of photo p is
    its loss reduction standardised against the other adapters without p. Returns (scores (A, P), valid (A, P):
    at least two out-shadows)."""
    reduction = base[None, :] - losses
    if offsets is not None:
        reduction = reduction - np.asarray(offsets)[:, None]
    n_adapters = losses.shape[0]
    scores = np.zeros_like(reduction)
    valid = np.zeros(reduction.shape, bool)
    for a in range(n_adapters):
        others = np.arange(n_adapters) != a
        for p in range(losses.shape[1]):
            out = reduction[others & ~members[:, p], p]
            if len(out) < 2:
                continue
            scores[a, p] = (reduction[a, p] - out.mean()) / max(out.std(ddof=1), 1e-9)
            valid[a, p] = True
    return scores, valid


def _train_and_score(components, ts, rows: np.ndarray, settings: IdentitySettings, seed: int, lira: LiraSettings,
                     loss_seed: int, fixed_noise: bool = True, keep_lora: bool = False):
    """Train a LoRA on `rows` of `ts`, score every row, detach it. `fixed_noise`: DP noise and sampling from `seed`
    (reproducible, hence not private: fine for adapters the audit discards) instead of the OS's entropy.
    `keep_lora`: also return the trained LoRA's state dict (`client.identity.lora_state_dict`) as a third item."""
    import torch

    from megaportrait.client.identity import attach_lora, detach_lora, lora_state_dict, train_lora

    unet = attach_lora(components["unet"], settings)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, report = train_lora(components, _subset(ts, rows), settings, progress=False,
                                   dp_noise_seed=seed if settings.dp_enabled and fixed_noise else None)
        losses = per_crop_losses(components, ts, seed=loss_seed, draws=lira.draws, max_timestep=lira.max_timestep)
        state = lora_state_dict(unet) if keep_lora else None
    finally:
        detach_lora(unet)
    return (losses, report, state) if keep_lora else (losses, report)


def canary_images(n: int, size: int, seed: int) -> list[np.ndarray]:
    """`n` distinct synthetic canaries: (size, size, 3) uint8 images of random 8x8-pixel colour blocks."""
    rng = np.random.default_rng(seed)
    blocks = size // 8
    return [np.kron(rng.integers(0, 256, (blocks, blocks, 3)), np.ones((8, 8, 1))).astype(np.uint8)
            for _ in range(n)]


def exposure(reductions: np.ndarray, inserted: int) -> float:
    """Secret-sharer exposure (Carlini et al. 2019) of candidate `inserted` among `reductions` (loss reduction per
    candidate; the larger, the more memorised): log2(candidates) - log2(rank)."""
    rank = 1 + int(np.sum(reductions > reductions[inserted]))
    return math.log2(len(reductions)) - math.log2(rank)


def _arm_summary(scores: np.ndarray, valid: np.ndarray, members: np.ndarray, clusters: np.ndarray, lira: LiraSettings,
                 ) -> dict:
    s, lab, photo = scores[valid], members[valid].astype(int), clusters[valid]
    if lab.min() == lab.max():
        return {"n_scores": int(len(s)), "note": "all scores on one side: no AUC"}
    return {**_metrics(s, lab), "ci95": bootstrap_over_photos(s, lab, photo, lira.bootstrap, lira.seed),
            "n_scores": int(len(s)), "n_members": int(lab.sum()), "n_clusters": int(len(np.unique(photo)))}


def _arm_result(arm: ArmSettings, losses_arr: np.ndarray, reports: list, eps: float | None, base: np.ndarray,
                membership: np.ndarray, person_in: np.ndarray, held: list[int], canary_rows: list[int],
                inserted: list[int], persons: dict, lira: LiraSettings) -> dict:
    """One arm's three attacks (per photo, per person, canaries) from its adapters' losses."""
    from megaportrait.shared.accounting import epsilon, group_history, membership_bound

    pool_losses, pool_base = losses_arr[:, : lira.pool_size], base[: lira.pool_size]
    offsets = adapter_offsets(pool_losses, pool_base) if lira.adapter_calibration else None
    scores, valid = lira_scores(pool_losses, pool_base, membership, offsets)
    photo_ids = np.broadcast_to(np.arange(lira.pool_size), scores.shape)
    summary = {**_arm_summary(scores, valid, membership, photo_ids, lira), "settings": asdict(arm),
               "epsilon_per_photo": eps}
    summary["roc_scores"] = {"scores": scores[valid].round(4).tolist(), "labels": membership[valid].astype(int).tolist()}
    if persons:
        p_scores, p_valid = lira_scores(losses_arr[:, held], base[held], person_in, offsets)
        p_ids = np.broadcast_to(np.arange(len(persons)), p_scores.shape)
        summary["person_level"] = {**_arm_summary(p_scores, p_valid, person_in, p_ids, lira),
                                   "people": list(persons),
                                   "note": f"{len(persons)} real people: the interval over people is wide"}
    reductions = base[canary_rows][None, :] - losses_arr[:, canary_rows]
    exposures = [exposure(reductions[a], inserted[a]) for a in range(lira.adapters)]
    chance = math.log2(len(canary_rows)) - float(np.mean([math.log2(r) for r in range(1, len(canary_rows) + 1)]))
    summary["canary"] = {"exposure_mean": float(np.mean(exposures)), "exposure_max": float(np.max(exposures)),
                         "exposure_at_chance": chance, "max_possible": math.log2(len(canary_rows)),
                         "candidates": len(canary_rows)}
    if eps is not None:
        k = max((len(v) - 1 for v in persons.values()), default=1)
        hist = [(r.noise_multiplier, r.sample_rate, r.steps) for r in reports[:1]]
        summary["epsilon_per_person"] = epsilon(group_history(hist, k), lira.delta)
        for level, key in (("", "epsilon_per_photo"), ("person_level", "epsilon_per_person")):
            target = summary.get(level, {}) if level else summary
            if "auc" not in target:
                continue
            e = summary[key]
            target["bound_tpr_at_fpr_1pct"] = membership_bound(e, lira.delta, 0.01)
            target["bound_tpr_at_fpr_0.1pct"] = membership_bound(e, lira.delta, 0.001)
            target["within_bound"] = bool(target["tpr_at_fpr_1pct"] <= target["bound_tpr_at_fpr_1pct"] + 1e-9
                                          and target["tpr_at_fpr_0.1pct"] <= target["bound_tpr_at_fpr_0.1pct"]
                                          + 1e-9)
    if lira.keep_raw:
        summary["raw"] = {"losses": losses_arr.tolist(), "base": base.tolist(),
                          "membership": membership.tolist(), "person_in": person_in.tolist(), "held": held,
                          "canary_rows": canary_rows, "inserted": inserted}
    log.info("LiRA %s: AUC %s, epsilon %s", arm.name, summary.get("auc"), eps)
    return summary


_WORKER: dict = {}


def _worker_init(rows: list[np.ndarray], lira: LiraSettings) -> None:
    import torch

    from megaportrait.client.identity import prepare_training_set
    from megaportrait.shared.base_models import load_base_model

    torch.set_num_threads(1)
    components = load_base_model(None).components
    plain = IdentitySettings(resolution=lira.resolution, prior_preservation=False)
    _WORKER["components"] = components
    _WORKER["ts"] = sd_like(prepare_training_set(components, rows, plain))


def _worker_train(job: tuple) -> tuple:
    train_rows, arm, a, lira, loss_seed = job
    return _train_and_score(_WORKER["components"], _WORKER["ts"], train_rows, arm.identity_settings(lira, lira.seed + a),
                            lira.seed + a, lira, loss_seed)


def _worker_pool(rows: list[np.ndarray], lira: LiraSettings):
    """Worker processes (spawned: no forked OpenMP state), each holding the same model and training set."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=lira.workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(list(rows), lira))


def power_verdict(arms: dict[str, dict], min_auc: float) -> tuple[bool, str, dict[str, dict]]:
    """(powered, verdict, the arms to show): without a positive control at AUC >= `min_auc` the audit has no power
    and only the control is shown."""
    auc = arms.get("positive_control", {}).get("auc", float("nan"))
    if auc >= min_auc:
        return True, f"the positive control reaches AUC {auc:.3f} >= {min_auc:.2f}: the audit has power", arms
    return (False, f"the audit has NO POWER (positive control AUC {auc:.3f} below {min_auc:.2f}): no DP result is "
            "shown", {k: v for k, v in arms.items() if k == "positive_control"})


def run_lira_audit(pool: Sequence[np.ndarray], people: dict[str, Sequence[np.ndarray]], lira: LiraSettings, *,
                   advance: Callable[[int], None] | None = None, probe: IdentityProbe | None = None) -> dict:
    """The audit. pool: face crops ((S, S, 3) uint8) of people other than `people`'s, the per-photo targets; people:
    name -> that person's crops (at least 2; the last is held out), the person-level targets and the curve's data.

    Each adapter trains on `photos_per_adapter` pool photos, plus all but the held-out photo of each person drawn
    in for it (probability 1/2 each), plus one canary: 4 to 8 rows, a person's photo count. Three attacks on the
    same adapters: per photo (offline LiRA on the pool photos), per person (offline LiRA on each person's held-out
    photo: did the adapter train on the person's other photos?) and canary exposure. `probe`: the curve's identity
    axis (its adapters then train on the probe's base model; the audit itself stays on the tiny model)."""
    from megaportrait.client.identity import prepare_training_set
    from megaportrait.shared.base_models import load_base_model

    if len(pool) < lira.pool_size:
        raise EvaluationError(f"the audit needs {lira.pool_size} face crops in its pool, got {len(pool)}")
    persons = {k: list(v) for k, v in sorted(people.items()) if len(v) >= 2}
    base_model = load_base_model(None)
    components = base_model.components
    canaries = canary_images(lira.canaries, lira.resolution, lira.seed + 777)
    rows = list(pool[: lira.pool_size])
    person_rows: dict[str, list[int]] = {}
    for name, crops in persons.items():
        person_rows[name] = list(range(len(rows), len(rows) + len(crops)))
        rows += crops
    canary_rows = list(range(len(rows), len(rows) + len(canaries)))
    rows += canaries
    plain = IdentitySettings(resolution=lira.resolution, prior_preservation=False)
    ts = sd_like(prepare_training_set(components, rows, plain))
    loss_seed = lira.seed + 10_000
    base = per_crop_losses(components, ts, seed=loss_seed, draws=lira.draws, max_timestep=lira.max_timestep)
    rng = np.random.default_rng(lira.seed)
    membership = np.zeros((lira.adapters, lira.pool_size), bool)
    person_in = np.zeros((lira.adapters, len(persons)), bool)
    training: list[np.ndarray] = []
    inserted = [a % len(canaries) for a in range(lira.adapters)]
    for a in range(lira.adapters):
        membership[a, rng.choice(lira.pool_size, lira.photos_per_adapter, replace=False)] = True
        person_in[a] = rng.random(len(persons)) < 0.5
        chosen = list(np.flatnonzero(membership[a]))
        for j, name in enumerate(persons):
            if person_in[a, j]:
                chosen += person_rows[name][:-1]
        chosen.append(canary_rows[inserted[a]])
        training.append(np.array(sorted(chosen)))
    held = [person_rows[name][-1] for name in persons]
    arms: dict[str, dict] = {}
    pool_exec = _worker_pool(rows, lira) if lira.workers > 1 else None
    try:
        for arm in lira.arms:
            losses, eps, reports = [], None, []
            if pool_exec is None:
                results = (_train_and_score(components, ts, training[a], arm.identity_settings(lira, lira.seed + a),
                                            lira.seed + a, lira, loss_seed) for a in range(lira.adapters))
            else:
                results = pool_exec.map(_worker_train, [(training[a], arm, a, lira, loss_seed)
                                                        for a in range(lira.adapters)])
            for adapted, report in results:
                losses.append(adapted)
                reports.append(report)
                eps = report.epsilon if report.epsilon is None else max(eps or 0.0, report.epsilon)
                if advance:
                    advance(arm.steps)
            arms[arm.name] = _arm_result(arm, np.stack(losses), reports, eps, base, membership, person_in, held,
                                         canary_rows, inserted, persons, lira)
    finally:
        if pool_exec is not None:
            pool_exec.shutdown()
    powered, verdict, arms = power_verdict(arms, lira.control_min_auc)
    curve = ([curve_point_dict(p) for p in privacy_utility_curve(components, persons, lira, probe=probe)]
             if persons else [])
    after = per_crop_losses(components, ts, seed=loss_seed, draws=lira.draws, max_timestep=lira.max_timestep)
    if not np.allclose(after, base, rtol=1e-5, atol=1e-7):
        raise EvaluationError("the base UNet changed during the audit (LoRA not fully detached); results invalid")
    return {"settings": {k: v for k, v in asdict(lira).items() if k != "arms"}, "arms": arms, "powered": powered,
            "verdict": verdict, "curve": curve, "adapter_rows": [int(len(t)) for t in training],
            "setting_note": "tiny in-code base model at 64 px with SD-like latents; per-photo targets are pool "
                            "photos of other people; an adapter's rows are its pool photos, the photos of the people "
                            "drawn in and one canary"}


CURVE_RENDER_STAGES = ("identity",)
CURVE_RENDER_PARAMS: dict = {"identity": {"controls": [], "control_scales": []}}
"""The curve's render job: the identity stage only, as plain SD inpainting of the template's face (no ControlNet,
so any base model works without ControlNets configured); the node's `diffusion_params` apply beneath it."""


@dataclass
class IdentityProbe:
    """The curve's identity axis: a `server.render.diffusion.DiffusionBackend` on the configured base model (the
    render node's code path; its models also train the curve's adapters), one template, and per person the SFace
    embedding of the held-out photo the render is compared with."""

    backend: Any
    template: Any  # shared.records.SourceImage
    template_name: str
    references: dict[str, np.ndarray]
    seed: int = 0


@dataclass(frozen=True)
class RenderIdentity:
    """One noise level's identity axis: the mean cosine over the people whose render has a face (None when no
    render has one), each person's cosine (None = no face) and why any is missing."""

    mean_cosine: float | None
    by_person: dict[str, float | None]
    faces_found: int
    note: str | None
    base_model: dict
    template: str


@dataclass(frozen=True)
class CurvePoint:
    """One noise level of the privacy-utility curve: epsilon per photo and per person (inf without DP) and the mean
    held-out denoising loss over the people."""

    noise_multiplier: float | None
    epsilon_per_photo: float
    epsilon_per_person: float
    heldout_denoising_loss: float
    people: int
    render_identity: RenderIdentity | None = None
    """Only with an `IdentityProbe`; `curve_point_dict` leaves the key out otherwise."""


def curve_point_dict(point: CurvePoint) -> dict:
    """A CurvePoint for JSON: without a probe, no `render_identity` key (the output is as before the axis)."""
    out = asdict(point)
    if point.render_identity is None:
        out.pop("render_identity")
    return out


def privacy_utility_curve(components, people: dict[str, Sequence[np.ndarray]], lira: LiraSettings, *,
                          private_noise: bool = False, probe: IdentityProbe | None = None) -> list[CurvePoint]:
    """Per noise level in `lira.curve_noise` (None = no DP): each person's adapter trains `lira.curve_steps` steps
    (lr 1e-3, batch `lira.batch_size`) on all but the last of their crops; the held-out loss is the adapter's
    denoising loss on that last crop (fixed draws, shared by every level). Epsilon per photo is Opacus' figure
    (delta `lira.delta`), per person the group-privacy figure over the person's trained photos; the worst person
    counts for both. People with fewer than 2 crops are left out; none left is an error. `private_noise`: DP noise
    and sampling from the OS's entropy (not reproducible) instead of fixed seeds, for real people's photos outside
    an audit run. `probe`: each adapter is also rendered onto the probe's template (`render_identity`); the adapters
    then train on the probe's base model (`components` is not used), and every person needs a reference embedding."""
    from megaportrait.client.identity import prepare_training_set
    from megaportrait.shared.accounting import epsilon, group_history

    usable = {k: list(v) for k, v in sorted(people.items()) if len(v) >= 2}
    if not usable:
        raise EvaluationError("the privacy-utility curve needs a person with at least 2 photos (one is held out), "
                              f"got {', '.join(f'{k}: {len(v)}' for k, v in sorted(people.items())) or 'nobody'}")
    if not lira.curve_noise:
        raise EvaluationError("the privacy-utility curve needs at least one noise level (curve_noise is empty)")
    if probe is not None:
        missing = sorted(set(usable) - set(probe.references))
        if missing:
            raise EvaluationError(f"the curve's identity axis has no held-out photo embedding for {missing}")
        components = probe.backend.models.components
    resolution = lira.curve_resolution or lira.resolution
    plain = IdentitySettings(resolution=resolution, prior_preservation=False)
    sets = {name: sd_like(prepare_training_set(components, crops, plain)) for name, crops in usable.items()}
    points = []
    for z in lira.curve_noise:
        arm = ArmSettings(f"z={z}", lira.curve_steps, 1e-3, z)
        held, eps_photo, eps_person, cosines = [], [], [], {}
        for i, (name, crops) in enumerate(usable.items()):
            settings = arm.identity_settings(lira, lira.seed + i).model_copy(update={"resolution": resolution})
            train = np.arange(len(crops) - 1)
            losses, report, *state = _train_and_score(components, sets[name], train, settings, lira.seed + i, lira,
                                                      lira.seed + 20_000, fixed_noise=not private_noise,
                                                      keep_lora=probe is not None)
            if probe is not None:
                cosines[name] = _render_cosine(probe, name, settings, state[0], report, f"z={z}")
            held.append(float(losses[-1]))
            if report.epsilon is None:
                eps_photo.append(math.inf)
                eps_person.append(math.inf)
            else:
                hist = [(report.noise_multiplier, report.sample_rate, report.steps)]
                eps_photo.append(report.epsilon)
                eps_person.append(epsilon(group_history(hist, len(train)), lira.delta))
        points.append(CurvePoint(noise_multiplier=z, epsilon_per_photo=max(eps_photo),
                                 epsilon_per_person=max(eps_person), heldout_denoising_loss=float(np.mean(held)),
                                 people=len(held),
                                 render_identity=None if probe is None else _render_identity(probe, cosines)))
    return points


def _render_cosine(probe: IdentityProbe, name: str, settings: IdentitySettings, lora_state: dict, report,
                   level: str) -> float | None:
    """Render the person's freshly trained adapter onto the probe's template with the diffusion backend and score
    the render's face against the held-out photo; None when no face is detected in the render."""
    from megaportrait.shared.logs import short_hash
    from megaportrait.shared.portrait_metrics import identity_cosine, output_face
    from megaportrait.shared.records import IdentityAdapter, StageSwitches

    backend = probe.backend
    ref = short_hash(f"curve:{name}")
    adapter = IdentityAdapter(person_ref=ref, token=settings.token, rank=settings.rank, alpha=settings.alpha,
                              target_modules=tuple(settings.target_modules), lora_state=lora_state,
                              base_model=backend.models.base_model, privacy=report, photo_sha256=())
    stages = StageSwitches(**{s: s in CURVE_RENDER_STAGES for s in ("identity", "shading", "harmonize")})
    portrait = backend.render(f"privacy-curve-{level}-{ref}", probe.template, adapter, stages=stages,
                              seed=probe.seed, params=CURVE_RENDER_PARAMS, progress=lambda stage, frac: None)
    face = output_face(backend.analyzer, portrait.pixels, mesh=False)
    cos = identity_cosine(face, probe.references[name])
    log.info("privacy curve %s, %s: render identity %s", level, ref, "no face" if cos is None else f"{cos:.3f}")
    return cos


def _render_identity(probe: IdentityProbe, cosines: dict[str, float | None]) -> RenderIdentity:
    found = [c for c in cosines.values() if c is not None]
    missing = [k for k, c in cosines.items() if c is None]
    base = probe.backend.models.base_model
    return RenderIdentity(
        mean_cosine=float(np.mean(found)) if found else None,
        by_person={k: None if c is None else round(float(c), 4) for k, c in cosines.items()},
        faces_found=len(found),
        note=(f"no face detected in the render for {len(missing)} of {len(cosines)} people ({', '.join(missing)}): "
              "no identity score for them" if missing else None),
        base_model={"name": base.name, "sha256": base.sha256, "kind": base.kind},
        template=probe.template_name)
