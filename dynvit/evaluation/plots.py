"""Pictures of an evaluation: the accuracy/FLOPs curve and where stage 2 looked.

Matplotlib's Agg backend draws to files only, so this works on servers
without a display. Figure sizes are fixed (no tight bounding box), which
keeps the PNGs' pixel sizes predictable.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from torch import Tensor  # noqa: E402

from dynvit.evaluation.curve import Curve, StagedCurve  # noqa: E402

CURVE_SIZE = (7.0, 5.0)  # inches; 700 x 500 pixels at DPI
DPI = 100
PANEL_INCHES = 2.0

# LF-ViT on DeiT-S, ImageNet-1k val, 224 input (Table 2 of the paper): (m, eta, top-1 %, GFLOPs fvcore)
PAPER_TABLE2: tuple[tuple[int, float, float, float], ...] = (
    (4, 0.62, 79.8, 1.8),
    (4, 0.77, 80.1, 2.2),
    (5, 0.47, 79.8, 1.7),
    (5, 0.61, 80.5, 2.0),
    (5, 0.76, 80.8, 2.5),
    (6, 0.46, 79.8, 1.8),
    (6, 0.65, 80.8, 2.4),
    (6, 0.85, 81.0, 3.0),
)
PAPER_DEIT_S = (79.8, 4.6)  # DeiT-S top-1 %, GFLOPs


@dataclass
class MarkedPoint:
    """A labelled point drawn on the curve (top-1 as a fraction, GFLOPs per image)."""

    label: str
    top1: float
    gflops: float


def plot_curve(
    curve: Curve,
    path: str | Path,
    title: str,
    chosen: MarkedPoint | None = None,
    baseline: MarkedPoint | None = None,
    paper_region: int | None = None,
) -> Path:
    """``curve.png``: top-1 (%) against expected GFLOPs per image.

    ``paper_region``: draw the paper's Table 2 points (the recipe is the
    paper's DeiT-S LF-ViT; its own region size is highlighted).
    """
    fig, ax = plt.subplots(figsize=CURVE_SIZE, dpi=DPI)
    try:
        gflops, top1 = curve.gflops.numpy(), curve.top1.numpy() * 100
        ax.plot(gflops, top1, "-", color="tab:blue", lw=1.5, label="this model, eta = 0 ... 1")
        ticks = [curve.index(e / 10) for e in range(11)]
        ax.plot(gflops[ticks], top1[ticks], "o", color="tab:blue", ms=3)
        for i in (ticks[0], ticks[-1]):
            ax.annotate(
                f"eta={float(curve.eta[i]):.1f}",
                (gflops[i], top1[i]),
                fontsize=7,
                xytext=(4, -10),
                textcoords="offset points",
            )
        if chosen is not None:
            ax.plot(chosen.gflops, chosen.top1 * 100, "*", color="tab:red", ms=13, label=chosen.label)
        if baseline is not None:
            ax.plot(baseline.gflops, baseline.top1 * 100, "s", color="black", ms=7, label=baseline.label)
        if paper_region is not None:
            for m in sorted({row[0] for row in PAPER_TABLE2}):
                rows = [row for row in PAPER_TABLE2 if row[0] == m]
                ax.plot(
                    [r[3] for r in rows],
                    [r[2] for r in rows],
                    "^--" if m == paper_region else "^:",
                    ms=6,
                    lw=0.8,
                    alpha=1.0 if m == paper_region else 0.45,
                    label=f"paper Table 2, LF-ViT m={m}",
                )
            ax.plot(PAPER_DEIT_S[1], PAPER_DEIT_S[0], "D", color="grey", ms=6, label="paper DeiT-S")
        _save_curve(fig, ax, title, path)
    finally:
        plt.close(fig)
    return Path(path)


def denormalise(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(B, 3, H, W) normalised images -> (B, H, W, 3) in [0, 1] for display."""
    mean_t = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images * std_t + mean_t).clamp(0, 1).permute(0, 2, 3, 1)


