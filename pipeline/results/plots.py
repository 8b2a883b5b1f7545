"""The report's plots, drawn with matplotlib (Agg, no display) and returned as PNG
`data:` URIs, so the page holds them and opens from disk with nothing beside it.
Each returns None when there is nothing to draw."""
from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd

from models.identity import SAME_PERSON_THRESHOLD


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _per_attribute(values: dict[str, pd.Series], bins: np.ndarray, color: str, xlabel: str,
                   line: float | None = None) -> str:
    """One histogram per attribute, four to a row, on a shared x range (`bins`)."""
    plt = _pyplot()
    cols = min(len(values), 4)
    rows = -(-len(values) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.3 * rows), squeeze=False)
    for ax, (attr, v) in zip(axes.flat, values.items()):
        ax.hist(v, bins=bins, color=color)
        if line is not None:
            ax.axvline(line, color="#c0392b", linestyle="--", linewidth=1)
        ax.set_title(f"{attr} (n={len(v)})", fontsize=9)
        ax.set_xlim(bins[0], bins[-1])
        ax.set_xlabel(xlabel, fontsize=8)
    for ax in list(axes.flat)[len(values):]:
        ax.axis("off")
    fig.tight_layout()
    return _data_uri(fig)


def target_probability_histograms(outcomes: pd.DataFrame) -> str | None:
    """Per attribute, the histogram of the probability of the target's side after the
    edit (attribute_outcomes' p_target_after); 0.5 marks the on-target line."""
    if not len(outcomes):
        return None
    values = {attr: g["p_target_after"].astype(float)
              for attr, g in outcomes.groupby("attribute", sort=True)}
    return _per_attribute(values, np.linspace(0, 1, 21), "#3b7dd8", "P(target) after", 0.5)


def identity_histogram(distances: pd.Series) -> str | None:
    """The identity distances, with dlib's same-person threshold."""
    values = pd.to_numeric(distances, errors="coerce").dropna()
    if not len(values):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 2.6))
    top = max(float(values.max()), SAME_PERSON_THRESHOLD) * 1.1
    ax.hist(values, bins=np.linspace(0, top, 25), color="#27ae60")
    ax.axvline(SAME_PERSON_THRESHOLD, color="#c0392b", linestyle="--", linewidth=1,
               label=f"same-person threshold {SAME_PERSON_THRESHOLD}")
    ax.set_xlabel("face descriptor distance, input vs result", fontsize=8)
    ax.set_ylabel("edits", fontsize=8)
    ax.legend(fontsize=7)
    return _data_uri(fig)


def steps_vary(ok: pd.DataFrame) -> bool:
    """Whether rows that ran the same settings (attributes and mode) ran different numbers
    of steps: early stopping. Local and global edits differ by design; that is not it."""
    if not len(ok):
        return False
    keys = ok.assign(_attrs=[",".join(a) for a in ok["attributes"]])
    return bool((keys.groupby(["_attrs", "mode"])["steps"].nunique() > 1).any())


def preservation_against_steps(ok: pd.DataFrame, points: int = 20_000) -> str | None:
    """preservation_l1 and outside_psnr against the steps each edit ran, when early
    stopping made them differ (steps_vary); a sample of `points` edits beyond that many."""
    if not steps_vary(ok):
        return None
    if len(ok) > points:                         # a million dots draw slowly and say no more
        ok = ok.sample(points, random_state=0)
    steps = pd.to_numeric(ok["steps"], errors="coerce")
    panels = [(col, label) for col, label in
              (("preservation_l1", "preservation L1 (lower: better)"),
               ("outside_psnr", "PSNR outside the mask, dB"))
              if np.isfinite(pd.to_numeric(ok[col], errors="coerce")).any()]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 2.8), squeeze=False)
    for ax, (col, label) in zip(axes.flat, panels):
        values = pd.to_numeric(ok[col], errors="coerce")
        finite = np.isfinite(values) & steps.notna()
        ax.scatter(steps[finite], values[finite], s=10, alpha=0.6, color="#8e44ad")
        ax.set_xlabel("steps", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
    fig.tight_layout()
    return _data_uri(fig)


def entanglement_histograms(outcomes: pd.DataFrame) -> str | None:
    """Per edited attribute, the histogram of the edits' entanglement (the mean absolute
    change of the other attributes' probabilities)."""
    drift = pd.to_numeric(outcomes["entanglement"], errors="coerce")
    measured = outcomes.assign(entanglement=drift)[drift.notna()]
    if not len(measured):
        return None
    values = {attr: g["entanglement"] for attr, g in measured.groupby("attribute", sort=True)}
    top = max(float(measured["entanglement"].max()) * 1.1, 0.05)
    return _per_attribute(values, np.linspace(0, top, 21), "#8e44ad",
                          "entanglement (other attributes' drift)")
