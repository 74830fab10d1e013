"""The early-exit cascade as two fixed-shape stage graphs, for ``torch.compile``, CUDA graphs and export.

:meth:`DynamicPipeline.infer` compacts the samples that go on to stage 2
with ``nonzero``, so stage 2's batch is data-dependent: a graph break for
``torch.compile`` and a new shape for every exit count. Here the cascade is
split at that point into

- :class:`Stage1Graph`: images -> stage-1 logits, exit score, the selection
  for every sample and what stage 2 reads from stage 1 (the gathered
  stage-1 tokens), one graph whose shapes depend only on the batch;
- :class:`Stage2Graph`: the stage-2 feeds of a sub-batch -> stage-2 logits;

and between them a little host code (:func:`run_cascade`) that applies the
exit decision, pads the stage-2 sub-batch to a **bucket** size with copies of
one of its own samples (so stage 2 sees a few fixed shapes), and keeps only
the real rows. Padding rows never reach a result: stage 2 is row-independent
and its output is cut to the real rows before it is scattered back.

Bucket policy: the smallest size in 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers
of two and 1.5 x powers of two) that holds the sub-batch, capped at the
batch size. At most a third of stage 2's rows are padding (none for
sub-batches of 1-4), and a batch of B compiles stage 2 at most
2 log2(B) + 1 times (12 shapes for B = 64), stage 1 once per batch size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from dynvit.pipeline import DynamicPipeline, InferenceResult, Stage2Inputs
from dynvit.stages import ExitPolicy, Selection

# stage-1 outputs that make up the Selection of the samples that go on, in Selection's field order
SELECTION_FIELDS = ("full_index", "reuse_index", "region", "kept")
# stage-2 feeds besides the images, in Stage2Graph's argument order (a recipe without a fuser or reuser omits some)
FEED_FIELDS = ("full_index", "parent", "kept_tokens", "reused")


def bucket_ladder(limit: int) -> list[int]:
    """Stage-2 batch sizes up to ``limit``: 1, 2, 3, 4, 6, 8, 12, ... and ``limit`` itself."""
    sizes, power = [], 1
    while power <= limit:
        sizes += [s for s in (power, power + power // 2) if s <= limit and s not in sizes]
        power *= 2
    return sorted({*sizes, limit})


def bucket_size(count: int, batch: int, buckets: Sequence[int] | None = None) -> int:
    """The padded stage-2 batch for ``count`` samples out of ``batch``: the smallest bucket >= count."""
    sizes = bucket_ladder(batch) if buckets is None else sorted({*(b for b in buckets if b <= batch), batch})
    return next(s for s in sizes if s >= count)


def feed_names(pipe: DynamicPipeline) -> list[str]:
    """The stage-2 feeds this pipeline's recipe uses, in :class:`Stage2Graph`'s argument order."""
    names = ["full_index"]
    if pipe.fuser is not None:
        names += ["parent", "kept_tokens"]
    if pipe.reuser is not None and pipe.selector.num_tokens(pipe.grid1, pipe.grid2, pipe.backbone.depth)[1] > 0:
        names.append("reused")
    return names


class Stage1Graph(nn.Module):
    """Stage 1 as one fixed-shape graph: images -> a tuple named by :attr:`output_names`.

    Two-stage recipes: logits, exit score, the selection of every sample and
    the stage-2 feeds gathered from stage 1; one-stage recipes: the logits
    of the plain backbone.
    """

    def __init__(self, pipe: DynamicPipeline) -> None:
        super().__init__()
        check_cascadable(pipe)
        self.pipe = pipe
        self.training = pipe.training  # this wrapper alone (train() would switch the pipeline too)
        if pipe.num_stages == 1:
            self.output_names = ["logits"]
        else:
            extra = [name for name in feed_names(pipe) if name not in SELECTION_FIELDS]
            self.output_names = ["logits", "score", *SELECTION_FIELDS, *extra]

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        pipe = self.pipe
        if pipe.num_stages == 1:
            return (pipe.run_stage(0, images).logits,)
        if pipe.whole_image_stage2:
            raise ValueError("whole_image_stage2 is a training phase; set it to False for static-shape inference")
        stage1 = pipe.run_stage1(images)
        selection = pipe.select(stage1)
        feeds = pipe.stage2_inputs(stage1, selection)
        values = {
            "logits": stage1.logits,
            "score": pipe.exit_policy.score(stage1.logits),
            **{name: getattr(selection, name) for name in SELECTION_FIELDS},
            **{name: getattr(feeds, name) for name in FEED_FIELDS if name != "full_index"},
        }
        return tuple(values[name] for name in self.output_names)


def check_cascadable(pipe: DynamicPipeline) -> None:
    """The static-shape graphs cover one whole-image stage, or LF-ViT's shape: a whole-image stage, then a
    refining stage over the same backbone without hooks. Other pipelines run eager ``infer``."""
    stages = pipe.stages
    plain = all(s.backbone is None and len(s.hooks) == 0 for s in stages)
    if pipe.num_stages == 1 and plain and stages[0].downsampler is None:
        return
    if pipe.num_stages == 2 and plain and not stages[0].refines and stages[1].refines:
        return
    raise ValueError(
        f"compiled and exported inference covers one-stage recipes and two-stage recipes whose second stage "
        f"refines over the shared backbone (LF-ViT, CF-ViT); this pipeline has {pipe.num_stages} stages"
        f"{'' if plain else ' with own backbones or hooks'}: run it with pipe.infer, uncompiled"
    )


class Stage2Graph(nn.Module):
    """Stage 2 as one fixed-shape graph: (images, *feeds named by :attr:`input_names`[1:]) -> logits."""

    def __init__(self, pipe: DynamicPipeline) -> None:
        super().__init__()
        if pipe.num_stages != 2:
            raise ValueError("a one-stage recipe has no stage 2")
        self.pipe = pipe
        self.training = pipe.training
        self.input_names = ["images", *feed_names(pipe)]

    def forward(self, images: Tensor, *feeds: Tensor) -> Tensor:
        named = dict(zip(self.input_names[1:], feeds))
        inputs = Stage2Inputs(**{name: named.get(name) for name in FEED_FIELDS})
        return self.pipe.encode_stage2(images, inputs)


def uses_plain_threshold(policy: ExitPolicy) -> bool:
    """True when the policy's decision is ``score >= threshold`` (it does not override ``forward``)."""
    return type(policy).forward is ExitPolicy.forward


