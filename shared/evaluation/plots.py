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


def plot_privacy(privacy: dict, path: Path) -> Path:
    """ROC curves of the membership-inference attack, pooled over adapters, DP off vs on."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=110)
    for arm, colour in (("no_dp", "tab:red"), ("dp", "tab:green")):
        scores = privacy["scores"][arm]
        fpr, tpr = _roc(np.asarray(scores["members"]), np.asarray(scores["non_members"]))
        summary = privacy["arms"][arm]
        eps = summary["epsilon"]
        label = f"{'DP' if arm == 'dp' else 'no DP'}: AUC {summary['auc_pooled']:.2f}"
        label += f", eps={eps:.3g}" if eps is not None else ""
        ax.plot(fpr, tpr, color=colour, label=label)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("Membership inference on Identity Net adapters", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
