"""Ratio tables: LF-ViT's dynamic inference against the plain timm backbone with the same weights.

Prints four tables, each measured in one process with both models sharing
one set of weights and one input batch:

1. throughput of ``pipe.infer`` at forced exit fractions vs the timm
   forward (``pipe.backbone.model(images)``), with the speedup the counted
   FLOPs predict and the share of it the implementation turns into speed;
2. overhead: the time of everything that is not a backbone block, as a
   share of an LF-ViT inference;
3. peak memory of inference and of a training step;
4. training-step throughput (both stages, loss, backward, AdamW step).

Timings alternate between the models round by round, exclude warm-up and
synchronise the device around every call. The exit pattern is forced by
:class:`ExitFraction` so the figures do not depend on trained weights
(weights are random: speed does not depend on their values)::

    python benchmarks/ratios.py --tiny                    # about a minute on a laptop CPU
    python benchmarks/ratios.py                           # DeiT-S LF-ViT m=4,5,6 and LF-ViT*, CPU
    python benchmarks/ratios.py --device cuda             # batch 1024, bf16 autocast, as in the paper
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynvit.flops import CONVENTION, FlopsReport, count_flops
from dynvit.pipeline import DynamicPipeline, build_pipeline
from dynvit.recipe import load_recipe
from dynvit.stages import ExitPolicy

# name -> (recipe, overrides)
PRESETS: dict[str, tuple[str, list[str]]] = {
    "lfvit-m4": ("lfvit_deit_s", ["model.selector.region=4"]),
    "lfvit-m5": ("lfvit_deit_s", ["model.selector.region=5"]),
    "lfvit-m6": ("lfvit_deit_s", ["model.selector.region=6"]),
    "lfvit-star": ("lfvit_star_deit_s", []),
    "cfvit": ("cfvit_deit_s", []),
    "dvt": ("dvt_deit_s", []),
    # token reduction: in LF-ViT's stage 2, and in the plain DeiT-S (one stage: the 100% column only)
    "lfvit-evit": ("lfvit_evit_deit_s", []),
    "lfvit-tome": ("lfvit_tome_deit_s", []),
    "deit-evit": ("deit_s", ["model.reduction.type=evit"]),
    "deit-tome": ("deit_s", ["model.reduction.type=tome", "model.reduction.r=13"]),
    # the quickstart LF-ViT (64 px, patch 8, width 64): a smoke run of every table
    "tiny-m2": ("quickstart", ["model.selector.region=2", "model.selector.alpha=0.75"]),
    "tiny-m3": ("quickstart", ["model.selector.region=3", "model.selector.alpha=0.88"]),
}
DEFAULT_RECIPES = ["lfvit-m4", "lfvit-m5", "lfvit-m6", "lfvit-star"]
TINY_RECIPES = ["tiny-m2", "tiny-m3"]
# the paper's operating point (m = 5, eta = 0.47) lets about 80% of the images exit after stage 1
DEFAULT_FRACTIONS = [0.0, 0.3, 0.5, 0.7, 0.8, 1.0]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TABLES = ("throughput", "overhead", "memory", "train")


# -- forcing the exit pattern ---------------------------------------------------------------------------------------


class ExitFraction(ExitPolicy):
    """Exit the ``fraction`` most confident samples of every batch (a per-batch confidence threshold).

    Costs what the confidence policy costs (a softmax and a max) plus one
    top-k, and picks realistic, scattered exits, so the compaction gather
    does the same work it does with a trained model.
    """

    def __init__(self, fraction: float) -> None:
        super().__init__()
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"exit fraction must be in [0, 1], got {fraction}")
        self.fraction = fraction
        self.threshold = float("nan")  # no fixed threshold: it is chosen per batch

    def score(self, logits: Tensor) -> Tensor:
        return logits.float().softmax(dim=-1).amax(dim=-1)

    def forward(self, logits: Tensor, threshold: float | None = None) -> Tensor:
        confidence = self.score(logits)
        exits = torch.zeros_like(confidence, dtype=torch.bool)
        count = round(self.fraction * logits.shape[0])
        if count:
            exits.scatter_(0, confidence.topk(count).indices, True)
        return exits


@functools.lru_cache
def exit_fraction(fraction: float) -> ExitFraction:
    """One policy object per fraction, so timed calls do not pay for building it."""
    return ExitFraction(fraction)


def forced_infer(pipe: DynamicPipeline, images: Tensor, fraction: float) -> object:
    """``pipe.infer(images)`` with ``fraction`` of the batch exiting after stage 1."""
    with forced_exit(pipe, fraction):
        return pipe.infer(images)


@contextlib.contextmanager
def forced_exit(pipe: DynamicPipeline, fraction: float) -> Iterator[None]:
    """Swap every exit policy for :class:`ExitFraction` for the duration of the block: ``fraction`` of the
    samples reaching each exit stop there (with three stages, f exit at the first and f(1 - f) at the second)."""
    exits = [stage for stage in pipe.stages if stage.exit_policy is not None]
    originals = [stage.exit_policy for stage in exits]
    for stage in exits:
        stage.exit_policy = exit_fraction(fraction)
    try:
        yield
    finally:
        for stage, original in zip(exits, originals):
            stage.exit_policy = original


def expected_gflops(flops: FlopsReport, fraction: float) -> float:
    """The expected cost when ``fraction`` of the samples reaching each exit stop there (see forced_exit)."""
    exits = len(flops.stages) - 1
    if exits <= 1:  # one stage: its own cost whatever the fraction
        return flops.expected(fraction)
    return flops.expected([fraction * (1 - fraction) ** k for k in range(exits)])


# -- timing helpers -----------------------------------------------------------------------------------------------


@dataclass
class Bench:
    """Where and how everything runs."""

    device: torch.device
    dtype: torch.dtype
    warmup: int
    repeats: int
    # wall clock, or the process's CPU time: on a shared CPU with one torch thread the latter counts only the
    # work itself, not the time other processes hold the cores
    clock: Callable[[], float] = time.perf_counter

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def autocasted(self, fn: Callable[[], object]) -> Callable[[], object]:
        """``fn`` run under :meth:`autocast` (forward passes only: backward runs outside autocast)."""

        def run() -> object:
            with self.autocast():
                return fn()

        return run

    def time(self, fn: Callable[[], object]) -> float:
        """Seconds one call takes, the device synchronised before and after."""
        self.sync()
        start = self.clock()
        fn()
        self.sync()
        return self.clock() - start

    def rounds(self, fns: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
        """Time every function once per round, alternating (order reversed every other round); warm-up dropped."""
        times: dict[str, list[float]] = {name: [] for name in fns}
        names = list(fns)
        for round_index in range(self.warmup + self.repeats):
            order = names if round_index % 2 == 0 else names[::-1]
            for name in order:
                seconds = self.time(fns[name])
                if round_index >= self.warmup:
                    times[name].append(seconds)
        return times


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of a per-round ratio: drift common to both cancels."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


# -- measurements ---------------------------------------------------------------------------------------------------


class BlockInputs:
    """Records the token sequences that enter ``model.blocks`` (a forward pre-hook), to time the blocks alone."""

    def __init__(self, blocks: nn.Module) -> None:
        self.blocks = blocks
        self.inputs: list[Tensor] = []
        self._handle = None

    def __enter__(self) -> BlockInputs:
        self.inputs = []
        self._handle = self.blocks.register_forward_pre_hook(lambda module, args: self.inputs.append(args[0].clone()))
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def run_all(self) -> None:
        for tokens in self.inputs:
            self.blocks(tokens)


def peak_memory(fn: Callable[[], object], bench: Bench) -> float | None:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before (weights, inputs, optimiser state).

    CUDA: the caching allocator's ``max_memory_allocated``. CPU: the
    running sum of the allocations and frees torch's profiler records
    (``profile_memory=True``), in time order. None if neither is available.
    """
    if bench.device.type == "cuda":
        bench.sync()
        torch.cuda.reset_peak_memory_stats(bench.device)
        base = torch.cuda.memory_allocated(bench.device)
        fn()
        bench.sync()
        return torch.cuda.max_memory_allocated(bench.device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def measure_inference(
    pipe: DynamicPipeline,
    images: Tensor,
    fractions: Sequence[float],
    overhead_fractions: Sequence[float],
    bench: Bench,
    memory: bool,
) -> dict[str, object]:
    """Inference times (and peak memory) of LF-ViT at forced exit fractions and of the timm forward.

    One set of alternating rounds times the timm forward, ``pipe.infer`` at
    every fraction, and, for the overhead, the backbone blocks alone on the
    very token sequences each inference fed them (recorded once by a
    pre-hook on ``model.blocks``). Inference minus its blocks is everything
    else: downsampling, patch embedding, class-attention rows and GCA,
    NGCA, top-k, gathers, fusion, reuse, compaction, final norm and head.
    """
    model = pipe.full_resolution_backbone.model
    pipe.eval()
    fns: dict[str, Callable[[], object]] = {"backbone": bench.autocasted(lambda: model(images))}
    with torch.no_grad():
        for f in sorted({*fractions, *overhead_fractions}):
            infer = fns[f"infer@{f}"] = bench.autocasted(lambda f=f: forced_infer(pipe, images, f))
            with BlockInputs(model.blocks) as blocks:
                exited = (infer().exit_stage == 1).float().mean().item()
            if abs(exited - f) > 1.0 / images.shape[0]:
                raise RuntimeError(f"forcing exit fraction {f} gave {exited}; the pipeline ignored its exit policy")
            if f in overhead_fractions:
                fns[f"blocks@{f}"] = bench.autocasted(blocks.run_all)
        if overhead_fractions:
            with BlockInputs(model.blocks) as blocks:
                fns["backbone"]()
            fns["backbone blocks"] = bench.autocasted(blocks.run_all)
        times: dict[str, object] = dict(bench.rounds(fns))
        if memory:
            times["memory"] = {
                "LF-ViT 0%": peak_memory(bench.autocasted(lambda: forced_infer(pipe, images, 0.0)), bench),
                "LF-ViT 80%": peak_memory(bench.autocasted(lambda: forced_infer(pipe, images, 0.8)), bench),
                "backbone": peak_memory(fns["backbone"], bench),
            }
    return times


def throughput_rows(times: dict, fractions: Sequence[float], batch: int, flops: FlopsReport) -> list[dict]:
    """img/s, measured and FLOPs-predicted speedup over the timm forward, and the share of the prediction achieved."""
    backbone = times["backbone"]
    rows = []
    for f in fractions:
        infer = times[f"infer@{f}"]
        measured = median_ratio(backbone, infer)
        predicted = flops.full_resolution / expected_gflops(flops, f)
        rows.append(
            {
                "exit %": f"{100 * f:.0f}",
                "GFLOPs/img": f"{expected_gflops(flops, f):.2f}",
                "pipeline img/s": f"{batch / statistics.median(infer):.1f}",
                "backbone img/s": f"{batch / statistics.median(backbone):.1f}",
                "measured speedup": f"{measured:.2f}x",
                "FLOPs speedup": f"{predicted:.2f}x",
                "measured / FLOPs": f"{100 * measured / predicted:.0f}%",
            }
        )
    return rows


def overhead_rows(times: dict, fractions: Sequence[float]) -> list[dict]:
    """Time outside the backbone blocks, as a share of the inference; the timm forward's own share for scale."""
    backbone_share = 1 - median_ratio(times["backbone blocks"], times["backbone"])
    rows = []
    for f in fractions:
        total, blocks = times[f"infer@{f}"], times[f"blocks@{f}"]
        rows.append(
            {
                "exit %": f"{100 * f:.0f}",
                "LF-ViT ms": f"{1e3 * statistics.median(total):.1f}",
                "blocks ms": f"{1e3 * statistics.median(blocks):.1f}",
                "other ms": f"{1e3 * (statistics.median(total) - statistics.median(blocks)):.1f}",
                "other share": f"{100 * (1 - median_ratio(blocks, total)):.1f}%",
                "timm forward non-block share": f"{100 * backbone_share:.1f}%",
            }
        )
    return rows


class TrainStep:
    """One optimisation step: forward under autocast, loss, backward, AdamW (GradScaler for fp16)."""

    def __init__(self, forward: Callable[[], Tensor], params: Sequence[nn.Parameter], bench: Bench) -> None:
        self.forward = forward
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)
        self.scaler = torch.amp.GradScaler(bench.device.type, enabled=bench.dtype == torch.float16)
        self.bench = bench

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.bench.autocast():
            loss = self.forward()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()


