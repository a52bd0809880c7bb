"""The report's figures, drawn from the report's JSON (never from the raw data).

Each function takes one section of the report dict and returns a PNG as a
base64 string for an ``<img src="data:image/png;base64,...">``, so the HTML is
one self-contained file and can be redrawn from the JSON alone.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 90


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _colours(labels: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab20")
    return {b: cmap(i % 20) for i, b in enumerate(sorted(set(labels)))}


def sites(rows: list[dict[str, Any]], covariates: list[dict[str, Any]]) -> str:
    """N per batch, then each numeric covariate's distribution and each categorical's mix."""
    numeric = [c["name"] for c in covariates if c["kind"] == "numeric"]
    categorical = [c["name"] for c in covariates if c["kind"] == "categorical"]
    panels = 1 + len(numeric) + len(categorical)
    labels = [r["batch"] for r in rows]
    fig, axes = plt.subplots(panels, 1, figsize=(max(6, 0.45 * len(rows)), 2.3 * panels),
                             squeeze=False)
    axes = axes[:, 0]
    axes[0].bar(labels, [r["n"] for r in rows], color="0.45")
    axes[0].set_ylabel("N")
    for ax, name in zip(axes[1:], numeric):
        ax.bxp([dict(r[f"{name}:box"], label=r["batch"]) for r in rows], showfliers=False)
        ax.set_ylabel(name)
    for ax, name in zip(axes[1 + len(numeric):], categorical):
        levels = sorted({lvl for r in rows for lvl in r[name]})
        bottom = np.zeros(len(rows))
        for lvl in levels:
            share = np.array([r[name].get(lvl, 0) / r["n"] for r in rows])
            ax.bar(labels, share, bottom=bottom, label=f"{name}={lvl}")
            bottom += share
        ax.set_ylabel(f"{name} share")
        ax.legend(fontsize=7, loc="upper right")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    fig.tight_layout()
    return _png(fig)


def site_effect(per_feature: list[dict[str, Any]], alpha: float) -> str:
    """-log10 of the BH-adjusted F-test p-value per feature, before against after."""
    if per_feature and "log10p_F_before" in per_feature[0]:   # from log sf: no p-value clipped at 1e-300
        lb = -np.array([r["log10p_F_before"] for r in per_feature])
        la = -np.array([r["log10p_F_after"] for r in per_feature])
    else:   # a report written before the log p-values were kept
        lb = -np.log10(np.clip([r["q_F_before"] for r in per_feature], 1e-300, 1))
        la = -np.log10(np.clip([r["q_F_after"] for r in per_feature], 1e-300, 1))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.scatter(lb, la, s=12, color="tab:blue")
    cut = -np.log10(alpha)
    ax.axhline(cut, color="tab:red", lw=1, ls="--", label=f"p = {alpha} (before BH)")
    ax.axvline(cut, color="tab:red", lw=1, ls="--")
    ax.set_xlabel("site effect before: -log10 p (F-test)")
    ax.set_ylabel("site effect after: -log10 p (F-test)")
    ax.legend(fontsize=8)
    return _png(fig)


def biology(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> str:
    """Per covariate term: after-estimate against before-estimate in units of the before SE.

    On this scale a before estimate's 95 % CI is about +-2 wide, so a point
    within its error bar of the diagonal kept its effect.
    """
    terms = list(dict.fromkeys(r["term"] for r in before))
    fig, axes = plt.subplots(1, len(terms), figsize=(4.2 * len(terms), 4), squeeze=False)
    after_by = {(r["feature"], r["term"]): r["estimate"] for r in after}
    for ax, term in zip(axes[0], terms):
        rows = [r for r in before if r["term"] == term]
        se = np.array([max(r["se"], 1e-300) for r in rows])
        est = np.array([r["estimate"] for r in rows]) / se
        err = np.array([r["ci_high"] - r["estimate"] for r in rows]) / se
        aft = np.array([after_by[(r["feature"], term)] for r in rows]) / se
        sig = np.array([r["significant"] for r in rows], dtype=bool)
        ax.errorbar(est[sig], aft[sig], yerr=err[sig], fmt="o", ms=3, color="tab:blue",
                    elinewidth=0.6, label="significant before (bar: before CI)")
        ax.scatter(est[~sig], aft[~sig], s=6, color="0.6", label="not significant before")
        lo = np.nanmin(np.r_[est, aft - err, -1.0])
        hi = np.nanmax(np.r_[est, aft + err, 1.0])
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.7)
        ax.set_title(term)
        ax.set_xlabel("before (site-adjusted) / before SE")
        ax.set_ylabel("after harmonization / before SE")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def boxplots(boxes: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """Per-site boxplots of the main features, before and after."""
    n = len(boxes)
    width = max(6, 0.4 * max(len(v["before"]) for v in boxes.values()))
    fig, axes = plt.subplots(n, 2, figsize=(2 * width, 2.6 * n), squeeze=False)
    for row, (feature, parts) in zip(axes, boxes.items()):
        lo = min(b["whislo"] for p in parts.values() for b in p)
        hi = max(b["whishi"] for p in parts.values() for b in p)
        for ax, when in zip(row, ("before", "after")):
            ax.bxp(parts[when], showfliers=False)
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
            ax.set_title(f"{feature}: {when}", fontsize=9)
            ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    fig.tight_layout()
    return _png(fig)


def pca(section: dict[str, dict[str, Any]]) -> str:
    """PC1 against PC2 coloured by batch, before and after."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    colours = _colours(section["before"]["batch"])
    for ax, when in zip(axes, ("before", "after")):
        p = section[when]
        for b in sorted(set(p["batch"])):
            idx = [i for i, x in enumerate(p["batch"]) if x == b]
            ax.scatter(np.array(p["pc1"])[idx], np.array(p["pc2"])[idx], s=6, color=colours[b],
                       label=b)
        ax.set_title(f"{when}: batch explains {100 * p['batch_r2'][0]:.0f} % of PC1, "
                     f"{100 * p['batch_r2'][1]:.0f} % of PC2", fontsize=9)
        ax.set_xlabel(f"PC1 ({100 * p['explained'][0]:.0f} %)")
        ax.set_ylabel(f"PC2 ({100 * p['explained'][1]:.0f} %)")
    axes[1].legend(fontsize=6, ncol=2, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return _png(fig)


def location_scale(section: dict[str, Any]) -> str:
    """ComBat's per-site location (gamma*) and scale (delta*) estimates across features."""
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.45 * len(section["batches"])), 6))
    for ax, key, ref, label in ((axes[0], "gamma_star", 0.0, "location gamma*"),
                                (axes[1], "delta_star", 1.0, "scale delta*")):
        values = np.array(section[key])
        ax.boxplot(values.T, showfliers=True, flierprops={"markersize": 3})   # every estimate, outliers too
        ax.set_xticks(range(1, len(section["batches"]) + 1), section["batches"])
        worst = np.unravel_index(np.argmax(np.abs(values - ref)), values.shape)
        ax.annotate(f"{values[worst]:.2f}", (worst[0] + 1, values[worst]), fontsize=7, color="tab:red",
                    xytext=(4, 0), textcoords="offset points")
        ax.axhline(ref, color="k", lw=0.7)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    fig.tight_layout()
    return _png(fig)


