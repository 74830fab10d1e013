"""``metrics.json`` and the terminal table.

The layout is documented as a JSON Schema in ``docs/metrics_schema.json``;
``SCHEMA_VERSION`` changes whenever a field changes meaning or goes away.
Accuracies and fractions are in [0, 1], costs in GFLOPs per image in the
fvcore convention (1 multiply-add = 1 FLOP), speeds in images per second;
the ``units`` object of every file says so again.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor

from dynvit.evaluation.calibration import Calibration, StagedCalibration
from dynvit.evaluation.curve import Curve, StagedCurve
from dynvit.evaluation.throughput import Throughput

SCHEMA_VERSION = 1
FLOPS_CONVENTION = "fvcore: 1 multiply-add = 1 FLOP"

UNITS: dict[str, str] = {
    "top1": "fraction of images whose label is the top prediction, in [0, 1]",
    "top5": "fraction of images whose label is among the 5 top predictions, in [0, 1]; null below 5 classes",
    "exit_fraction": "fraction of images that stop after stage 1, in [0, 1]",
    "gflops": f"GFLOPs per image ({FLOPS_CONVENTION}); expected value over the images where it depends on eta",
    "eta": "exit threshold: an image stops after stage 1 when the exit policy's score (max softmax) >= eta",
    "count": "number of images",
    "images_per_second": "images per second (img/s), from the median time of one batch",
    "seconds_per_batch": "seconds, median over the timed repeats of one batch",
    "speedup": "dynamic images_per_second divided by the plain backbone's (same weights, same run)",
    "budget_gflops": f"GFLOPs per image ({FLOPS_CONVENTION})",
    "target_acc": "top-1 as a fraction in [0, 1]",
    "thresholds": "one exit threshold per exit (three or more stages); null: no image stops at that exit",
    "exit_fractions": "per exit, the fraction of all images that stop there, in [0, 1]",
    "q": "DVT's sweep parameter: the share of images meant to stop at stage k is proportional to q**k",
}


def _thresholds(values: list[float]) -> list[float | None]:
    return [None if math.isinf(t) else t for t in values]


def calibration_metrics(
    calibration: Calibration | StagedCalibration | None, baseline_correct: Tensor | None = None
) -> dict[str, Any] | None:
    """The calibration record; with ``baseline_correct`` (per image), the baseline's top-1 on both parts too."""
    if calibration is None:
        return None
    baseline_top1 = None
    if baseline_correct is not None:
        baseline_top1 = {
            part: float(baseline_correct[index].double().mean())
            for part, index in (("calibration", calibration.calibration_index), ("heldout", calibration.heldout_index))
        }
    if isinstance(calibration, StagedCalibration):
        chosen = {"q": calibration.q, "thresholds": _thresholds(calibration.thresholds)}
    else:
        chosen = {"eta": round(calibration.eta, 6)}
    return {
        "mode": calibration.mode,
        **chosen,
        "feasible": calibration.feasible,
        "budget_gflops": calibration.budget_gflops,
        "target_acc": calibration.target_acc,
        "fraction": calibration.fraction,
        "seed": calibration.seed,
        "baseline_top1": baseline_top1,
        "calibration": calibration.calibration,
        "heldout": calibration.heldout,
    }


def curve_metrics(curve: Curve | StagedCurve | None) -> dict[str, Any] | None:
    if curve is None:
        return None
    if isinstance(curve, StagedCurve):
        return {
            "rule": "dvt",
            "q": [round(x, 6) for x in curve.q.tolist()],
            "thresholds": [_thresholds(row) for row in curve.thresholds.tolist()],
            "top1": curve.top1.tolist(),
            "top5": None if curve.top5 is None else curve.top5.tolist(),
            "exit_fractions": curve.exit_fractions.tolist(),
            "gflops": curve.gflops.tolist(),
            "count": curve.count,
        }
    return {
        "eta": [round(x, 6) for x in curve.eta.tolist()],
        "top1": curve.top1.tolist(),
        "top5": None if curve.top5 is None else curve.top5.tolist(),
        "exit_fraction": curve.exit_fraction.tolist(),
        "gflops": curve.gflops.tolist(),
        "count": curve.count,
    }


