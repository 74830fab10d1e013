"""Wall-clock throughput of the dynamic path against the plain backbone with the same weights.

Both are timed in the same run on the same batch, alternating so that
neither always runs first (clock boosts and caches favour no one), with
warm-up rounds excluded and the device synchronised around every timed call.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dynvit.pipeline import DynamicPipeline


@dataclass
class Throughput:
    """Timings of one batch, repeated; images per second from the median batch time."""

    device: str
    batch_size: int
    repeats: int
    warmup: int
    eta: float | list[float]  # the threshold, or one per exit (three or more stages)
    exit_fraction: float  # fraction of the timed batch that stops before the last stage (two stages: after stage 1)
    precision: str  # "float32", or the autocast dtype
    dynamic_seconds: list[float]  # per timed batch, pipe.infer
    full_seconds: list[float]  # per timed batch, pipe.run_full_resolution
    compiled: bool = False  # both sides under torch.compile (pipe.compile())
    exit_fractions: list[float] | None = None  # fraction of the timed batch that stops at each exit

    @property
    def dynamic_images_per_second(self) -> float:
        return self.batch_size / statistics.median(self.dynamic_seconds)

    @property
    def full_images_per_second(self) -> float:
        return self.batch_size / statistics.median(self.full_seconds)

    @property
    def speedup(self) -> float:
        """Dynamic over plain throughput (> 1: the dynamic path is faster)."""
        return self.dynamic_images_per_second / self.full_images_per_second


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for ``device``'s queued work: a timer that skips it times the launch, not the work.

    CUDA is synchronised by device: a bare ``torch.cuda.synchronize()`` waits for the *current* device,
    which is not the one the images are on when they are on ``cuda:1`` and the current device is ``cuda:0``.
    """
    if device.type == "cuda":
        return functools.partial(torch.cuda.synchronize, device)
    return lambda: None


def _bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` itself (not the current CUDA device) computes in bfloat16."""
    if device.type != "cuda":
        return True
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported()


def _autocast(device: torch.device, enabled: bool) -> tuple[contextlib.AbstractContextManager, str]:
    if not enabled:
        return contextlib.nullcontext(), "float32"
    half = not _bf16_supported(device)
    dtype = torch.float16 if half else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype), str(dtype).removeprefix("torch.")


def measure_throughput(
    pipe: DynamicPipeline,
    images: Tensor,
    eta: float | Sequence[float],
    repeats: int = 10,
    warmup: int = 3,
    amp: bool = False,
) -> Throughput:
    """Time ``pipe.infer(images, eta)`` and ``pipe.run_full_resolution(images)`` on ``images``' device.

    For a compiled pipeline (:meth:`DynamicPipeline.compile`) the full-resolution forward is compiled too;
    the first (warm-up) calls pay for compilation.
    """
    if pipe.num_stages < 2:
        raise ValueError("throughput compares the dynamic path with the plain backbone; this is a one-stage model")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = images.device
    sync = synchronizer(device)
    autocast, precision = _autocast(device, amp)
    was_training = pipe.training
    pipe.eval()

    def timed(fn: Callable[[], object]) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    # a compiled pipeline is compared with the compiled backbone: the same compiler on both sides
    cascade = pipe.compiled_cascade
    full = cascade.compile_like(pipe.run_full_resolution, device) if cascade else pipe.run_full_resolution
    runs = {
        "dynamic": lambda: pipe.infer(images, threshold=eta),
        "full": lambda: full(images),
    }
    seconds: dict[str, list[float]] = {"dynamic": [], "full": []}
    try:
        with torch.inference_mode(), autocast:
            exit_stage = pipe.infer(images, threshold=eta).exit_stage
            exit_fractions = [float((exit_stage == k).float().mean()) for k in range(1, pipe.num_stages)]
            for round_ in range(warmup + repeats):
                order = ("dynamic", "full") if round_ % 2 == 0 else ("full", "dynamic")
                for name in order:
                    elapsed = timed(runs[name])
                    if round_ >= warmup:
                        seconds[name].append(elapsed)
    finally:
        pipe.train(was_training)
    return Throughput(
        device=str(device),
        batch_size=int(images.shape[0]),
        repeats=repeats,
        warmup=warmup,
        eta=float(eta) if isinstance(eta, (int, float)) else [float(t) for t in eta],
        exit_fraction=sum(exit_fractions),
        precision=precision,
        dynamic_seconds=seconds["dynamic"],
        full_seconds=seconds["full"],
        compiled=pipe.compiled,
        exit_fractions=exit_fractions,
    )