def priors(panels: list[dict[str, Any]]) -> str:
    """Per batch (the worst prior fits): the raw location and scale estimates across features as
    histograms, the empirical-Bayes prior's density over them, and the shrunken estimates as ticks."""
    from scipy import stats

    fig, axes = plt.subplots(len(panels), 2, figsize=(8, 2.2 * len(panels)), squeeze=False)
    for row, p in zip(axes, panels):
        g = np.array(p["gamma_hat"])
        row[0].hist(g, bins=30, density=True, color="0.75", label="gamma-hat (raw)")
        grid = np.linspace(g.min(), g.max(), 200)
        row[0].plot(grid, stats.norm.pdf(grid, p["gamma_bar"], np.sqrt(p["t2"])), "k", lw=1, label="prior")
        row[0].plot(p["gamma_star"], np.zeros(len(g)), "|", color="tab:blue", ms=8, label="gamma* (shrunken)")
        row[0].set_title(f"{p['batch']}: location (KS p {p['gamma_ks_p']})", fontsize=8)
        if "delta_hat" in p:
            d = np.array(p["delta_hat"])
            row[1].hist(d, bins=30, density=True, color="0.75", label="delta-hat (raw)")
            grid = np.linspace(max(d.min(), 1e-6), d.max(), 200)
            row[1].plot(grid, stats.invgamma.pdf(grid, p["a"], 0, p["b"]), "k", lw=1, label="prior")
            row[1].plot(p["delta_star"], np.zeros(len(d)), "|", color="tab:blue", ms=8, label="delta* (shrunken)")
            row[1].set_title(f"{p['batch']}: scale (KS p {p['delta_ks_p']})", fontsize=8)
        else:
            row[1].axis("off")
        for ax in row:
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    return _png(fig)
