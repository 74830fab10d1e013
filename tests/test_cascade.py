"""The static-shape cascade (dynvit.cascade): same results as eager ``infer``, no graph breaks, bounded shapes.

Tolerances: the static path uncompiled runs the same ops on a padded
sub-batch, so logits match eager to 1e-5 (matmul blocking may differ with
the batch size); compiled with inductor, 1e-4 (fused kernels reassociate
sums). Exit stages and selections are compared exactly.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_recipe
from dynvit.plugins.selectors import RandomSelector, hash32
from torch import Tensor

from dynvit import build_pipeline, load_recipe
from dynvit.cascade import CompiledCascade, Stage1Graph, Stage2Graph, bucket_ladder, bucket_size
from dynvit.stages import ExitPolicy

SELECTORS = ["ngca", "negative_ngca", "max_gca", "min_gca", "random", "topk_gca", "full_image"]
FIELDS = ("full_index", "reuse_index", "region", "kept")


def pipeline(*overrides: str):
    torch.manual_seed(0)
    return build_pipeline(tiny_recipe(*overrides)).eval()


def batch(size: int) -> Tensor:
    return torch.randn(size, 3, 64, 64, generator=torch.Generator().manual_seed(size))


def threshold_sending_on(pipe, images: Tensor, count: int) -> float:
    """A confidence threshold under which exactly the ``count`` least confident samples go on to stage 2."""
    with torch.no_grad():
        confidence = pipe.run_stage1(images).logits.softmax(-1).amax(-1).sort().values
    return float(confidence[count - 1] + confidence[count]) / 2


def assert_same_result(got, expected, atol: float) -> None:
    assert torch.equal(got.exit_stage, expected.exit_stage)
    torch.testing.assert_close(got.logits, expected.logits, atol=atol, rtol=0)
    torch.testing.assert_close(got.stage1_logits, expected.stage1_logits, atol=atol, rtol=0)
    if expected.selection is None:
        assert got.selection is None
    else:
        for field in FIELDS:
            assert torch.equal(getattr(got.selection, field), getattr(expected.selection, field)), field


def test_bucket_ladder_and_sizes_by_hand():
    assert bucket_ladder(64) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert bucket_ladder(10) == [1, 2, 3, 4, 6, 8, 10]  # the batch itself closes the ladder
    assert bucket_ladder(1) == [1]
    assert [bucket_size(n, 64) for n in (1, 4, 5, 7, 9, 33, 49, 64)] == [1, 4, 6, 8, 12, 48, 64, 64]
    assert bucket_size(9, 10) == 10  # never above the batch
    assert [bucket_size(n, 64, [4, 16]) for n in (3, 5, 17)] == [4, 16, 64]
    # at most a third of the rows are padding
    for b in (7, 64, 1000):
        assert all(bucket_size(n, b) - n <= n / 2 for n in range(1, b + 1))


def test_hash32_matches_a_python_integer_reference():
    def reference(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x5BD1E995) & 0xFFFFFFFF
        return x ^ (x >> 16)

    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1]
    assert hash32(torch.tensor(values)).tolist() == [reference(v) for v in values]


def test_random_selector_stream_is_uniform_and_independent_of_batching():
    gca = torch.rand(1000, 7, 7, generator=torch.Generator().manual_seed(0))

    def regions(selector: RandomSelector, gca: Tensor) -> Tensor:
        return selector.choose_window(gca.flatten(1), (7, 7))

    whole = regions(RandomSelector(region=5, seed=3), gca)
    split = RandomSelector(region=5, seed=3)
    assert torch.equal(torch.cat([regions(split, gca[:300]), regions(split, gca[300:])]), whole)
    assert int(split.draws) == 1000
    # 9 windows of 5x5 on a 7x7 grid, each drawn about 1000/9 times (binomial sd about 10)
    counts = torch.bincount(whole[:, 0] * 3 + whole[:, 1], minlength=9)
    assert counts.min() > 111 - 50 and counts.max() < 111 + 50
    other = regions(RandomSelector(region=5, seed=4), gca)
    assert (other != whole).any(dim=1).float().mean() > 0.7  # another seed, another stream


@pytest.mark.parametrize("selector", SELECTORS)
def test_stage_graphs_have_no_graph_breaks(selector):
    pipe = pipeline(f"model.selector.type={selector}")
    images = batch(4)
    stage1, stage2 = Stage1Graph(pipe), Stage2Graph(pipe)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(stage1)(images)
        assert (explained.graph_break_count, explained.graph_count) == (0, 1), explained.break_reasons
        outputs = dict(zip(stage1.output_names, stage1(images)))
        feeds = [outputs[name] for name in stage2.input_names[1:]]
        explained = torch._dynamo.explain(stage2)(images, *feeds)
        assert (explained.graph_break_count, explained.graph_count) == (0, 1), explained.break_reasons
    torch._dynamo.reset()


@pytest.mark.parametrize("selector", SELECTORS)
def test_static_path_equals_eager_infer(selector):
    # two pipelines from one seed, so the random selector's streams start alike
    eager, static = pipeline(f"model.selector.type={selector}"), pipeline(f"model.selector.type={selector}")
    cascade = CompiledCascade(static, backend=None)
    images = batch(8)
    # all exit, none exit, 5 of 8 go on (padded to the bucket of 6), 1 goes on
    for threshold in (0.0, 1.01, threshold_sending_on(eager, images, 5), threshold_sending_on(eager, images, 1)):
        assert_same_result(cascade.infer(images, threshold), eager.infer(images, threshold), atol=1e-5)


# token reduction inside the stages (EViT drops by top-k, ToMe merges by argmax and scatter): still static shapes
REDUCERS = {
    "evit-stage1": ["model.reduction.type=evit", "model.reduction.keep_rate=0.5", "model.reduction.stage=0"],
    "tome-both": ["model.reduction.type=tome", "model.reduction.r=3", "model.reduction.stage=[0,1]"],
    "evit-stage2-unfused": ["model.reduction.type=evit", "model.reduction.fuse=false"],
}


@pytest.mark.parametrize("reduction", REDUCERS)
def test_stage_graphs_with_token_reduction_are_one_graph_each_and_equal_eager(reduction):
    eager, static = pipeline(*REDUCERS[reduction]), pipeline(*REDUCERS[reduction])
    stage1, stage2 = Stage1Graph(static), Stage2Graph(static)
    images = batch(8)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(stage1)(images)
        assert (explained.graph_break_count, explained.graph_count) == (0, 1), explained.break_reasons
        outputs = dict(zip(stage1.output_names, stage1(images)))
        explained = torch._dynamo.explain(stage2)(images, *[outputs[name] for name in stage2.input_names[1:]])
        assert (explained.graph_break_count, explained.graph_count) == (0, 1), explained.break_reasons
    torch._dynamo.reset()
    cascade = CompiledCascade(static, backend=None)
    for threshold in (0.0, 1.01, threshold_sending_on(eager, images, 5)):
        assert_same_result(cascade.infer(images, threshold), eager.infer(images, threshold), atol=1e-5)


def test_one_stage_recipe_with_token_reduction_runs_its_reducer_on_the_static_path():
    torch.manual_seed(0)
    pipe = build_pipeline(
        tiny_recipe("model.stages=1", "loss.type=ce", "model.reduction.type=tome", "model.reduction.r=6")
    ).eval()
    images = batch(3)
    result = CompiledCascade(pipe, backend=None).infer(images)
    with torch.no_grad():
        reduced, plain = pipe.run_stage(0, images).logits, pipe.backbone.model(images)
    torch.testing.assert_close(result.logits, reduced, atol=1e-5, rtol=0)
    assert (result.logits - plain).abs().max() > 1e-3  # the reducer did act


def test_padding_rows_are_copies_of_a_real_sample_and_never_reach_the_result():
    pipe = pipeline()
    cascade = CompiledCascade(pipe, backend=None)
    images = batch(8)
    seen = []
    stage2 = cascade.stages(images.device)[1]

    def spy(*inputs: Tensor) -> Tensor:
        seen.append(inputs[0])
        out = stage2(*inputs)
        out[5:] = float("nan")  # whatever stage 2 puts in the padding rows must not show up
        return out

    cascade._compiled["cpu"] = (cascade._compiled["cpu"][0], spy)
    threshold = threshold_sending_on(pipe, images, 5)
    result = cascade.infer(images, threshold)
    assert seen[0].shape[0] == 6  # 5 samples, bucket 6
    goes_on = (result.exit_stage == 2).nonzero().squeeze(1)
    assert torch.equal(seen[0][:5], images[goes_on]) and torch.equal(seen[0][5], images[goes_on[0]])
    assert torch.isfinite(result.logits).all()
    assert_same_result(result, pipe.infer(images, threshold), atol=1e-5)


class TopTwoExit(ExitPolicy):
    """Overrides forward: the two most confident samples exit, whatever the threshold."""

    threshold = 0.5

    def score(self, logits: Tensor) -> Tensor:
        return logits.softmax(-1).amax(-1)

    def forward(self, logits: Tensor, threshold: float | None = None) -> Tensor:
        exits = torch.zeros(logits.shape[0], dtype=torch.bool)
        return exits.scatter_(0, self.score(logits).topk(2).indices, True)


def test_static_path_asks_a_policy_that_overrides_forward():
    pipe = pipeline()
    pipe.exit_policy = TopTwoExit()
    result = CompiledCascade(pipe, backend=None).infer(batch(5))
    assert int((result.exit_stage == 1).sum()) == 2
    assert_same_result(result, pipe.infer(batch(5)), atol=1e-5)


def test_compile_routes_infer_and_leaves_bad_input_to_the_eager_checks():
    pipe = pipeline()
    images = batch(4)
    expected = pipe.infer(images, 1.01)
    assert not pipe.compiled
    assert pipe.compile(backend=None) is pipe and pipe.compiled
    assert "_cascade" not in dict(pipe.named_modules())  # the cascade is not part of the module tree
    assert set(pipe.state_dict()) == set(pipeline().state_dict())
    assert_same_result(pipe.infer(images, 1.01), expected, atol=1e-5)
    with pytest.raises(ValueError, match="expected images of shape"):
        pipe.infer(torch.randn(2, 3, 32, 32))


def test_one_stage_recipe_static_path_is_the_plain_backbone():
    torch.manual_seed(0)
    pipe = build_pipeline(tiny_recipe("model.stages=1", "loss.type=ce")).eval()
    images = batch(3)
    result = CompiledCascade(pipe, backend=None).infer(images)
    with torch.no_grad():
        torch.testing.assert_close(result.logits, pipe.backbone.model(images), atol=1e-5, rtol=0)
    assert torch.all(result.exit_stage == 1)


def test_inductor_compiled_infer_equals_eager_on_a_padded_mixed_split():
    eager, compiled = pipeline(), pipeline().compile()
    images = batch(8)
    threshold = threshold_sending_on(eager, images, 5)  # stage 2 compiles at the bucket of 6
    torch._dynamo.reset()
    assert_same_result(compiled.infer(images, threshold), eager.infer(images, threshold), atol=1e-4)
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("selector", SELECTORS)
def test_inductor_compiled_infer_equals_eager_for_every_selector_and_exit_pattern(selector):
    eager = pipeline(f"model.selector.type={selector}")
    compiled = pipeline(f"model.selector.type={selector}").compile()
    torch._dynamo.reset()
    for size in (1, 6):
        images = batch(size)
        thresholds = [0.0, 1.01] + ([threshold_sending_on(eager, images, 3)] if size > 1 else [])
        for threshold in thresholds:
            assert_same_result(compiled.infer(images, threshold), eager.infer(images, threshold), atol=1e-4)
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_infer_equals_eager_and_results_survive_the_next_call():
    eager = pipeline().cuda()
    compiled = pipeline().cuda().compile()  # mode reduce-overhead on CUDA: each static shape a CUDA graph
    images = batch(8).cuda()
    threshold = threshold_sending_on(eager, images, 5)
    cascade = compiled.compiled_cascade
    assert cascade.cuda_graphs(images.device)
    first = compiled.infer(images, threshold)
    for _ in range(3):  # replays overwrite the graphs' own buffers; results are copies
        compiled.infer(batch(8).cuda(), threshold)
    assert_same_result(first, eager.infer(images, threshold), atol=1e-4)


def test_compiled_throughput_times_the_compiled_cascade_against_the_same_compiler():
    from dynvit.evaluation import measure_throughput
    from dynvit.evaluation.report import throughput_metrics

    pipe = pipeline().compile(backend=None)
    cascade = pipe.compiled_cascade
    calls = []
    original = cascade.infer
    cascade.infer = lambda images, threshold=None, **kw: calls.append(threshold) or original(images, threshold, **kw)
    result = measure_throughput(pipe, batch(4), eta=1.01, repeats=2, warmup=1)
    assert result.compiled and throughput_metrics(result)["compiled"] is True
    assert result.exit_fraction == 0.0 and calls.count(1.01) == 1 + 1 + 2  # exit check, warm-up, timed rounds
    assert cascade.compile_like(pipe.run_full_resolution, torch.device("cpu")) == pipe.run_full_resolution


def test_pipelines_beyond_the_two_stage_shape_are_refused_with_the_way_out():
    from pathlib import Path

    three = build_pipeline(load_recipe(Path(__file__).with_name("tiny_three_stages.yaml"))).eval()
    with pytest.raises(
        ValueError, match="this pipeline has 3 stages with own backbones or hooks: run it with pipe.infer"
    ):
        three.compile()
