"""Calibrated exits: pick eta (or one threshold per exit) on one part of the data, report it on a disjoint part.

Choosing the threshold on the images it is then scored on flatters the
figure; here a seeded random split decides which images calibrate and
which are held out for the honest report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dynvit.evaluation.curve import Curve, StagedCurve, dvt_sweep, eta_grid, exit_decisions, staged_points, sweep
from dynvit.evaluation.records import Records
from dynvit.stages import ExitPolicy


def split_indices(count: int, fraction: float = 0.5, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Disjoint sorted (calibration, held-out) indices covering ``range(count)``; neither is empty."""
    if count < 2:
        raise ValueError(f"calibration needs at least 2 images (one to calibrate, one to report on), got {count}")
    if not 0 < fraction < 1:
        raise ValueError(f"eval.calibration_fraction must be in (0, 1), got {fraction}")
    n_cal = min(max(round(count * fraction), 1), count - 1)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[:n_cal].sort().values, order[n_cal:].sort().values


def _goal_mode(budget_gflops: float | None, target_acc: float | None) -> str:
    """The calibration's mode, once the goal is checked: budget, target, or recipe (no goal: its threshold)."""
    if budget_gflops is not None and target_acc is not None:
        raise ValueError("give a FLOPs budget or an accuracy target, not both")
    if target_acc is not None and not 0 <= target_acc <= 1:
        raise ValueError(f"the accuracy target is a fraction in [0, 1] (0.8 for 80%), got {target_acc}")
    return "budget" if budget_gflops is not None else "target" if target_acc is not None else "recipe"


def _split(
    mode: str,
    feasible: bool,
    budget_gflops: float | None,
    target_acc: float | None,
    fraction: float,
    seed: int,
    calibration_index: Tensor,
    heldout_index: Tensor,
) -> dict[str, Any]:
    """The :class:`CalibrationSplit` fields both calibrations fill alike, by name."""
    return dict(
        mode=mode,
        feasible=feasible,
        budget_gflops=budget_gflops,
        target_acc=target_acc,
        fraction=fraction,
        seed=seed,
        calibration_index=calibration_index,
        heldout_index=heldout_index,
    )


def choose_eta(
    curve: Curve | StagedCurve, budget_gflops: float | None = None, target_acc: float | None = None
) -> tuple[int, bool]:
    """Grid position of the chosen threshold (or row of per-exit thresholds) and whether it meets the constraint.

    Budget: the most accurate threshold whose expected GFLOPs stay within the
    budget (ties: the cheaper). Target: the cheapest threshold whose top-1
    reaches the target (ties: the more accurate). When nothing qualifies, the
    closest miss (cheapest, or most accurate) is returned with ``False``.
    """
    if (budget_gflops is None) == (target_acc is None):
        raise ValueError("give exactly one of budget_gflops and target_acc")
    top1, gflops = curve.top1.tolist(), curve.gflops.tolist()
    positions = range(len(top1))
    if budget_gflops is not None:
        feasible = [i for i in positions if gflops[i] <= budget_gflops]
        if feasible:
            return min(feasible, key=lambda i: (-top1[i], gflops[i], i)), True
        return min(positions, key=lambda i: (gflops[i], -top1[i], i)), False
    feasible = [i for i in positions if top1[i] >= target_acc]
    if feasible:
        return min(feasible, key=lambda i: (gflops[i], -top1[i], i)), True
    return min(positions, key=lambda i: (-top1[i], gflops[i], i)), False


@dataclass
class CalibrationSplit:
    """What every calibration records: the goal, the split, and the chosen point's figures on both parts."""

    mode: str  # "budget", "target" or "recipe" (the recipe's own threshold(s), nothing chosen)
    feasible: bool  # the constraint is met on the calibration images
    budget_gflops: float | None
    target_acc: float | None
    fraction: float
    seed: int
    calibration_index: Tensor  # (N_cal,) indices into the records
    heldout_index: Tensor  # (N_held,) disjoint from calibration_index
    calibration: dict[str, Any]  # the curve's point on the calibration images
    heldout: dict[str, Any]  # the same threshold(s) on the held-out images

    # what was searched over, and the pick, for messages
    candidates = "threshold"

    @property
    def choice(self) -> str:
        raise NotImplementedError

    def shortfall(self) -> str | None:
        """The warning to give when nothing met the goal on the calibration images; None when something did."""
        if self.feasible:
            return None
        goal = f"{self.budget_gflops} GFLOPs" if self.budget_gflops is not None else f"top-1 {self.target_acc}"
        return f"no {self.candidates} meets {goal} on the calibration images; {self.choice} is the closest"


