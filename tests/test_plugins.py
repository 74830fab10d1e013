"""Exit policies, losses, downsamplers, fusers and reusers against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import as_output, tolerance
from dynvit.plugins.downsamplers import AvgPoolDownsampler, InterpolateDownsampler
from dynvit.plugins.exit_policies import ConfidenceExit, EntropyExit, NeverExit
from dynvit.plugins.fusers import MLPUpsampleFuser
from dynvit.plugins.losses import CEPlusCE, CEPlusKL, LastStageCE
from dynvit.plugins.reusers import NoReuser, Stage1EmbeddingReuser

from dynvit.stages import StageOutput


def test_confidence_exit_uses_max_softmax_at_or_above_eta():
    # softmax([log 3, 0]) = (0.75, 0.25)
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    policy = ConfidenceExit(threshold=0.75)
    assert policy(logits).tolist() == [True, False]
    assert policy(logits, threshold=0.5).tolist() == [True, True]
    assert policy(logits, threshold=0.76).tolist() == [False, False]
    assert policy(logits, threshold=0.0).all() and not policy(logits, threshold=1.01).any()


def test_entropy_exit_on_certainty():
    logits = torch.tensor([[100.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    policy = EntropyExit(threshold=0.5)
    assert policy(logits).tolist() == [True, False]  # one-hot: certainty 1; uniform: certainty 0
    assert NeverExit()(logits).tolist() == [False, False]


def test_ce_kl_is_eq12():
    torch.manual_seed(0)
    first, last = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    loss = CEPlusKL()(as_output(first, last), y)
    p2 = last.detach().softmax(-1)
    kl = (p2 * (p2.log() - first.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(loss, F.cross_entropy(last, y) + kl, **tolerance())
    loss.backward()
    # the KL term does not push stage 2 towards stage 1: only CE reaches it
    ce_only = torch.autograd.grad(F.cross_entropy(last, y), last)[0]
    torch.testing.assert_close(last.grad, ce_only, **tolerance())


def test_ce_kl_distils_every_earlier_stage_from_the_last():
    torch.manual_seed(0)
    stages = [torch.randn(4, 5) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 3])
    teacher = stages[2].softmax(-1)

    def kl(student: torch.Tensor) -> torch.Tensor:
        return (teacher * (teacher.log() - student.log_softmax(-1))).sum(-1).mean()

    expected = F.cross_entropy(stages[2], y) + 0.5 * (kl(stages[0]) + kl(stages[1]))
    torch.testing.assert_close(CEPlusKL(kl_weight=0.5)(as_output(*stages), y), expected, **tolerance())
    torch.testing.assert_close(
        CEPlusCE()(as_output(*stages), y), sum(F.cross_entropy(s, y) for s in stages), **tolerance()
    )


def test_losses_accept_soft_targets():
    logits = torch.randn(3, 4)
    soft = torch.full((3, 4), 0.25)
    expected = -(soft * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(LastStageCE()(as_output(logits), soft), expected, **tolerance())
    torch.testing.assert_close(CEPlusCE()(as_output(logits, logits), soft), 2 * expected, **tolerance())


def test_label_smoothing_is_applied_to_hard_labels():
    logits, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    torch.testing.assert_close(
        LastStageCE(smoothing=0.1)(as_output(logits), y), F.cross_entropy(logits, y, label_smoothing=0.1), **tolerance()
    )


def test_bilinear_downsampler_is_align_corners_true():
    images = torch.randn(2, 3, 224, 224)
    out = InterpolateDownsampler()(images)
    assert out.shape == (2, 3, 112, 112)
    # align_corners=True keeps the corner pixels exactly
    torch.testing.assert_close(out[..., 0, 0], images[..., 0, 0], **tolerance())
    torch.testing.assert_close(out[..., -1, -1], images[..., -1, -1], **tolerance())
    assert InterpolateDownsampler(scale=0.5).output_size(288) == 144


def test_avgpool_downsampler_averages_blocks():
    images = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = AvgPoolDownsampler(2)(images)
    assert out.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    with pytest.raises(ValueError, match="not divisible"):
        AvgPoolDownsampler(3).output_size(64)


def test_fusion_is_ln_mlp_then_nearest_upsample_added():
    torch.manual_seed(0)
    fuser = MLPUpsampleFuser(embed_dim=8)
    stage1 = torch.randn(2, 4, 8)  # a 2x2 stage-1 grid
    full = torch.randn(2, 16, 8)  # the 4x4 full-resolution grid
    parent = torch.tensor([(r // 2) * 2 + c // 2 for r in range(4) for c in range(4)]).expand(2, 16)
    out = fuser(full, stage1, parent)
    features = fuser.block[1].fc2(
        F.gelu(fuser.block[1].fc1(F.layer_norm(stage1, (8,), fuser.block[0].weight, fuser.block[0].bias, 1e-6)))
    )
    grid = features.transpose(1, 2).reshape(2, 8, 2, 2)
    upsampled = F.interpolate(grid, scale_factor=2, mode="nearest").flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, full + upsampled, **tolerance())


def test_reusers():
    emb = torch.randn(2, 5, 3)
    stage1 = StageOutput(
        logits=torch.zeros(2, 1), tokens=torch.zeros(2, 6, 3), class_attention={}, embeddings=emb, grid=(1, 5)
    )
    index = torch.tensor([[4, 0], [1, 2]])
    out = Stage1EmbeddingReuser()(stage1, index)
    assert torch.equal(out[0], emb[0, [4, 0]]) and torch.equal(out[1], emb[1, [1, 2]])
    assert NoReuser()(stage1, index).shape == (2, 0, 3)
