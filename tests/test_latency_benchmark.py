"""The latency benchmark's reference models: the backbone alone on exactly the tokens each stage encodes.

``benchmarks/latency.py`` divides LF-ViT's time by these models' to say how
much of the batch-1 gap is the backbone's own arithmetic and how much the
cascade's; that is only meaningful if they run the same weights on the same
token counts and leave the pipeline's model untouched.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from latency import token_grid, token_matched_backbones, token_matched_gflops  # noqa: E402
from ratios import build  # noqa: E402

from dynvit.flops import count_flops  # noqa: E402


@pytest.mark.parametrize(("tokens", "grid"), [(49, (7, 7)), (115, (5, 23)), (40, (5, 8)), (13, (1, 13)), (1, (1, 1))])
def test_token_grid_is_the_squarest_exact_factorisation(tokens, grid):
    assert token_grid(tokens) == grid


def test_token_matched_backbones_run_each_stage_token_count_with_the_same_weights():
    pipe = build("tiny-m3", torch.device("cpu"))
    model = pipe.backbone.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    native = tuple(model.patch_embed.img_size)
    matched = token_matched_backbones(pipe)
    assert len(matched) == pipe.num_stages
    for index, (resized, size) in enumerate(matched):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            tokens = resized.forward_features(x)
            assert tokens.shape[1] == pipe.stage_length(index)
            # the blocks are the pipeline's: the same sequence through either gives the same result
            seq = torch.randn(2, pipe.stage_length(index), model.embed_dim)
            torch.testing.assert_close(resized.blocks(seq), model.blocks(seq), rtol=0, atol=0)
        assert resized.pos_embed.shape[1] == pipe.stage_length(index)
    # the pipeline's own model is not resized
    assert tuple(model.patch_embed.img_size) == native
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_token_matched_flops_track_the_stage_counts():
    """Stage 1 is the backbone at half resolution plus its class-attention rows and selection, so the two
    counts agree to a few percent; the backbone alone can never cost more than the stage."""
    pipe = build("tiny-m3", torch.device("cpu"))
    stages = count_flops(pipe).stages
    matched = token_matched_gflops(token_matched_backbones(pipe))
    for stage, alone in zip(stages, matched):
        assert 0.9 * stage <= alone <= stage * 1.001