def train_steps(pipe: DynamicPipeline, images: Tensor, labels: Tensor, bench: Bench) -> dict[str, TrainStep]:
    """Training steps of the timm model and of LF-ViT in both training phases (call with ``pipe.train()``).

    LF-ViT's step is ``pipe(images)`` (every sample through both stages),
    its CE + KL loss, backward and AdamW over all its parameters; the
    backbone's is the timm forward, CE, backward and AdamW over its own.
    "whole image" is LF-ViT's first phase: stage 2 on every full-resolution token.
    """

    def backbone_loss() -> Tensor:
        return F.cross_entropy(pipe.backbone.model(images), labels)

    def lfvit_loss(whole_image: bool) -> Callable[[], Tensor]:
        def loss() -> Tensor:
            pipe.whole_image_stage2 = whole_image
            try:
                return pipe.compute_loss(pipe(images), labels)
            finally:
                pipe.whole_image_stage2 = False

        return loss

    return {
        "backbone": TrainStep(backbone_loss, list(pipe.backbone.model.parameters()), bench),
        "LF-ViT": TrainStep(lfvit_loss(False), list(pipe.parameters()), bench),
        "LF-ViT whole image": TrainStep(lfvit_loss(True), list(pipe.parameters()), bench),
    }


def measure_training(
    pipe: DynamicPipeline, images: Tensor, labels: Tensor, bench: Bench, timed: bool, memory: bool
) -> dict[str, object]:
    """Alternating rounds of the three :func:`train_steps` (and the peak memory of each)."""
    steps = train_steps(pipe, images, labels, bench)
    pipe.train()
    try:
        times: dict[str, object] = dict(bench.rounds(steps)) if timed else {}
        if memory:
            for step in steps.values():
                step()  # allocates the AdamW state outside the measured step
            times["memory"] = {name: peak_memory(step, bench) for name, step in steps.items()}
    finally:
        pipe.eval()
    return times