@dataclass
class Calibration(CalibrationSplit):
    """One threshold (eta) for a two-stage cascade."""

    eta: float

    @property
    def choice(self) -> str:
        return f"eta={self.eta:g}"


def calibrate(
    records: Records,
    stage1_gflops: float,
    stage2_gflops: float,
    budget_gflops: float | None = None,
    target_acc: float | None = None,
    default_eta: float | None = None,
    fraction: float = 0.5,
    seed: int = 0,
    etas: Tensor | None = None,
    policy: ExitPolicy | None = None,
) -> Calibration:
    """Choose eta on a ``fraction`` of the images and report it on the others.

    With neither ``budget_gflops`` nor ``target_acc``, ``default_eta`` (the
    recipe's threshold) is reported on both parts unchanged.
    """
    mode = _goal_mode(budget_gflops, target_acc)
    cal_index, held_index = split_indices(records.count, fraction, seed)
    if mode == "recipe":
        if default_eta is None:
            raise ValueError("give budget_gflops, target_acc or default_eta")
        grid = torch.tensor([float(default_eta)], dtype=torch.float64)
    else:
        grid = eta_grid() if etas is None else etas
    exits = exit_decisions(records.logits[0], grid, policy)
    on_cal = sweep(records.subset(cal_index), stage1_gflops, stage2_gflops, grid, exits=exits[:, cal_index])
    on_held = sweep(records.subset(held_index), stage1_gflops, stage2_gflops, grid, exits=exits[:, held_index])
    if mode == "recipe":
        chosen, feasible = 0, True
    else:
        chosen, feasible = choose_eta(on_cal, budget_gflops, target_acc)
    split = _split(mode, feasible, budget_gflops, target_acc, fraction, seed, cal_index, held_index)
    point, held = on_cal.point(chosen), on_held.point(chosen)
    return Calibration(**split, eta=float(grid[chosen]), calibration=point, heldout=held)


@dataclass
class StagedCalibration(CalibrationSplit):
    """Per-exit thresholds (DVT's rule)."""

    q: float | None  # the sweep parameter of the chosen thresholds; None in mode "recipe"
    thresholds: list[float]  # one per exit; inf: no image stops there

    candidates = "q of the sweep"

    @property
    def choice(self) -> str:
        return f"q={self.q:g}"


def calibrate_staged(
    records: Records,
    stage_gflops: Sequence[float],
    budget_gflops: float | None = None,
    target_acc: float | None = None,
    default_thresholds: Sequence[float] | None = None,
    fraction: float = 0.5,
    seed: int = 0,
    qs: Tensor | None = None,
) -> StagedCalibration:
    """Choose one threshold per exit on a ``fraction`` of the images and report them on the others.

    For each q of the sweep the thresholds are found greedily on the
    calibration images alone (:func:`~dynvit.evaluation.curve.dvt_sweep`);
    the q whose figures on those images meet the goal best is chosen as
    :func:`choose_eta` chooses, and its thresholds are applied unchanged to
    the held-out images. With neither goal, ``default_thresholds`` (the
    recipe's) are reported on both parts.
    """
    mode = _goal_mode(budget_gflops, target_acc)
    cal_index, held_index = split_indices(records.count, fraction, seed)
    on_cal_records, held_records = records.subset(cal_index), records.subset(held_index)
    if mode == "recipe":
        if default_thresholds is None:
            raise ValueError("give budget_gflops, target_acc or default_thresholds")
        rows = torch.tensor([list(default_thresholds)], dtype=torch.float64)
        on_cal = staged_points(on_cal_records, stage_gflops, rows)
        chosen, feasible = 0, True
    else:
        on_cal = dvt_sweep(on_cal_records, stage_gflops, qs)
        chosen, feasible = choose_eta(on_cal, budget_gflops, target_acc)
    thresholds = on_cal.thresholds[chosen : chosen + 1]
    on_held = staged_points(held_records, stage_gflops, thresholds)
    point = on_cal.point(chosen)
    split = _split(mode, feasible, budget_gflops, target_acc, fraction, seed, cal_index, held_index)
    return StagedCalibration(
        **split, q=point["q"], thresholds=thresholds[0].tolist(), calibration=point, heldout=on_held.point(0)
    )