def run_cascade(
    images: Tensor,
    stage1: dict[str, Tensor],
    exits: Tensor,
    stage2: Callable[..., Tensor],
    feeds: Sequence[str],
    pad_to: Callable[[int, int], int] | None = None,
) -> InferenceResult:
    """Split by ``exits``, run ``stage2`` once on the (padded) sub-batch that goes on, stitch the results.

    ``stage1`` holds the stage-1 graph's outputs by name, ``feeds`` the names
    ``stage2`` takes after the images; ``pad_to(count, batch)`` gives the
    padded sub-batch size (None: no padding). Everything returned is a fresh
    tensor, never a graph's own output buffer (CUDA graphs reuse those).
    """
    logits1 = stage1["logits"]
    exit_stage = torch.where(exits, 1, 2)
    logits = logits1.clone()
    remaining = torch.nonzero(~exits).squeeze(1)
    count = remaining.numel()
    selection = None
    if count > 0:
        size = count if pad_to is None else pad_to(count, logits1.shape[0])
        index = remaining if size == count else torch.cat([remaining, remaining[:1].expand(size - count)])
        inputs = [images.index_select(0, index), *(stage1[name].index_select(0, index) for name in feeds)]
        logits[remaining] = stage2(*inputs)[:count].to(logits.dtype)
        selection = Selection(*(stage1[name][remaining] for name in SELECTION_FIELDS))
    return InferenceResult(logits=logits, exit_stage=exit_stage, stage1_logits=logits1.clone(), selection=selection)