def train_rows(times: dict, batch: int) -> list[dict]:
    backbone = times["backbone"]
    return [
        {
            "backbone img/s": f"{batch / statistics.median(backbone):.1f}",
            "pipeline img/s": f"{batch / statistics.median(times['LF-ViT']):.1f}",
            "LF-ViT speedup": f"{median_ratio(backbone, times['LF-ViT']):.2f}x",
            "LF-ViT whole-image img/s": f"{batch / statistics.median(times['LF-ViT whole image']):.1f}",
            "whole-image speedup": f"{median_ratio(backbone, times['LF-ViT whole image']):.2f}x",
        }
    ]


def memory_rows(inference: dict | None, training: dict | None) -> list[dict]:
    """Peak MiB above weights, inputs and optimiser state; 'n/a' where nothing honest was measured."""

    def mib(value: float | None) -> str:
        return "n/a" if value is None else f"{value / 2**20:.0f}"

    def ratio(a: float | None, b: float | None) -> str:
        return "n/a" if a is None or not b else f"{a / b:.2f}"

    row = {}
    if inference is not None:
        m = inference["memory"]
        row.update(
            {
                "infer LF-ViT 0% exit": mib(m["LF-ViT 0%"]),
                "infer LF-ViT 80% exit": mib(m["LF-ViT 80%"]),
                "infer backbone": mib(m["backbone"]),
                "infer ratio (0% exit)": ratio(m["LF-ViT 0%"], m["backbone"]),
            }
        )
    if training is not None:
        m = training["memory"]
        row.update(
            {
                "train LF-ViT": mib(m["LF-ViT"]),
                "train LF-ViT whole image": mib(m["LF-ViT whole image"]),
                "train backbone": mib(m["backbone"]),
                "train ratio": ratio(m["LF-ViT"], m["backbone"]),
            }
        )
    return [row]


