"""Pipeline invariants: equivalence with plain timm, class attention, inference semantics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RECIPE, tiny_recipe, tolerance
from data.make_lfvit_before import CASES as BEFORE_CASES
from data.make_lfvit_before import SHRINK as BEFORE_SHRINK

from dynvit import build_pipeline, load_recipe
from dynvit.stages import StageContext


def test_whole_image_stage2_without_fusion_or_reuse_equals_plain_timm(images):
    torch.manual_seed(0)
    pipe = build_pipeline(
        tiny_recipe("model.selector.type=full_image", "model.fuser.type=none", "model.reuser.type=none")
    ).eval()
    with torch.no_grad():
        expected = pipe.backbone.model(images)
        out = pipe(images)
    assert out.logits[1].shape == expected.shape
    torch.testing.assert_close(out.logits[1], expected, **tolerance())
    # stage 1 really ran on something else: a different (half-resolution) view
    assert not torch.allclose(out.logits[0], expected, atol=1e-3)


def test_whole_image_phase_flag_equals_full_image_selector(images):
    torch.manual_seed(0)
    pipe = build_pipeline(tiny_recipe()).eval()
    whole = build_pipeline(tiny_recipe("model.selector.type=full_image")).eval()
    whole.load_state_dict(pipe.state_dict())
    pipe.whole_image_stage2 = True
    with torch.no_grad():
        torch.testing.assert_close(pipe(images).logits[1], whole(images).logits[1], **tolerance())


def test_class_attention_row_matches_materialised_attention(tiny_pipeline, images):
    backbone = tiny_pipeline.backbone
    block_index = 2
    block = backbone.model.blocks[block_index]
    seen = {}
    handle = block.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0].detach()))
    try:
        pos = backbone.position_embedding(backbone.native_grid)
        tokens = backbone.embed_patches(images) + pos[:, 1:]
        with torch.no_grad():
            out = backbone.encode(
                tokens, pos[:, :1], StageContext(0, backbone.native_grid, attention_blocks=[block_index])
            )
    finally:
        handle.remove()
    x = block.norm1(seen["x"])
    b, n, d = x.shape
    heads = block.attn.num_heads
    qkv = block.attn.qkv(x).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    attention = F.softmax(q @ k.transpose(-2, -1) / (d // heads) ** 0.5, dim=-1)  # (B, H, N, N)
    expected = attention[:, :, 0, 1:].mean(dim=1)
    assert set(out.class_attention) == {block_index}
    torch.testing.assert_close(out.class_attention[block_index], expected, **tolerance())
    # rows are distributions over all tokens, so the patch part sums to at most 1
    assert torch.all(out.class_attention[block_index].sum(-1) <= 1 + 1e-6)


def test_stage1_returns_attention_only_for_the_selector_blocks(tiny_pipeline, images):
    with torch.no_grad():
        stage1 = tiny_pipeline.run_stage1(images)
    assert sorted(stage1.class_attention) == [2, 3]  # quickstart: first_block 2, depth 4
    assert stage1.class_attention[2].shape == (6, 16)  # 32x32 input, patch 8 -> 4x4 grid


def test_infer_threshold_zero_exits_everything_at_stage1(tiny_pipeline, images):
    res = tiny_pipeline.infer(images, threshold=0.0)
    with torch.no_grad():
        stage1 = tiny_pipeline.run_stage1(images).logits
    assert torch.all(res.exit_stage == 1)
    torch.testing.assert_close(res.logits, stage1, **tolerance())
    assert res.selection is None


def test_infer_threshold_above_one_equals_training_forward_stage2(tiny_pipeline, images):
    res = tiny_pipeline.infer(images, threshold=1.01)
    with torch.no_grad():
        full = tiny_pipeline(images)
    assert torch.all(res.exit_stage == 2)
    torch.testing.assert_close(res.logits, full.logits[1], **tolerance())
    torch.testing.assert_close(res.stage1_logits, full.logits[0], **tolerance())


def test_infer_sends_exactly_the_unconfident_samples_to_stage2(tiny_pipeline, images):
    with torch.no_grad():
        full = tiny_pipeline(images)
    confidence = full.logits[0].softmax(-1).amax(-1)
    threshold = confidence.median().item()
    res = tiny_pipeline.infer(images, threshold=threshold)
    goes_on = confidence < threshold
    assert 0 < goes_on.sum() < len(images)
    assert torch.equal(res.exit_stage, torch.where(goes_on, 2, 1))
    torch.testing.assert_close(res.logits[goes_on], full.logits[1][goes_on], **tolerance())
    torch.testing.assert_close(res.logits[~goes_on], full.logits[0][~goes_on], **tolerance())
    assert res.selection.full_index.shape[0] == int(goes_on.sum())


def test_infer_is_batch_order_invariant(tiny_pipeline, images):
    with torch.no_grad():
        confidence = tiny_pipeline.run_stage1(images).logits.softmax(-1).amax(-1)
    threshold = confidence.median().item()
    batch = tiny_pipeline.infer(images, threshold=threshold)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted = tiny_pipeline.infer(images[perm], threshold=threshold)
    torch.testing.assert_close(permuted.logits, batch.logits[perm], **tolerance())
    for i in range(len(images)):
        alone = tiny_pipeline.infer(images[i : i + 1], threshold=threshold)
        torch.testing.assert_close(alone.logits[0], batch.logits[i], **tolerance())
        assert alone.exit_stage[0] == batch.exit_stage[i]


def test_stage2_length_matches_the_paper():
    lfvit = build_pipeline(load_recipe("lfvit_deit_s", ["model.backbone.depth=4"]), with_loss=False)
    assert lfvit.stage2_length == 1 + 4 * 22 + (49 - 22) == 116
    star = build_pipeline(load_recipe("lfvit_star_deit_s", ["model.backbone.depth=4"]), with_loss=False)
    assert (star.grid1, star.grid2) == ((9, 9), (18, 18))
    assert star.stage2_length == 1 + 4 * 57 + (81 - 57) == 253
    no_reuse = build_pipeline(load_recipe("lfvit_deit_s", ["model.backbone.depth=4", "model.reuser.type=none"]))
    assert no_reuse.stage2_length == 1 + 4 * 22


def test_stage2_sequence_really_has_that_length(tiny_pipeline, images):
    lengths = []
    handle = tiny_pipeline.backbone.model.blocks[0].register_forward_pre_hook(
        lambda module, args: lengths.append(args[0].shape[1])
    )
    with torch.no_grad():
        tiny_pipeline(images)
    handle.remove()
    assert lengths == [17, tiny_pipeline.stage2_length]  # stage 1: CLS + 4x4; stage 2: 1 + 4*4 + (16-4)
    assert tiny_pipeline.stage2_length == 1 + 16 + 12


def test_one_stage_recipe_is_the_plain_backbone(images):
    torch.manual_seed(0)
    pipe = build_pipeline(tiny_recipe("model.stages=1")).eval()
    with torch.no_grad():
        out = pipe(images)
        expected = pipe.backbone.model(images)
    assert len(out.logits) == 1
    torch.testing.assert_close(out.logits[0], expected, **tolerance())
    res = pipe.infer(images)
    assert torch.all(res.exit_stage == 1)


def test_wrong_image_size_says_the_expected_one(tiny_pipeline):
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 64, 64\)"):
        tiny_pipeline(torch.randn(1, 3, 32, 32))


def test_training_forward_backpropagates_into_shared_weights_and_fusion(images):
    torch.manual_seed(0)
    pipe = build_pipeline(tiny_recipe()).train()
    out = pipe(images)
    loss = pipe.compute_loss(out, torch.arange(6) % 10)
    loss.backward()
    assert pipe.backbone.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert pipe.fuser.block[1].fc1.weight.grad.abs().sum() > 0
    assert pipe.backbone.stage_pos_embed["4x4"].grad.abs().sum() > 0
    assert pipe.backbone.model.pos_embed.grad.abs().sum() > 0


def test_bfloat16_pipeline_runs_and_keeps_dtype(tiny_pipeline, images):
    pipe = tiny_pipeline.to(torch.bfloat16)
    res = pipe.infer(images.to(torch.bfloat16), threshold=0.5)
    assert res.logits.dtype == torch.bfloat16
    assert torch.isfinite(res.logits.float()).all()


BEFORE = Path(__file__).parent / "data" / "lfvit_before.pt"


@pytest.mark.parametrize("case", list(BEFORE_CASES))
def test_lfvit_outputs_equal_the_two_stage_pipeline_they_came_from(case):
    """Weights, images and outputs recorded by the two-stage pipeline (tests/data/make_lfvit_before.py, run at the
    commit before the stage list): the same weights, loaded under their old key names, give the same stage
    logits, selections, loss, exits and inference logits."""
    saved = torch.load(BEFORE, weights_only=True)
    overrides = BEFORE_CASES[case]
    shrink = BEFORE_SHRINK
    first = [] if case == "one_stage" else ["model.selector.first_block=2"]
    pipe = build_pipeline(load_recipe(TINY_RECIPE, shrink + first + overrides)).eval()
    pipe.load_state_dict(saved[f"{case}.state"])
    pipe.whole_image_stage2 = case == "whole_image"
    images, target = saved["images"], saved["target"]
    exact = {"atol": 1e-6, "rtol": 0}
    with torch.no_grad():
        out = pipe(images)
        for i, logits in enumerate(out.logits):
            torch.testing.assert_close(logits, saved[f"{case}.logits{i + 1}"], **exact)
        torch.testing.assert_close(pipe.compute_loss(out, target), saved[f"{case}.loss"], **exact)
        if case != "one_stage":
            for field in ("full_index", "reuse_index", "region", "kept"):
                assert torch.equal(getattr(out.selection, field), saved[f"{case}.{field}"]), field
        result = pipe.infer(images, threshold=float(saved[f"{case}.threshold"]))
    assert torch.equal(result.exit_stage, saved[f"{case}.exit_stage"])
    torch.testing.assert_close(result.logits, saved[f"{case}.infer_logits"], **exact)


THREE_STAGES = Path(__file__).with_name("tiny_three_stages.yaml")


def test_three_stage_inference_equals_a_per_sample_cascade():
    """Each sample's result is the logits of the first stage whose confidence reaches its threshold, computed
    on that sample alone; the batched path runs each stage once on the compacted sub-batch."""
    torch.manual_seed(0)
    pipe = build_pipeline(load_recipe(THREE_STAGES)).eval()
    images = torch.randn(24, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stages = pipe(images).logits
    confidence = [s.softmax(-1).amax(-1) for s in stages[:2]]
    # thresholds that split the batch at both exits
    thresholds = [float(confidence[0].quantile(0.7)), float(confidence[1].quantile(0.5))]
    result = pipe.infer(images, threshold=thresholds)
    for i in range(len(images)):
        with torch.no_grad():
            single = pipe(images[i : i + 1]).logits
        stage = next((k for k in range(2) if single[k].softmax(-1).amax() >= thresholds[k]), 2)
        assert result.exit_stage[i] == stage + 1, i
        torch.testing.assert_close(result.logits[i], single[stage][0], **tolerance())
    assert set(result.exit_stage.tolist()) == {1, 2, 3}
    torch.testing.assert_close(result.stage1_logits, stages[0], **tolerance())


def test_three_stage_training_output_and_loss():
    torch.manual_seed(0)
    pipe = build_pipeline(load_recipe(THREE_STAGES))
    images, target = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    out = pipe(images)
    assert [s.grid for s in out.stages] == [(2, 2), (4, 4), (8, 8)]
    assert [s.tokens.shape[1] for s in out.stages] == [5, 17, 65]
    assert out.selection is None  # no stage refines
    expected = sum(F.cross_entropy(logits, target) for logits in out.logits)
    torch.testing.assert_close(pipe.compute_loss(out, target), expected, **tolerance())
    # each stage has its own backbone: the stages' parameters are disjoint
    own = [pipe.backbone_of(i) for i in range(3)]
    assert len({id(b) for b in own}) == 3 and own[0] is pipe.backbone
    assert {k.split(".backbone.")[0] for k in pipe.state_dict() if ".backbone." in k} == {"stages.1", "stages.2"}


def test_one_threshold_serves_every_exit_and_a_wrong_count_is_refused():
    torch.manual_seed(0)
    pipe = build_pipeline(load_recipe(THREE_STAGES)).eval()
    images = torch.randn(8, 3, 64, 64)
    assert torch.equal(
        pipe.infer(images, threshold=0.3).exit_stage, pipe.infer(images, threshold=[0.3, 0.3]).exit_stage
    )
    with pytest.raises(ValueError, match="2 exits; give 2 thresholds, got 1"):
        pipe.infer(images, threshold=[0.3])
