"""Latency table: LF-ViT's cascade against the timm backbone, eager, compiled and on onnxruntime, per image.

For every batch size, in one process and one set of alternating rounds:
the timm forward (``pipe.backbone.model``) and LF-ViT at 0% and 100%
exit, each three ways:

- eager: ``model(images)`` and ``pipe.infer(images, threshold)``;
- compiled: ``torch.compile`` of the timm model, and ``pipe.compile()``
  (the two static-shape stage graphs of :mod:`dynvit.cascade`);
- onnxruntime: the timm model exported whole, and :class:`dynvit.export.OnnxCascade`.

Next to them, on every path, **the backbone alone on LF-ViT's token counts**:
the same timm model (same weights, position table resampled) on an image
whose patch grid holds exactly as many tokens as each stage encodes (stage 1:
the 7 x 7 grid of the half-size image; stage 2: its selected plus reused
tokens, e.g. 115 = 5 x 23 patches for m = 5). That is the arithmetic LF-ViT
cannot avoid, with none of its own work (downsampling, class attention,
selection, gathers, fusion): its speedup is the most any implementation of
the cascade on that path can reach, and LF-ViT's share of it is what the
implementation loses.

Exits are forced by the threshold (-inf: every sample exits after stage 1,
+inf: none does), which for 0% and 100% is what ``benchmarks/ratios.py``
forces too, and works the same on every path. Per-image latency is the
batch time over the batch size; p50 and p90 are over the timed rounds.
"Speedup" is the backbone's median time over LF-ViT's on the same path
(the median of per-round ratios), next to what the counted FLOPs predict::

    python benchmarks/latency.py                          # LF-ViT m=5 on DeiT-S, CPU, 1 thread, batch 1, 8, 64
    python benchmarks/latency.py --tiny                   # the quickstart model: a smoke run
    python benchmarks/latency.py --device cuda --batches 1 64 1024 --dtype bf16 --paths eager compiled
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from dynvit.cascade import CompiledCascade
from dynvit.flops import CONVENTION, FlopsReport, count_flops, gflops_per_image
from dynvit.pipeline import DynamicPipeline

sys.path.insert(0, str(Path(__file__).parent))
from ratios import DTYPES, Bench, build, device_name, markdown_table  # noqa: E402

PATHS = ("eager", "compiled", "onnx")
# forced exit fraction -> the threshold that forces it on every path (exit when score >= threshold)
FORCING = {0.0: math.inf, 1.0: -math.inf}


def onnx_backbone(
    model: torch.nn.Module, size: tuple[int, int], folder: Path, threads: int | None, name: str = "backbone"
) -> Callable:
    """The timm model exported whole (dynamic batch) and run by onnxruntime: images -> logits."""
    import onnxruntime as ort

    batch = torch.export.Dim("batch", min=1, max=65536)
    example = torch.randn(2, 3, *size)
    with torch.no_grad():
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=["images"], dynamic_shapes={"x": {0: batch}}, verbose=False
        )
    path = folder / f"{name}.onnx"
    program.save(str(path))
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda images: session.run(None, {input_name: images.numpy()})[0]


def token_grid(tokens: int) -> tuple[int, int]:
    """A patch grid (rows, columns) holding ``tokens`` patches, as square as the count allows."""
    rows = max(r for r in range(1, math.isqrt(tokens) + 1) if tokens % r == 0)
    return rows, tokens // rows


def token_matched_sizes(pipe: DynamicPipeline) -> list[tuple[int, int]]:
    """Per stage, the image size whose patch grid holds as many tokens as that stage encodes."""
    model = pipe.backbone.model
    patch = model.patch_embed.patch_size
    grids = [token_grid(pipe.stage_length(i) - model.num_prefix_tokens) for i in range(pipe.num_stages)]
    return [(rows * patch[0], cols * patch[1]) for rows, cols in grids]


def token_matched_backbones(pipe: DynamicPipeline) -> list[tuple[torch.nn.Module, tuple[int, int]]]:
    """The timm backbone resized to each stage's token count: (model, image size) per stage, same weights."""
    out = []
    for size in token_matched_sizes(pipe):
        resized = copy.deepcopy(pipe.backbone.model)  # same weights; timm resamples the position table
        resized.set_input_size(img_size=size)
        out.append((resized.eval(), size))
    return out