# -- output ---------------------------------------------------------------------------------------------------------


def markdown_table(rows: list[dict]) -> str:
    """A pipe table, columns padded so it reads in a terminal and pastes into markdown."""
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["| " + " | ".join(c.ljust(widths[c]) for c in columns) + " |"]
    lines.append("|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|")
    lines += ["| " + " | ".join(str(r[c]).rjust(widths[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {torch.get_num_threads()} threads"


def header(args: argparse.Namespace, device: torch.device) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# dynvit ratio tables, {now}",
        f"device: {device.type} ({device_name(device)})",
        f"batch: {args.batch} (inference), {args.train_batch} (training); dtype: {args.dtype}"
        + (" autocast" if args.dtype != "fp32" else ""),
        f"torch {torch.__version__}, timm {timm.__version__}, python {platform.python_version()}",
        f"FLOPs: {CONVENTION}, per image, counted by dynvit.flops",
        f"timing: {'process CPU time' if args.clock == 'cpu' else 'wall clock'}, median of {args.repeats} "
        f"alternating rounds after {args.warmup} warm-up, device synchronised; "
        "random weights (speed does not depend on their values); exits forced to the stated fraction "
        "(the most confident samples of each batch)",
        f"command: {' '.join([sys.argv[0], *sys.argv[1:]])}",
    ]
    if device.type == "cpu" and hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1):
        lines.append(
            f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other processes share the "
            "CPU, so timings are noisy (the ratios less so, as the models alternate); "
            "--clock cpu measures the work alone"
        )
    if device.type == "cuda":
        lines.append(
            f"tf32 matmul: {torch.backends.cuda.matmul.allow_tf32}, cudnn tf32: {torch.backends.cudnn.allow_tf32}, "
            f"cudnn.benchmark: {torch.backends.cudnn.benchmark}"
        )
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument("--batch", type=int, default=None, help="inference batch (default: 1024 cuda, 20 cpu)")
    parser.add_argument("--train-batch", type=int, default=None, help="training batch (default: 256 cuda, 4 cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 autocast on cuda, fp32 cpu")
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=None,
        help=f"presets ({', '.join(PRESETS)}) or recipe names/paths, optionally RECIPE:key=value,key=value\n"
        f"(default: {' '.join(DEFAULT_RECIPES)})",
    )
    parser.add_argument(
        "--exit-fractions",
        nargs="+",
        type=float,
        default=DEFAULT_FRACTIONS,
        help="forced exit fractions of the throughput table (0.8: about the paper's operating point)",
    )
    parser.add_argument(
        "--overhead-fractions", nargs="+", type=float, default=[0.0, 0.8], help="exit fractions of the overhead table"
    )
    parser.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES))
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 10 cuda, 3 cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: 3 cuda, 1 cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1: on a CPU shared with other work, every multi-threaded op\n"
        "waits for descheduled threads, which hits LF-ViT's many small ops hardest; 0: torch's choice)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time (default); cpu: the process's CPU time, for a shared CPU with --threads 1",
    )
    parser.add_argument("--tiny", action="store_true", help="the quickstart-sized LF-ViT, small batches: a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device; use --device cpu")
    gpu = args.device == "cuda"
    defaults = {
        "batch": 64
        if args.tiny
        else (1024 if gpu else 20),  # 20: every default exit fraction is a whole number of images
        "train_batch": 32 if args.tiny else (256 if gpu else 4),
        "dtype": "bf16" if gpu else "fp32",
        "repeats": 10 if gpu else (5 if args.tiny else 3),
        "warmup": 3 if gpu else (2 if args.tiny else 1),
        "recipes": TINY_RECIPES if args.tiny else DEFAULT_RECIPES,
        "threads": None if gpu else 1,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for f in [*args.exit_fractions, *args.overhead_fractions]:
        if not 0.0 <= f <= 1.0:
            parser.error(f"exit fractions must be in [0, 1], got {f}")
    if args.clock == "cpu" and (gpu or args.threads != 1):
        parser.error("--clock cpu measures single-threaded CPU work: use it with --device cpu --threads 1")
    if min(args.batch, args.train_batch, args.repeats) < 1 or args.warmup < 0:
        parser.error("--batch, --train-batch and --repeats must be >= 1 and --warmup >= 0")
    return args


def configure_cuda(device: torch.device) -> None:
    """TF32 matmuls and cuDNN autotuning on CUDA, as throughput benchmarks of timm models run (both models alike)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def build(spec: str, device: torch.device) -> DynamicPipeline:
    """A preset name, or ``RECIPE[:key=value,...]``, built with random weights on ``device``."""
    if spec in PRESETS:
        recipe, overrides = PRESETS[spec]
    else:
        recipe, _, rest = spec.partition(":")
        overrides = [o for o in rest.split(",") if o]
    pipe = build_pipeline(load_recipe(recipe, overrides)).to(device).eval()
    if pipe.num_stages == 1 and pipe.stages[0].reducer is None:
        raise SystemExit(f"{spec}: a one-stage recipe without token reduction is the backbone itself; pick another")
    return pipe


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # tables appear as they are measured
    device = torch.device(args.device)
    if args.threads:  # None or 0: torch's choice
        torch.set_num_threads(args.threads)
    configure_cuda(device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    bench = Bench(device, DTYPES[args.dtype], args.warmup, args.repeats, clock)
    print(header(args, device))
    for spec in args.recipes:
        torch.manual_seed(args.seed)
        pipe = build(spec, device)
        size = pipe.image_size
        generator = torch.Generator(device=device).manual_seed(args.seed)
        images = torch.randn(args.batch, 3, size, size, device=device, generator=generator)
        train_images = images[: args.train_batch] if args.train_batch <= args.batch else None
        if train_images is None:
            train_images = torch.randn(args.train_batch, 3, size, size, device=device, generator=generator)
        labels = torch.randint(pipe.backbone.num_classes, (args.train_batch,), device=device, generator=generator)
        stages = ", ".join(
            f"stage {i + 1} grid {g[0]}x{g[1]} ({pipe.stage_length(i)} tokens)" for i, g in enumerate(pipe.grids)
        )
        print(f"\n## {spec}: {size}px, {stages}")
        started = time.perf_counter()
        tables = set(args.tables)
        if pipe.num_stages != 2 and tables - {"throughput"}:
            # the overhead, memory and training tables compare one shared backbone with a two-stage pipeline
            print(f"({spec}: {pipe.num_stages} stage(s): the throughput table only)")
            tables = {"throughput"}
        fractions = args.exit_fractions if "throughput" in tables else []
        if pipe.num_stages == 1:  # no exit to force: every image leaves after its only stage
            fractions = [1.0]
        overhead_fractions = args.overhead_fractions if "overhead" in tables else []
        inference = training = None
        if tables & {"throughput", "overhead", "memory"}:
            inference = measure_inference(pipe, images, fractions, overhead_fractions, bench, "memory" in tables)
        if tables & {"train", "memory"}:
            training = measure_training(pipe, train_images, labels, bench, "train" in tables, "memory" in tables)
        if "throughput" in tables:
            print(f"\n### inference throughput, batch {args.batch}: pipe.infer vs the timm forward\n")
            print(markdown_table(throughput_rows(inference, fractions, args.batch, count_flops(pipe))))
        if "overhead" in tables:
            print(f"\n### overhead: inference time outside the backbone blocks, batch {args.batch}\n")
            print(markdown_table(overhead_rows(inference, overhead_fractions)))
        if "memory" in tables:
            source = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler memory events"
            print(
                f"\n### peak memory, MiB above weights, inputs and optimiser state ({source}); "
                f"inference batch {args.batch}, training batch {args.train_batch}\n"
            )
            print(markdown_table(memory_rows(inference, training)))
        if "train" in tables:
            print(
                f"\n### training step (forward, loss, backward, AdamW), batch {args.train_batch}; "
                "whole image = LF-ViT's first phase (stage 2 on every full-resolution token)\n"
            )
            print(markdown_table(train_rows(training, args.train_batch)))
        print(f"\n({spec} took {time.perf_counter() - started:.0f} s)")
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
