"""Evaluation of dynamic pipelines: per-stage accuracy, the accuracy/FLOPs curve, calibrated exits, pictures, speed.

:func:`evaluate` is what ``dynvit eval`` runs: one pass over the evaluation
split records both stages' outputs for every image; everything else (the
threshold sweep, calibration, the baseline, the pictures) is computed from
those records, and throughput is timed on a batch of the same images.
:func:`evaluate_pipeline` does the same for a built pipeline and any
iterable of ``(images, labels)`` batches.

Names are imported on first use, so importing the package (for
:class:`EvalConfig`, defined in :mod:`dynvit.recipe_sections`) does not
pull in matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

from dynvit.evaluation.config import EvalConfig

# public name -> module of dynvit.evaluation that defines it
_EXPORTS: dict[str, str] = {
    "evaluate": "runner",
    "evaluate_pipeline": "runner",
    "baseline_metrics": "runner",
    "Records": "records",
    "collect_records": "records",
    "topk_correct": "records",
    "Curve": "curve",
    "eta_grid": "curve",
    "exit_decisions": "curve",
    "sweep": "curve",
    "Calibration": "calibration",
    "calibrate": "calibration",
    "choose_eta": "calibration",
    "split_indices": "calibration",
    "Throughput": "throughput",
    "measure_throughput": "throughput",
    "plot_curve": "plots",
    "plot_regions": "plots",
    "format_table": "report",
    "write_metrics": "report",
}

__all__ = ["EvalConfig", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dynvit.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dynvit.evaluation.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