def throughput_metrics(throughput: Throughput | None) -> dict[str, Any] | None:
    if throughput is None:
        return None
    staged = not isinstance(throughput.eta, float)
    result = {
        "device": throughput.device,
        "batch_size": throughput.batch_size,
        "repeats": throughput.repeats,
        "warmup": throughput.warmup,
        "precision": throughput.precision,
        "compiled": throughput.compiled,
        "eta": None if staged else round(throughput.eta, 6),
        "exit_fraction": throughput.exit_fraction,
        "dynamic": {
            "images_per_second": throughput.dynamic_images_per_second,
            "seconds_per_batch": throughput.batch_size / throughput.dynamic_images_per_second,
        },
        "full_resolution": {
            "images_per_second": throughput.full_images_per_second,
            "seconds_per_batch": throughput.batch_size / throughput.full_images_per_second,
        },
        "speedup": throughput.speedup,
    }
    if staged:  # three or more stages: one threshold per exit
        result.update(thresholds=_thresholds(throughput.eta), exit_fractions=throughput.exit_fractions)
    return result


def write_metrics(metrics: dict[str, Any], path: str | Path) -> Path:
    """Write ``metrics`` as JSON atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates the file private; give it the usual permissions
        with os.fdopen(fd, "w") as f:
            json.dump(metrics, f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _threshold_text(thresholds: list[float | None]) -> str:
    return "thresholds " + "/".join("none" if t is None else f"{t:.3g}" for t in thresholds)


def format_table(metrics: dict[str, Any]) -> str:
    """The terminal summary of ``metrics``."""
    model, data = metrics["model"], metrics["data"]
    lines = []
    weights = "RANDOM WEIGHTS (no checkpoint)" if model["random_weights"] else model["checkpoint"]
    lines.append(f"{model['recipe']}: {weights}")
    lines.append(
        f"data: split {data['split']!r}, {data['count']} images, batch {data['batch_size']}, device {metrics['device']}"
    )
    lines.append(f"GFLOPs per image, {FLOPS_CONVENTION}; accuracies in % of images")
    staged = model["stages"] > 2
    rows: list[tuple[str, ...]] = [("", "top-1", "top-5", "exits" if staged else "exit@1", "GFLOPs", "images")]
    for stage in metrics["stages"]:
        rows.append(
            (stage["name"], _pct(stage["top1"]), _pct(stage["top5"]), "-", _num(stage["gflops"]), str(data["count"]))
        )

    def point_row(name: str, point: dict[str, Any]) -> tuple[str, ...]:
        exits = point.get("exit_fractions")
        return (
            name,
            _pct(point["top1"]),
            _pct(point["top5"]),
            "/".join(_pct(f) for f in exits) if exits is not None else _pct(point["exit_fraction"]),
            _num(point["gflops"]),
            str(point["count"]),
        )

    if metrics["dynamic"] is not None:
        what = _threshold_text(metrics["dynamic"]["thresholds"]) if staged else f"eta={metrics['dynamic']['eta']:g}"
        rows.append(point_row(f"dynamic, recipe {what}", metrics["dynamic"]))
    calibration = metrics["calibration"]
    if calibration is not None and calibration["mode"] != "recipe":
        goal = (
            f"budget {calibration['budget_gflops']:g} GFLOPs"
            if calibration["mode"] == "budget"
            else f"target {100 * calibration['target_acc']:.2f}%"
        )
        missed = "" if calibration["feasible"] else " NOT MET"
        eta = _threshold_text(calibration["thresholds"]) if staged else f"eta={calibration['eta']:g}"
        rows.append(point_row(f"calibrated {eta} ({goal}{missed}), calibration", calibration["calibration"]))
        rows.append(point_row(f"calibrated {eta}, held-out", calibration["heldout"]))
    baseline = metrics["baseline"]
    if baseline is not None:
        rows.append(
            (
                f"baseline {baseline['recipe']}",
                _pct(baseline["top1"]),
                _pct(baseline["top5"]),
                _pct(baseline["exit_fraction"]),
                _num(baseline["gflops"]),
                str(baseline["count"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]))
    throughput = metrics["throughput"]
    if throughput is not None:
        lines.append(
            f"throughput ({throughput['device']}, batch {throughput['batch_size']}, {throughput['precision']}, "
            + ("compiled, " if throughput.get("compiled") else "")
            + f"median of {throughput['repeats']} after {throughput['warmup']} warm-up): "
            + (
                f"dynamic {_threshold_text(throughput['thresholds'])} "
                if staged
                else f"dynamic eta={throughput['eta']:g} "
            )
            + f"{throughput['dynamic']['images_per_second']:.1f} img/s "
            f"({'before the last stage' if staged else 'exit@1'} {_pct(throughput['exit_fraction'])}), "
            "plain backbone same weights "
            f"{throughput['full_resolution']['images_per_second']:.1f} img/s, ratio {throughput['speedup']:.2f}x"
        )
    for warning in metrics["warnings"]:
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)