@dataclass
class RunPath:
    """One way of running: the timm backbone, LF-ViT's cascade, and the backbone at each stage's token count."""

    backbone: Callable
    infer: Callable
    token_matched: list[Callable]


def build_paths(
    pipe: DynamicPipeline,
    matched: Sequence[tuple[torch.nn.Module, tuple[int, int]]],
    paths: Sequence[str],
    folder: Path,
    threads: int | None,
) -> dict[str, RunPath]:
    """Every path set up once for every batch size; ``matched`` from :func:`token_matched_backbones`."""
    model = pipe.backbone.model
    out: dict[str, RunPath] = {}
    if "eager" in paths:
        out["eager"] = RunPath(model, pipe.infer, [m for m, _ in matched])
    if "compiled" in paths:
        cascade = CompiledCascade(pipe)  # on CUDA: CUDA graphs of each static shape (mode reduce-overhead)
        device = next(model.parameters()).device
        like = [cascade.compile_like(m, device) for m, _ in matched]
        out["compiled"] = RunPath(cascade.compile_like(model, device), cascade.infer, like)
    if "onnx" in paths:
        from dynvit.export import OnnxCascade, export_onnx

        started = time.perf_counter()
        report = export_onnx(pipe, folder / "lfvit")
        worst = max(report.max_diff.values())
        seconds = time.perf_counter() - started
        print(f"exported LF-ViT in {seconds:.0f} s; onnxruntime vs torch, largest difference {worst:.1e}")
        out["onnx"] = RunPath(
            onnx_backbone(model, (pipe.image_size, pipe.image_size), folder, threads),
            OnnxCascade(folder / "lfvit", threads).infer,
            [onnx_backbone(m, size, folder, threads, f"stage{i + 1}_tokens") for i, (m, size) in enumerate(matched)],
        )
    return out


def measure(
    pipe: DynamicPipeline, paths: dict[str, RunPath], batch: int, bench: Bench, fractions: Sequence[float]
) -> dict[str, list[float]]:
    """Alternating rounds of every path's models at each forced fraction; seconds per batch.

    ``path/tokens@f``: the backbone on the token counts of the stages an image runs at exit fraction f
    (stage 1 alone at 100%, stage 1 then stage 2 at 0%).
    """
    generator = torch.Generator().manual_seed(batch)
    size = pipe.image_size
    images = torch.randn(batch, 3, size, size, generator=generator).to(bench.device)
    matched_images = [
        torch.randn(batch, 3, *shape, generator=generator).to(bench.device) for shape in token_matched_sizes(pipe)
    ]
    fns: dict[str, Callable[[], object]] = {}
    for path, run in paths.items():
        fns[f"{path}/backbone"] = bench.autocasted(lambda run=run: run.backbone(images))
        for f in fractions:
            fns[f"{path}/LF-ViT@{f}"] = bench.autocasted(lambda run=run, f=f: run.infer(images, FORCING[f]))
            stages = 1 if f == 1.0 else len(run.token_matched)
            pairs = list(zip(run.token_matched[:stages], matched_images[:stages]))
            fns[f"{path}/tokens@{f}"] = bench.autocasted(lambda pairs=pairs: [m(x) for m, x in pairs])
    with torch.inference_mode():
        for name, fn in fns.items():  # the first call compiles; check the forced exits while at it
            started = time.perf_counter()
            result = fn()
            if "LF-ViT@" in name:
                exited = float((result.exit_stage == 1).float().mean())
                wanted = float(name.rsplit("@", 1)[1])
                if exited != wanted:
                    raise RuntimeError(f"{name}: forcing {wanted:.0%} exit gave {exited:.0%}")
            print(f"  batch {batch}: first call of {name} {time.perf_counter() - started:.1f} s", file=sys.stderr)
        return bench.rounds(fns)


