"""The evaluation's plots: matplotlib (Agg backend, no display), one PNG per question, from the result dict.

Each function takes the JSON-ready section it plots and a path, writes the PNG and returns the path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_identity_by_stage(renders: list[dict], stages: list[str], threshold: float, path: Path) -> Path:
    """Genuine and impostor cosines per ablation stage (strip plot with means), the threshold as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    rng = np.random.default_rng(0)
    for x, stage in enumerate(stages):
        rows = [r for r in renders if r["stage"] == stage]
        for offset, key, colour in ((-0.17, "genuine", "tab:green"), (0.17, "impostor", "tab:red")):
            vals = np.array([c for r in rows for c in r[key]])
            if len(vals):
                ax.scatter(x + offset + rng.uniform(-0.07, 0.07, len(vals)), vals, s=8, alpha=0.45, color=colour,
                           label=key if x == 0 else None)
                ax.plot([x + offset - 0.12, x + offset + 0.12], [vals.mean()] * 2, color="black", lw=2)
    ax.axhline(threshold, ls="--", color="grey", lw=1)
    ax.text(len(stages) - 0.5, threshold + 0.01, f"SFace threshold {threshold}", ha="right", va="bottom",
            fontsize=8, color="grey")
    ax.set_xticks(range(len(stages)), stages)
    ax.set_ylabel("cosine to real photos")
    ax.set_title("Identity of renders vs held-out photos (genuine) and other people (impostor)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_fairness(fairness: dict, path: Path) -> Path:
    """Mean identity (with TAR annotated) per template band and per person band, side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=110, sharey=True)
    for ax, key, title in ((axes[0], "template_band", "by template's skin tone"),
                           (axes[1], "person_band", "by person's skin tone")):
        groups = fairness[key]["by_band"]
        names = list(groups)
        means = [groups[g]["mean_identity"] or 0.0 for g in names]
        ax.bar(range(len(names)), means, color="tab:blue", alpha=0.75)
        for i, g in enumerate(names):
            tar = groups[g]["tar"]
            n = groups[g]["n_templates" if key == "template_band" else "n_people"]
            ax.text(i, means[i] + 0.01, f"TAR {tar:.2f}\nn={n}" if tar is not None else f"n={n}", ha="center",
                    va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_title(title + ("" if fairness[key]["conclusive"] else " (too few to conclude)"), fontsize=10)
    axes[0].set_ylabel("mean identity cosine (full renders)")
    axes[0].set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_robustness(robustness: dict, path: Path) -> Path:
    """Per degradation: mean identity drop (left axis) and failure rate incl. refusals (right) by severity."""
    plt = _pyplot()
    kinds = list(robustness)
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 3.5), dpi=110, sharey=True)
    axes = np.atleast_1d(axes)
    for ax, kind in zip(axes, kinds):
        rows = robustness[kind]["levels"]
        xs = range(len(rows))
        drops = [r["mean_drop"] if r["mean_drop"] is not None else np.nan for r in rows]
        fails = [r["failure_rate"] for r in rows]
        ax.plot(xs, drops, "o-", color="tab:purple", label="identity drop")
        ax.bar(xs, fails, color="tab:orange", alpha=0.35, label="failure rate")
        for x, r in zip(xs, rows):
            if r["n_refused"]:
                ax.text(x, (fails[x] or 0) + 0.02, f"{r['n_refused']}/{r['n_photos']} refused", ha="center",
                        fontsize=7)
        ax.set_xticks(list(xs), [f"{r['level']:g}" for r in rows])
        ax.set_xlabel(robustness[kind]["unit"], fontsize=8)
        ax.set_title(kind, fontsize=10)
        ax.axhline(0, color="grey", lw=0.5)
    axes[0].set_ylabel("drop in cosine / failure rate")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _roc(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    tpr = [0.0] + [float((pos >= t).mean()) for t in thresholds]
    fpr = [0.0] + [float((neg >= t).mean()) for t in thresholds]
    return np.array(fpr), np.array(tpr)


def plot_privacy_audit(audit: dict, path: Path) -> Path:
    """Left: ROC of the LiRA attack per arm (log axes, with each DP arm's epsilon bound). Right: the
    privacy-utility curve, epsilon per photo and per person against held-out denoising loss."""
    import math

    plt = _pyplot()
    fig, (ax, cx) = plt.subplots(1, 2, figsize=(9.2, 4.2), dpi=110)
    colours = {"positive_control": "tab:red", "production_dp": "tab:green"}
    for arm, summary in audit["arms"].items():
        roc = summary.get("roc_scores")
        if not roc or "auc" not in summary:
            continue
        scores, labels = np.asarray(roc["scores"]), np.asarray(roc["labels"])
        fpr, tpr = _roc(scores[labels == 1], scores[labels == 0])
        eps = summary.get("epsilon_per_photo")
        label = f"{arm}: AUC {summary['auc']:.2f}" + (f", eps/photo {eps:.3g}" if eps is not None else ", no DP")
        ax.plot(np.maximum(fpr, 1e-3), np.maximum(tpr, 1e-3), color=colours.get(arm, "tab:blue"), label=label)
        if eps is not None and eps < 50:
            grid = np.logspace(-3, 0, 50)
            ax.plot(grid, np.minimum(1, math.exp(eps) * grid), ls=":", color=colours.get(arm, "tab:blue"),
                    label=f"bound e^eps*FPR ({arm})")
    ax.plot([1e-3, 1], [1e-3, 1], ls="--", color="grey", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("LiRA per photo: " + ("has power" if audit["powered"] else "NO POWER"), fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    draw_privacy_utility(cx, audit.get("curve", []))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_privacy_utility(cx, curve: list[dict], title: str = "Privacy-utility curve") -> None:
    """On axes `cx`: held-out denoising loss against epsilon per photo and per person (log x), one point per noise
    level (labelled z=...); the no-DP level, whose epsilon is infinite, as a horizontal line."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    points = [r for r in curve if r["noise_multiplier"] is not None]
    if points:
        loss = [r["heldout_denoising_loss"] for r in points]
        cx.plot([r["epsilon_per_photo"] for r in points], loss, "o-", label="epsilon per photo")
        cx.plot([r["epsilon_per_person"] for r in points], loss, "s--", label="epsilon per person")
        for r in points:
            for key in ("epsilon_per_photo", "epsilon_per_person"):
                cx.annotate(f"z={r['noise_multiplier']:g}", (r[key], r["heldout_denoising_loss"]), fontsize=7,
                            xytext=(4, 5), textcoords="offset points")
        nodp = [r for r in curve if r["noise_multiplier"] is None]
        if nodp:
            cx.axhline(nodp[0]["heldout_denoising_loss"], color="grey", ls=":", label="no DP (epsilon infinite)")
        cx.set_xscale("log")
        cx.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        cx.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        cx.xaxis.set_minor_formatter(NullFormatter())
        cx.set_xlabel("epsilon (delta 1e-5, Opacus RDP)")
        cx.set_ylabel("held-out denoising loss (lower = better)")
        handles, labels = cx.get_legend_handles_labels()
        if any(r.get("render_identity") for r in points):
            handles, labels = _draw_render_identity(cx, curve, points, handles, labels)
        cx.legend(handles, labels, fontsize=7)
    cx.set_title(title, fontsize=10)


def _draw_render_identity(cx, curve: list[dict], points: list[dict], handles: list, labels: list) -> tuple[list, list]:
    """Second utility axis (right): render identity (SFace cosine) against epsilon per photo; a level whose renders
    had no face is marked on the x axis with a cross, and the no-DP level is a horizontal line."""
    ix = cx.twinx()
    scored = [r for r in points if (r.get("render_identity") or {}).get("mean_cosine") is not None]
    if scored:
        line, = ix.plot([r["epsilon_per_photo"] for r in scored], [r["render_identity"]["mean_cosine"] for r in scored],
                        "D-", color="tab:purple", label="render identity (eps per photo)")
        handles, labels = handles + [line], labels + [line.get_label()]
    faceless = [r for r in points if (r.get("render_identity") or {}).get("mean_cosine") is None]
    if faceless:
        mark = ix.scatter([r["epsilon_per_photo"] for r in faceless], [0.0] * len(faceless), marker="x",
                          color="tab:purple", label="render: no face (no identity)")
        handles, labels = handles + [mark], labels + [mark.get_label()]
    nodp = [r for r in curve if r["noise_multiplier"] is None and (r.get("render_identity") or {}).get("mean_cosine")
            is not None]
    if nodp:
        line = ix.axhline(nodp[0]["render_identity"]["mean_cosine"], color="tab:purple", ls=":",
                          label="render identity, no DP")
        handles, labels = handles + [line], labels + [line.get_label()]
    ix.set_ylabel("render identity, SFace cosine (higher = better)", color="tab:purple")
    return handles, labels


def plot_privacy_utility(curve: list[dict], path: Path, title: str = "Privacy-utility curve") -> Path:
    """The privacy-utility curve alone (`draw_privacy_utility`), for the demo report."""
    plt = _pyplot()
    fig, cx = plt.subplots(figsize=(5.6, 4.0), dpi=110)
    draw_privacy_utility(cx, curve, title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