def _short(name: str, width: int = 12) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def plot_regions(
    images: Tensor,
    region: Tensor,
    kept: Tensor,
    grid1: tuple[int, int],
    exits: Tensor,
    labels: Tensor,
    predictions: Tensor,
    confidence: Tensor,
    class_names: Sequence[str],
    eta: float,
    path: str | Path,
    per_group: int = 8,
    groups: tuple[str, str] | None = None,
) -> Path:
    """``regions.png``: images that exited at stage 1 (top row) and images that needed stage 2 (bottom row).

    ``images``: (P, H, W, 3) in [0, 1]; ``region`` (P, 4) and ``kept`` (P, K) on
    the stage-1 grid, as stage 1 chose them (also for images that exited);
    ``predictions`` are the dynamic model's at ``eta``; ``confidence`` is
    stage 1's max softmax probability. ``groups``: the two rows' captions when
    the refining stage is not stage 2 (the default names stage 1's exit).
    """
    per_group = max(1, per_group)
    height, width = images.shape[1:3]
    cell_h, cell_w = height / grid1[0], width / grid1[1]
    fig = plt.figure(figsize=(PANEL_INCHES * per_group, 2 * (PANEL_INCHES + 0.4)), dpi=DPI)
    try:
        captions = groups or (f"exited at stage 1 (stage-1 confidence >= eta = {eta:g})", "needed stage 2")
        for subfig, mask, caption in zip(fig.subfigures(2, 1), (exits, ~exits), captions):
            chosen = torch.nonzero(mask).flatten()[:per_group].tolist()
            subfig.suptitle(f"{caption}: {int(mask.sum())} of the first {len(mask)} images", fontsize=9)
            axes = subfig.subplots(1, per_group, squeeze=False)[0]
            for ax in axes:
                ax.set_axis_off()
            if not chosen:
                axes[0].text(0.0, 0.5, "none", fontsize=9, transform=axes[0].transAxes)
            for ax, i in zip(axes, chosen):
                ax.imshow(images[i].numpy(), interpolation="nearest")
                for cell in kept[i].tolist():
                    r, c = divmod(cell, grid1[1])
                    ax.add_patch(
                        Rectangle(
                            (c * cell_w - 0.5, r * cell_h - 0.5),
                            cell_w,
                            cell_h,
                            facecolor="cyan",
                            edgecolor="none",
                            alpha=0.3,
                        )
                    )
                row, col, h, w = region[i].tolist()
                ax.add_patch(
                    Rectangle(
                        (col * cell_w - 0.5, row * cell_h - 0.5),
                        w * cell_w,
                        h * cell_h,
                        fill=False,
                        edgecolor="red",
                        lw=2,
                    )
                )
                good = int(predictions[i]) == int(labels[i])
                ax.set_title(
                    f"{_short(class_names[int(labels[i])])} -> {_short(class_names[int(predictions[i])])}"
                    f", p1={float(confidence[i]):.2f}",
                    fontsize=7,
                    color="green" if good else "red",
                )
        fig.text(
            0.5,
            0.005,
            textwrap.fill(
                "red: the region stage 1 chose (for every image, also those that exited); cyan: its top-K tokens, "
                "recomputed at full resolution in stage 2; title: label -> prediction, p1 = stage-1 confidence",
                width=30 * per_group,
            ),
            ha="center",
            va="bottom",
            fontsize=7,
        )
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return Path(path)


def _save_curve(fig: plt.Figure, ax: plt.Axes, title: str, path: str | Path) -> None:
    """The axes, title, grid and legend both accuracy/FLOPs pictures share, then the file."""
    ax.set_xlabel("expected GFLOPs per image (fvcore: 1 multiply-add = 1 FLOP)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.savefig(path, dpi=DPI)


def plot_staged_curve(
    curve: StagedCurve,
    path: str | Path,
    title: str,
    stage_points: Sequence[MarkedPoint] = (),
    chosen: MarkedPoint | None = None,
    baseline: MarkedPoint | None = None,
) -> Path:
    """``curve.png`` of a pipeline with several exits: top-1 (%) against expected GFLOPs over DVT's q sweep.

    ``stage_points``: each stage's own accuracy (every image through it) at its cost.
    """
    fig, ax = plt.subplots(figsize=CURVE_SIZE, dpi=DPI)
    try:
        gflops, top1 = curve.gflops.numpy(), curve.top1.numpy() * 100
        first, last = float(curve.q[0]), float(curve.q[-1])
        label = f"this model, exits ~ q^k, q = {first:g} ... {last:g}"
        ax.plot(gflops, top1, "-o", color="tab:blue", lw=1.5, ms=2.5, label=label)
        for i in (0, len(gflops) - 1):
            ax.annotate(
                f"q={float(curve.q[i]):g}",
                (gflops[i], top1[i]),
                fontsize=7,
                xytext=(4, -10),
                textcoords="offset points",
            )
        for point in stage_points:
            ax.plot(point.gflops, point.top1 * 100, "v", ms=7, label=point.label)
        if chosen is not None:
            ax.plot(chosen.gflops, chosen.top1 * 100, "*", color="tab:red", ms=13, label=chosen.label)
        if baseline is not None:
            ax.plot(baseline.gflops, baseline.top1 * 100, "s", color="black", ms=7, label=baseline.label)
        _save_curve(fig, ax, title, path)
    finally:
        plt.close(fig)
    return Path(path)
