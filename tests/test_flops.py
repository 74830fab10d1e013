"""FLOPs: Table 1 reproduced, exact multiply-add counts on tiny models, and the expected-cost formula.

Counts come from running the model under FlopCounterMode; the formulas
here are the hand count of a ViT's matrix products, used only to check
that every product (fused attention, class-attention rows, fusion MLP,
selected-patch embedding) is counted exactly once.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dynvit.cli import main
from dynvit.flops import CONVENTION, count_flops
from dynvit.pipeline import build_pipeline
from dynvit.recipe import load_recipe

# tiny LF-ViT with the paper's geometry: 112px at patch 8 -> 14x14 full grid, 7x7 stage-1 grid
D, DEPTH, HEADS, CLASSES, PATCH = 32, 4, 2, 10, 8
TINY = [
    "model.image_size=112",
    f"model.backbone.embed_dim={D}",
    f"model.backbone.depth={DEPTH}",
    f"model.backbone.num_heads={HEADS}",
    f"model.backbone.patch_size={PATCH}",
    f"model.backbone.num_classes={CLASSES}",
]
N1, N2 = 49, 196


def tiny(*overrides: str, recipe: str = "lfvit_deit_s"):
    torch.manual_seed(0)
    return build_pipeline(load_recipe(recipe, [*TINY, *overrides]), with_loss=False)


def encoder_macs(tokens: int) -> int:
    """Multiply-adds of DEPTH pre-norm blocks (qkv, QK^T, AV, proj, MLP 4x) and the head on CLS."""
    block = tokens * D * 3 * D + 2 * tokens * tokens * D + tokens * D * D + 2 * tokens * D * 4 * D
    return DEPTH * block + D * CLASSES


def patch_macs(patches: int) -> int:
    return patches * 3 * PATCH * PATCH * D


def giga(macs: int) -> float:
    return macs / 1e9


# -- Table 1 ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["meta", pytest.param("cpu", marks=pytest.mark.slow)])
def deit_s_reports(request):
    """DeiT-S counted on the meta device (no compute, instant) and, in the slow suite, on the CPU."""
    with torch.device(request.param):
        plain = build_pipeline(load_recipe("deit_s"), with_loss=False)
        lfvit = build_pipeline(load_recipe("lfvit_deit_s"), with_loss=False)
    return count_flops(plain), count_flops(lfvit)


def test_table1_deit_s_at_224_and_112(deit_s_reports):
    plain, lfvit = deit_s_reports
    assert plain.full_resolution == pytest.approx(4.6, abs=0.05)  # DeiT-S, 224x224, 197 tokens
    assert lfvit.stage1 == pytest.approx(1.1, abs=0.05)  # DeiT-S on the 112x112 view, 50 tokens
    # one-stage recipes: stage 1 is the whole model, there is no stage 2
    assert plain.stage1 == plain.full_resolution and plain.stage2 == 0.0 and plain.stage2_length == 197
    assert plain.expected(0.3) == plain.full_resolution
    # the LF-ViT pipeline's full-resolution path is exactly the plain backbone
    assert lfvit.full_resolution == plain.full_resolution
    assert lfvit.stage2_length == 116


# -- exact counts on tiny models ---------------------------------------------------------


def test_counts_every_product_once_including_fused_attention_and_class_attention_rows():
    pipe = tiny()
    report = count_flops(pipe)
    # full resolution: patch embedding + 197-token encoder; attention runs in SDPA, so this fails if it is missed
    assert report.full_resolution == pytest.approx(giga(patch_macs(N2) + encoder_macs(1 + N2)), rel=1e-12)
    # stage 1: 50-token encoder + the CLS attention row (1 x 50 per head) of blocks 3.. for GCA
    rows = (DEPTH - 3) * (1 + N1) * D
    assert report.stage1 == pytest.approx(giga(patch_macs(N1) + encoder_macs(1 + N1) + rows), rel=1e-12)
    # stage 2: the 4K selected patches embedded, the fusion MLP over the K kept stage-1 tokens, L-token encoder
    k, length = 22, 116
    assert pipe.stage2_length == length
    fusion = k * 2 * D * 4 * D
    assert report.stage2 == pytest.approx(giga(patch_macs(4 * k) + fusion + encoder_macs(length)), rel=1e-12)


def test_meta_device_counts_exactly_what_the_cpu_counts():
    cpu = count_flops(tiny())
    with torch.device("meta"):
        meta = count_flops(tiny())
    assert meta == cpu


def test_stage2_grows_with_region_size():
    reports = {m: count_flops(tiny(f"model.selector.region={m}")) for m in (4, 5, 6)}
    # K = ceil(0.88 m^2) = 15, 22, 32; length = 1 + 4K + (49 - K)
    assert {m: r.stage2_length for m, r in reports.items()} == {4: 95, 5: 116, 6: 146}
    assert reports[4].stage2 < reports[5].stage2 < reports[6].stage2
    assert reports[4].stage1 == reports[5].stage1 == reports[6].stage1


@pytest.mark.filterwarnings("ignore:command-line overrides")
def test_whole_image_stage2_costs_the_full_backbone_plus_fusion():
    fusion = giga(N1 * 2 * D * 4 * D)
    report = count_flops(tiny("model.selector.type=full_image"))
    assert report.stage2_length == 197
    assert report.stage2 == pytest.approx(report.full_resolution + fusion, rel=1e-12)
    # the first training phase's flag costs the same
    pipe = tiny()
    pipe.whole_image_stage2 = True
    assert count_flops(pipe).stage2 == pytest.approx(report.stage2, rel=1e-12)


def test_expected_flops_are_linear_in_the_exit_fraction_and_match_real_early_exit():
    pipe = tiny().eval()
    report = count_flops(pipe)
    assert report.expected(0.0) == pytest.approx(report.stage1 + report.stage2)
    assert report.expected(1.0) == pytest.approx(report.stage1)
    for f in (0.25, 0.3, 0.5, 0.7):
        assert report.expected(f) == pytest.approx((1 - f) * report.expected(0.0) + f * report.expected(1.0))
    with pytest.raises(ValueError, match="exit fraction"):
        report.expected(1.5)

    # measure pipe.infer on 4 images with a threshold that lets exactly 1 of them exit, then 3
    images = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        confidence = pipe.run_stage1(images).logits.softmax(-1).amax(-1).sort().values
    for exiting in (1, 3):
        threshold = float(confidence[4 - exiting - 1] + confidence[4 - exiting]) / 2
        with FlopCounterMode(display=False) as counter:
            result = pipe.infer(images, threshold=threshold)
        assert int((result.exit_stage == 1).sum()) == exiting
        measured = counter.get_total_flops() / 2 / 4 / 1e9
        assert measured == pytest.approx(report.expected(exiting / 4), rel=1e-9)


def test_counts_are_per_image_and_leave_the_mode_alone():
    pipe = tiny()
    pipe.train()
    one, two = count_flops(pipe, batch=1), count_flops(pipe, batch=2)
    assert pipe.training
    assert (two.stage1, two.stage2, two.full_resolution) == pytest.approx((one.stage1, one.stage2, one.full_resolution))


# -- the command ---------------------------------------------------------------------------


def test_flops_command_prints_the_table(capsys):
    assert main(["flops", "lfvit_deit_s", *TINY, "--exit-fractions", "0.5", "0.7"]) == 0
    printed = capsys.readouterr().out
    assert "GFLOPs, fvcore convention (1 multiply-add = 1 FLOP)" in printed and CONVENTION in printed
    report = count_flops(tiny())
    lines = {line.strip().split("  ")[0]: line.split()[-1] for line in printed.splitlines()[1:]}
    assert lines["stage 1 (56px, 7x7 grid)"] == f"{report.stage1:.3f}"
    assert lines["stage 2 (14x14 grid: selection, fusion, reuse)"] == f"{report.stage2:.3f}"
    assert lines["full-resolution backbone (112px)"] == f"{report.full_resolution:.3f}"
    assert lines["stage-2 tokens (incl. CLS)"] == "116"
    assert lines["expected at 50% exit"] == f"{report.expected(0.5):.3f}"
    assert lines["expected at 70% exit"] == f"{report.expected(0.7):.3f}"

    assert main(["flops", "lfvit_deit_s", *TINY, "--exit-fractions", "1.2"]) == 2
    assert main(["flops", "deit_s", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "stage 2" not in printed and "tokens (incl. CLS)" in printed


def test_cpu_fused_attention_is_counted_where_torch_has_no_formula_for_it(monkeypatch):
    # torch 2.11 has none and counted the CPU's fused attention as 0 FLOPs; the meta device runs plain bmm
    from torch.utils import flop_counter

    from dynvit import flops

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    registry = dict(flop_counter.flop_registry)
    registry.pop(op, None)
    monkeypatch.setattr(flop_counter, "flop_registry", registry)
    without = count_flops(tiny())
    flops._count_cpu_fused_attention()
    assert op in flop_counter.flop_registry
    with torch.device("meta"):
        meta = count_flops(tiny())
    assert count_flops(tiny()) == meta and without.full_resolution < meta.full_resolution


# -- three stages -----------------------------------------------------------------------------------------------


def tiny3():
    from pathlib import Path

    torch.manual_seed(0)
    return build_pipeline(load_recipe(Path(__file__).with_name("tiny_three_stages.yaml")), with_loss=False).eval()


def test_three_stage_costs_per_stage_add_up_and_the_expected_cost_follows_the_exits():
    pipe = tiny3()
    report = count_flops(pipe)
    # each stage: its own backbone (width 32, depth 2, 10 classes) on the whole 64px image at its patch size
    d, depth, classes = 32, 2, 10

    def vit(patch: int) -> float:
        tokens = 1 + (64 // patch) ** 2
        block = tokens * d * 3 * d + 2 * tokens * tokens * d + tokens * d * d + 2 * tokens * d * 4 * d
        return giga((tokens - 1) * 3 * patch * patch * d + depth * block + d * classes)

    assert report.stages == pytest.approx((vit(32), vit(16), vit(8)), rel=1e-12)
    assert report.lengths == (5, 17, 65) and report.stage2_length == 65
    assert report.full_resolution == pytest.approx(vit(8), rel=1e-12)  # the baseline: the last stage's backbone
    assert report.cumulative(3) == pytest.approx(sum(report.stages))
    with pytest.raises(ValueError, match="report.stages"):
        _ = report.stage2
    # by hand: all pay stage 1, 1 - 0.5 pay stage 2, 1 - 0.5 - 0.3 pay stage 3
    s1, s2, s3 = report.stages
    assert report.expected([0.5, 0.3]) == pytest.approx(s1 + 0.5 * s2 + 0.2 * s3, rel=1e-12)
    assert report.expected([0.0, 0.0]) == pytest.approx(s1 + s2 + s3, rel=1e-12)
    assert report.expected([1.0, 0.0]) == pytest.approx(s1, rel=1e-12)
    with pytest.raises(ValueError, match="one exit fraction per exit"):
        report.expected(0.5)
    with pytest.raises(ValueError, match="add up"):
        report.expected([0.7, 0.6])

    # counted pipe.infer on 8 images matches the expected cost at the exit fractions it produced
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = pipe.run_stage(0, images)
        scores1 = first.logits.softmax(-1).amax(-1).sort().values
        scores2 = pipe.run_stage(1, images, first).logits.softmax(-1).amax(-1)
    threshold1 = float(scores1[4] + scores1[5]) / 2  # 3 of 8 stop after stage 1
    with FlopCounterMode(display=False) as counter:
        result = pipe.infer(images, threshold=[threshold1, float(scores2.median())])
    fractions = [float((result.exit_stage == k).float().mean()) for k in (1, 2)]
    assert fractions[0] == 3 / 8
    measured = counter.get_total_flops() / 2 / 8 / 1e9
    assert measured == pytest.approx(report.expected(fractions), rel=1e-9)


def test_flops_command_prints_every_stage_of_a_three_stage_pipeline(capsys):
    from pathlib import Path

    recipe = str(Path(__file__).with_name("tiny_three_stages.yaml"))
    assert main(["flops", recipe, "--exit-fractions", "0.5,0.3", "0.2,0.2"]) == 0
    printed = capsys.readouterr().out
    report = count_flops(tiny3())
    lines = {line.strip().split("  ")[0]: line.split()[-1] for line in printed.splitlines()[1:]}
    assert lines["stage 1 (64px, 2x2 grid)"] == f"{report.stages[0]:.3f}"
    assert lines["stage 3 (64px, 8x8 grid, own backbone)"] == f"{report.stages[2]:.3f}"
    assert [lines[f"stage-{k} tokens (incl. CLS)"] for k in (1, 2, 3)] == ["5", "17", "65"]
    assert lines["expected at exits 50%, 30%"] == f"{report.expected([0.5, 0.3]):.3f}"
    assert main(["flops", recipe, "--exit-fractions", "0.5"]) == 2
    assert "2 exits" in capsys.readouterr().err