def token_matched_gflops(matched: Sequence[tuple[torch.nn.Module, tuple[int, int]]]) -> list[float]:
    """GFLOPs per image of each :func:`token_matched_backbones` model (same convention as :func:`count_flops`)."""
    out = []
    with torch.no_grad():
        for model, size in matched:
            device = next(model.parameters()).device
            out.append(gflops_per_image(lambda: model(torch.randn(1, 3, *size, device=device)), 1))  # noqa: B023
    return out


def rows_for(
    times: dict[str, list[float]],
    batch: int,
    paths: Sequence[str],
    fractions: Sequence[float],
    flops: FlopsReport,
    matched_gflops: Sequence[float],
) -> list[dict[str, str]]:
    """One row per path and model: per-image p50/p90, the speedup on the same path and what FLOPs predict.

    LF-ViT rows also give their time as a share of the backbone's on the same token counts ("of tokens only").
    """

    def per_image_ms(seconds: list[float], q: float) -> str:
        return f"{1e3 * statistics.quantiles(seconds, n=10, method='inclusive')[int(q * 10) - 1] / batch:.2f}"

    rows = []
    for path in paths:
        backbone = times[f"{path}/backbone"]
        eager = times["eager/backbone"] if "eager" in paths else None
        entries = [("timm backbone", None, backbone)]
        for f in fractions:
            entries.append((f"LF-ViT {100 * f:.0f}% exit", f, times[f"{path}/LF-ViT@{f}"]))
            stages = "stage 1" if f == 1.0 else "stages 1+2"
            entries.append((f"backbone on {stages}' tokens", f, times[f"{path}/tokens@{f}"]))
        for label, f, seconds in entries:
            row = {
                "batch": str(batch),
                "path": path,
                "model": label,
                "p50 ms/img": per_image_ms(seconds, 0.5),
                "p90 ms/img": per_image_ms(seconds, 0.9),
                "speedup (same path)": "",
                "FLOPs speedup": "",
                "measured / FLOPs": "",
                "of tokens only": "",
                "vs eager backbone": "",
            }
            if eager is not None:
                row["vs eager backbone"] = f"{statistics.median(eager) / statistics.median(seconds):.2f}x"
            if f is not None:
                measured = statistics.median(b / s for b, s in zip(backbone, seconds))
                if label.startswith("LF-ViT"):
                    predicted = flops.full_resolution / flops.expected(f)
                    matched = times[f"{path}/tokens@{f}"]
                    row["of tokens only"] = f"{100 * statistics.median(m / s for m, s in zip(matched, seconds)):.0f}%"
                else:
                    predicted = flops.full_resolution / sum(matched_gflops[: 1 if f == 1.0 else None])
                row["speedup (same path)"] = f"{measured:.2f}x"
                row["FLOPs speedup"] = f"{predicted:.2f}x"
                row["measured / FLOPs"] = f"{100 * measured / predicted:.0f}%"
            rows.append(row)
    return rows