def _recompile_limit(limit: int) -> contextlib.AbstractContextManager:
    """Raise dynamo's per-function recompile limit for one call (each bucket and batch size is one compile)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(limit, getattr(config, name))})


class CompiledCascade:
    """``pipe.infer`` through :class:`Stage1Graph` and :class:`Stage2Graph` under ``torch.compile``.

    Shapes are static (``dynamic=False``): stage 1 compiles once per batch
    size, stage 2 once per bucket. On CUDA the default mode is
    ``"reduce-overhead"``: each static shape is captured as a CUDA graph and
    replayed, so a batch-1 inference is a few graph launches instead of
    hundreds of kernel launches. ``backend=None`` runs the same static path
    uncompiled (for tests and profiling).
    """

    def __init__(
        self,
        pipe: DynamicPipeline,
        mode: str | None = None,
        buckets: Sequence[int] | None = None,
        backend: str | None = "inductor",
        **compile_kwargs: object,
    ) -> None:
        if buckets is not None and (not buckets or min(buckets) < 1):
            raise ValueError(f"buckets must be positive sub-batch sizes, got {list(buckets)}")
        self.pipe = pipe
        self.mode = mode
        self.buckets = None if buckets is None else sorted(set(buckets))
        self.backend = backend
        self.compile_kwargs = compile_kwargs
        self.stage1_graph = Stage1Graph(pipe)
        self.stage2_graph = Stage2Graph(pipe) if pipe.num_stages == 2 else None
        self._compiled: dict[str, tuple[Callable, Callable | None]] = {}

    def cuda_graphs(self, device: torch.device) -> bool:
        """Whether calls on ``device`` replay CUDA graphs (never on the CPU)."""
        return device.type == "cuda" and self.backend is not None and self._mode(device) == "reduce-overhead"

    def _mode(self, device: torch.device) -> str | None:
        if self.mode is not None:
            return self.mode
        return "reduce-overhead" if device.type == "cuda" else None

    def stages(self, device: torch.device) -> tuple[Callable, Callable | None]:
        """The (compiled) stage functions for ``device``, built on first use."""
        key = device.type
        if key not in self._compiled:
            if self.backend is None:
                fns = (self.stage1_graph, self.stage2_graph)
            else:

                def compiled(module: nn.Module | None) -> Callable | None:
                    if module is None:
                        return None
                    return torch.compile(
                        module, backend=self.backend, mode=self._mode(device), dynamic=False, **self.compile_kwargs
                    )

                fns = (compiled(self.stage1_graph), compiled(self.stage2_graph))
            self._compiled[key] = fns
        return self._compiled[key]

    def compile_like(self, fn: Callable[[Tensor], Tensor], device: torch.device) -> Callable[[Tensor], Tensor]:
        """``fn`` compiled as the stages are on ``device`` (for a like-for-like baseline); ``fn`` for backend None."""
        if self.backend is None:
            return fn
        compiled = torch.compile(
            fn, backend=self.backend, mode=self._mode(device), dynamic=False, **self.compile_kwargs
        )
        if not self.cuda_graphs(device):
            return compiled

        def replay(images: Tensor) -> Tensor:
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(images)

        return replay

    @torch.no_grad()
    def infer(self, images: Tensor, threshold: float | None = None, checked: bool = False) -> InferenceResult:
        """What :meth:`DynamicPipeline.infer` returns, through the static stage graphs.

        ``checked``: the images already passed the pipeline's input checks (shape, dtype, finite pixels).
        """
        pipe = self.pipe
        if not checked:
            images = pipe._check_images(images, check_finite=True)
        stage1_fn, stage2_fn = self.stages(images.device)
        if self.cuda_graphs(images.device):
            torch.compiler.cudagraph_mark_step_begin()  # a new inference: earlier graph outputs may be overwritten
        with _recompile_limit(64):
            outputs = stage1_fn(images)
            stage1 = dict(zip(self.stage1_graph.output_names, outputs))
            if pipe.num_stages == 1:
                logits = stage1["logits"].clone()
                ones = torch.ones(logits.shape[0], dtype=torch.long, device=logits.device)
                return InferenceResult(logits=logits, exit_stage=ones, stage1_logits=logits.clone())
            policy = pipe.exit_policy
            if uses_plain_threshold(policy):
                exits = stage1["score"] >= (policy.threshold if threshold is None else threshold)
            else:
                exits = policy(stage1["logits"], threshold)
            pad_to = lambda count, batch: bucket_size(count, batch, self.buckets)  # noqa: E731
            return run_cascade(images, stage1, exits, stage2_fn, self.stage2_graph.input_names[1:], pad_to)
