"""The dynamic path does the same Python work whatever the batch size or region size.

A per-sample or per-window Python loop would dispatch more torch calls for
a larger batch (or for more candidate windows); a vectorised path
dispatches exactly the same ones. Three counters watch one call:
torch-level calls (``TorchFunctionMode``), ATen operators
(``TorchDispatchMode``) and calls of dynvit's own Python functions
(``sys.setprofile``).
"""

from __future__ import annotations

import importlib
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tolerance
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dynvit import build_pipeline, load_recipe
from dynvit.pipeline import DynamicPipeline
from dynvit.stages import ExitPolicy, Selection, Stage1Output

# 96 px, patch 8: a 6x6 stage-1 grid (25 candidate 2x2 windows, 9 of 4x4) and a 12x12 full-resolution grid
TINY = [
    "model.image_size=96",
    "model.backbone.depth=3",
    "model.backbone.embed_dim=32",
    "model.backbone.num_heads=2",
    "model.selector.first_block=1",
    "model.selector.alpha=0.88",
]
# dynvit's own code: the core package and the built-in plugins (installed as dynvit.plugins from plugins/)
PROJECT_DIRS = tuple(str(Path(importlib.import_module(m).__file__).parent) for m in ("dynvit", "dynvit.plugins"))


class HalfExit(ExitPolicy):
    """The more confident half of every batch exits, so both stages always run."""

    threshold = float("nan")

    def score(self, logits: Tensor) -> Tensor:
        return logits.softmax(dim=-1).amax(dim=-1)

    def forward(self, logits: Tensor, threshold: float | None = None) -> Tensor:
        confidence = self.score(logits)
        exits = torch.zeros_like(confidence, dtype=torch.bool)
        return exits.scatter_(0, confidence.topk(logits.shape[0] // 2).indices, True)


class _TorchCalls(TorchFunctionMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.counts[getattr(func, "__qualname__", None) or repr(func)] += 1
        return func(*args, **(kwargs or {}))


class _AtenOps(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def work(fn: Callable[[], object]) -> dict[str, Counter]:
    """What one call of ``fn`` dispatches: torch calls, ATen ops and calls of dynvit's own Python functions."""
    counts = {"torch calls": Counter(), "aten ops": Counter(), "dynvit python calls": Counter()}
    warm = {kind: Counter() for kind in counts}

    def profiler(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(PROJECT_DIRS):
            counts["dynvit python calls"][frame.f_code.co_qualname] += 1

    # the first call under the modes pays one-off setup (lazy registrations, caches): count the second
    for target in (warm, counts):
        with _TorchCalls(target["torch calls"]), _AtenOps(target["aten ops"]):
            sys.setprofile(profiler if target is counts else None)
            try:
                fn()
            finally:
                sys.setprofile(None)
    return counts


def tiny_pipeline(region: int, selector: str = "ngca") -> DynamicPipeline:
    torch.manual_seed(0)
    overrides = [*TINY, f"model.selector.region={region}", f"model.selector.type={selector}"]
    pipe = build_pipeline(load_recipe("quickstart", overrides)).eval()
    pipe.exit_policy = HalfExit()
    return pipe


def images(batch: int) -> Tensor:
    return torch.randn(batch, 3, 96, 96, generator=torch.Generator().manual_seed(batch))


def assert_same_work(a: dict[str, Counter], b: dict[str, Counter]) -> None:
    for kind in a:
        extra, missing = b[kind] - a[kind], a[kind] - b[kind]
        assert not extra and not missing, f"{kind} differ: more {dict(extra)}, fewer {dict(missing)}"


@pytest.fixture(scope="module")
def pipe() -> DynamicPipeline:
    return tiny_pipeline(region=2)


def test_infer_work_does_not_grow_with_batch(pipe):
    # 4, not 2: a sub-batch of one sample takes a broadcasting view in index_put, one extra ATen view op
    small, large = images(4), images(32)
    first = work(lambda: pipe.infer(small))
    assert (pipe.infer(small).exit_stage == 2).sum() == 2  # both stages ran
    assert sum(first["aten ops"].values()) > 100  # the counters do see the pipeline's work
    assert_same_work(first, work(lambda: pipe.infer(large)))


def test_training_forward_work_does_not_grow_with_batch(pipe):
    pipe.train()
    try:
        assert_same_work(work(lambda: pipe(images(4))), work(lambda: pipe(images(32))))
    finally:
        pipe.eval()


@pytest.mark.parametrize("selector", ["ngca", "max_gca", "topk_gca"])
def test_selection_work_does_not_grow_with_region(selector):
    pipes = [tiny_pipeline(region, selector) for region in (2, 4)]
    batch = images(8)
    assert pipes[0].stage2_length != pipes[1].stage2_length  # the region really differs
    assert_same_work(work(lambda: pipes[0].infer(batch)), work(lambda: pipes[1].infer(batch)))


class LoopingSelector(torch.nn.Module):
    """A per-sample selector, to show the counters catch exactly the loops the tests above forbid."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def attention_blocks(self, depth: int) -> list[int]:
        return self.inner.attention_blocks(depth)

    def forward(self, stage1: Stage1Output, grid2) -> Selection:
        parts = [self.inner(stage1.take(torch.tensor([i])), grid2) for i in range(stage1.logits.shape[0])]
        return Selection(
            *(torch.cat([getattr(p, f) for p in parts]) for f in ("full_index", "reuse_index", "region", "kept"))
        )


def test_counters_detect_a_per_sample_loop(pipe):
    looping = tiny_pipeline(region=2)
    looping.selector = LoopingSelector(looping.selector)
    small, large = images(4), images(32)
    # same result, slower path
    torch.testing.assert_close(looping.infer(large).logits, pipe.infer(large).logits, **tolerance())
    a, b = work(lambda: looping.infer(small)), work(lambda: looping.infer(large))
    with pytest.raises(AssertionError, match="differ"):
        assert_same_work(a, b)


def test_three_stage_infer_work_does_not_grow_with_batch():
    """Every stage runs once on its compacted sub-batch: the same calls for 8 images as for 32."""
    torch.manual_seed(0)
    three = build_pipeline(load_recipe(Path(__file__).with_name("tiny_three_stages.yaml"))).eval()
    for stage in three.stages[:2]:
        stage.exit_policy = HalfExit()
    batch = [torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(n)) for n in (8, 32)]
    assert three.infer(batch[0]).exit_stage.tolist().count(3) == 2  # all three stages ran
    assert_same_work(work(lambda: three.infer(batch[0])), work(lambda: three.infer(batch[1])))


@pytest.mark.parametrize(
    "reduction",
    [
        ["model.reduction.type=evit", "model.reduction.keep_rate=0.6", "model.reduction.stage=[0,1]"],
        ["model.reduction.type=evit", "model.reduction.fuse=false", "model.reduction.stage=1"],
        ["model.reduction.type=tome", "model.reduction.r=4", "model.reduction.stage=[0,1]"],
    ],
)
def test_token_reduction_work_does_not_grow_with_batch(reduction):
    """EViT's pruning and ToMe's matching and merging are batched tensor ops in inference and training alike."""
    torch.manual_seed(0)
    reduced = build_pipeline(load_recipe("quickstart", [*TINY, "model.selector.region=2", *reduction])).eval()
    reduced.exit_policy = HalfExit()
    assert all(stage.reducer is not None for stage in reduced.stages[1:])
    small, large = images(4), images(32)
    assert (reduced.infer(small).exit_stage == 2).sum() == 2  # both stages ran
    assert_same_work(work(lambda: reduced.infer(small)), work(lambda: reduced.infer(large)))
    reduced.train()
    assert_same_work(work(lambda: reduced(small)), work(lambda: reduced(large)))