def fixed_cost_rows(times_by_batch: dict[int, dict[str, list[float]]], names: Sequence[str]) -> list[dict[str, str]]:
    """Least-squares fit of the median batch time to a + b x batch: a is what every call pays, b every image."""
    batches = sorted(times_by_batch)
    rows = []
    for name in names:
        ys = [1e3 * statistics.median(times_by_batch[b][name]) for b in batches]
        mean_x, mean_y = statistics.fmean(batches), statistics.fmean(ys)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(batches, ys)) / sum((x - mean_x) ** 2 for x in batches)
        row = {"path / model": name, **{f"batch {b} ms/img": f"{y / b:.2f}" for b, y in zip(batches, ys)}}
        row.update({"per call ms (a)": f"{mean_y - slope * mean_x:.2f}", "per image ms (b)": f"{slope:.2f}"})
        rows.append(row)
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=None, help="preset or RECIPE[:key=value,...] (default lfvit-m5)")
    parser.add_argument("--tiny", action="store_true", help="the quickstart-sized LF-ViT (tiny-m3): a smoke run")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast dtype (eager and compiled)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--exit-fractions", nargs="+", type=float, choices=sorted(FORCING), default=sorted(FORCING))
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime CPU threads (0: their choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time (1 thread)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 21 at batch 1, fewer above)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fixed-cost",
        action="store_true",
        help="instead of the table: fit batch time = a + b x batch for the backbone and LF-ViT at 100%% exit\n"
        "(stage 1 alone) over --batches (default 1 2 4 8): a is the cost every call pays whatever the batch",
    )
    args = parser.parse_args(argv)
    if args.fixed_cost:
        args.exit_fractions = [1.0]
        args.batches = args.batches if argv_has(argv, "--batches") else [1, 2, 4, 8]
    if args.recipe is None:
        args.recipe = "tiny-m3" if args.tiny else "lfvit-m5"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device; use --device cpu")
    if "onnx" in args.paths and (args.device != "cpu" or args.dtype != "fp32"):
        parser.error("the onnx path runs fp32 on the CPU; drop it with --paths eager compiled")
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        parser.error("--clock cpu measures single-threaded CPU work: use it with --device cpu --threads 1")
    if min(args.batches) < 1:
        parser.error("batch sizes must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(args.seed)
    pipe = build(args.recipe, device)
    flops = count_flops(pipe)
    print(f"# dynvit latency, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    versions = f"torch {torch.__version__}, timm {timm.__version__}"
    print(f"device: {device.type} ({device_name(device)}); dtype {args.dtype}; {versions}")
    if "onnx" in args.paths:
        import onnxruntime

        print(f"onnxruntime {onnxruntime.__version__}, {args.threads or 'default'} intra-op threads")
    print(
        f"recipe {args.recipe}: {pipe.image_size}px, stage-2 tokens {pipe.stage2_length}; GFLOPs/img ({CONVENTION}): "
        f"backbone {flops.full_resolution:.3f}, stage 1 {flops.stage1:.3f}, stage 2 {flops.stage2:.3f}"
    )
    matched_models = token_matched_backbones(pipe)
    matched = token_matched_gflops(matched_models)
    shapes = ", ".join(
        f"stage {i + 1}: {pipe.stage_length(i)} tokens = {h}x{w} px, {g:.3f} GFLOPs"
        for i, ((h, w), g) in enumerate(zip(token_matched_sizes(pipe), matched))
    )
    print(f"the backbone alone on each stage's token count: {shapes}")
    print(
        f"timing: {'process CPU time' if args.clock == 'cpu' else 'wall clock'}, alternating rounds after "
        f"{args.warmup} warm-up; random weights; exits forced by the threshold"
    )
    print(f"command: {' '.join(['python', *sys.argv])}")
    rows, times_by_batch = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_paths(pipe, matched_models, args.paths, Path(tmp), args.threads or None)
        for batch in args.batches:
            repeats = args.repeats or max(5, 21 if batch == 1 else round(88 / batch))
            bench = Bench(device, DTYPES[args.dtype], args.warmup, repeats, clock)
            times = times_by_batch[batch] = measure(pipe, paths, batch, bench, args.exit_fractions)
            batch_rows = rows_for(times, batch, list(paths), args.exit_fractions, flops, matched)
            print(f"\n### batch {batch}, {repeats} rounds\n")
            print(markdown_table(batch_rows))
            rows += batch_rows
    if args.fixed_cost:
        weights = torch.cat([p.detach().flatten() for p in pipe.backbone.model.parameters()])
        bench = Bench(device, torch.float32, args.warmup, 21, clock)
        read = statistics.median(bench.rounds({"read": lambda: weights.sum()})["read"])
        print(
            f"\nthe backbone's weights: {weights.numel() * 4 / 2**20:.1f} MiB; reading them once "
            f"(a sum over a copy of them, median of 21): {1e3 * read:.2f} ms"
        )
        names = [f"{path}/{model}" for path in paths for model in ("backbone", "LF-ViT@1.0", "tokens@1.0")]
        print(
            "\n### batch time = a + b x batch (least squares over the medians); LF-ViT@1.0 is stage 1 alone, "
            "tokens@1.0 the backbone alone on stage 1's tokens\n"
        )
        print(markdown_table(fixed_cost_rows(times_by_batch, names)))
    else:
        print("\n### all batches\n")
        print(markdown_table(rows))
    return 0


def argv_has(argv: Sequence[str] | None, option: str) -> bool:
    return option in (sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
