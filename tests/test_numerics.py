"""Reduced precision on the CPU: TF32 emulated bit for bit, bfloat16 autocast against float32.

No GPU is needed to see what TF32 does: it rounds the float32 inputs of a convolution or matmul to a 10-bit
mantissa and accumulates in float32. :class:`EmulatedTF32` does exactly that on the CPU, for convolutions
alone (cuDNN's default on Ampere and Hopper) or for matmuls too, so these tests show what a GPU would.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES, tiny_recipe, tolerance
from dynvit.plugins import backbones
from dynvit.plugins.backbones import _matmul_rounds_like_conv, cuda_tf32
from dynvit.plugins.selectors import window_sums
from torch.utils._python_dispatch import TorchDispatchMode

from dynvit import build_pipeline
from dynvit.evaluation.throughput import _autocast

aten = torch.ops.aten


def round_to_tf32(x: object) -> object:
    """Float32 rounded to TF32's 10-bit mantissa (round to nearest, ties away), as tensor cores read it."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        return x
    return ((x.contiguous().view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)


class EmulatedTF32(TorchDispatchMode):
    """Round the inputs of convolutions (and, with ``matmul``, of matrix products and attention) to TF32."""

    def __init__(self, matmul: bool = False) -> None:
        super().__init__()
        self.matmul = matmul
        self.rounded: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = {aten.convolution.default: 2}
        if self.matmul:
            first.update({aten.mm.default: 2, aten.bmm.default: 2})
            first.update({aten._scaled_dot_product_flash_attention_for_cpu.default: 3})
            if func in (aten.addmm.default, aten.baddbmm.default):  # bias, then the two factors
                args = (args[0], round_to_tf32(args[1]), round_to_tf32(args[2]), *args[3:])
                self.rounded.add(func.__name__)
        if func in first:
            n = first[func]
            args = (*(round_to_tf32(a) for a in args[:n]), *args[n:])
            self.rounded.add(func.__name__)
        return func(*args, **(kwargs or {}))


def test_tf32_rounding_keeps_ten_mantissa_bits():
    x = torch.tensor([1.0, 1 + 2**-10, 1 + 2**-11, 1 + 2**-12, -(1 + 3 * 2**-11), 3.0])
    # 1 + 2^-11 is a tie between 1 and 1 + 2^-10 and goes away from zero; 1 + 2^-12 rounds down
    expected = torch.tensor([1.0, 1 + 2**-10, 1 + 2**-10, 1.0, -(1 + 2**-9), 3.0])
    assert torch.equal(round_to_tf32(x), expected)


def _old_matmul_embedding(backbone, images, index):
    """The selected-patch embedding as a matrix product of patch pixels (what stage 2 did before)."""
    proj, p = backbone.model.patch_embed.proj, backbone.patch_size
    b, c, h, w = images.shape
    pixels = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
    pixels = torch.gather(pixels, 1, index.unsqueeze(-1).expand(-1, -1, pixels.shape[-1]))
    return F.linear(pixels, proj.weight.reshape(proj.weight.shape[0], -1), proj.bias)


def test_selected_patches_embed_like_the_whole_image_under_cudnn_tf32(tiny_pipeline, images):
    backbone = tiny_pipeline.backbone
    index = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(i))[:20] for i in range(6)])
    mode = EmulatedTF32()  # convolutions in TF32, matmuls in float32: the CUDA default
    with torch.no_grad(), mode:
        whole = backbone.embed_patches(images)
        selected = backbone.embed_patches(images, index)
        matmul = _old_matmul_embedding(backbone, images, index)
    assert mode.rounded == {"convolution.default"}
    expected = torch.gather(whole, 1, index.unsqueeze(-1).expand(-1, -1, whole.shape[-1]))
    torch.testing.assert_close(selected, expected, **tolerance(torch.float32))
    # a matrix product would have rounded differently: a TF32-sized gap the float32 tolerance rejects
    assert (matmul - expected).abs().max() > 10 * TOLERANCES["float32"]["atol"]
    torch.testing.assert_close(matmul, expected, **tolerance(tf32=True))


def test_the_matmul_shortcut_is_taken_only_where_it_rounds_like_the_convolution(monkeypatch):
    def images(device: str, dtype: torch.dtype = torch.float32) -> SimpleNamespace:
        return SimpleNamespace(device=torch.device(device), dtype=dtype)

    # on CUDA, float32: only IEEE float32 on both sides rounds alike (measured on an H100: TF32 convolution
    # against float32 matmul 9.4e-4 apart, both TF32 1.7e-4 apart, both float32 0)
    for conv_tf32, matmul_tf32, alike in [
        (True, False, False),
        (True, True, False),
        (False, True, False),
        (False, False, True),
    ]:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", conv_tf32)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", matmul_tf32)
        assert _matmul_rounds_like_conv(images("cuda")) is alike
        assert _matmul_rounds_like_conv(images("cuda", torch.bfloat16))  # 16-bit products on both sides
        assert not _matmul_rounds_like_conv(images("cpu"))  # the CPU: the convolution is faster


@pytest.mark.skipif(
    not hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"), reason="torch without fp32_precision"
)
def test_tf32_is_read_from_either_flag_api(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn.conv, "fp32_precision", "ieee")  # cuDNN RNNs stay at TF32
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32")
    with pytest.raises(RuntimeError):
        torch.backends.cudnn.allow_tf32  # noqa: B018  (the older flag cannot answer for mixed settings)
    assert not cuda_tf32("conv") and cuda_tf32("matmul")
    monkeypatch.setattr(torch.backends.cudnn.conv, "fp32_precision", "none")  # defers to cuDNN, then torch
    monkeypatch.setattr(torch.backends, "fp32_precision", "tf32")
    assert cuda_tf32("conv")
    with pytest.raises(ValueError, match="'conv' or 'matmul'"):
        cuda_tf32("rnn")


def test_the_matmul_shortcut_embeds_like_the_convolution_in_float32(tiny_pipeline, images, monkeypatch):
    backbone = tiny_pipeline.backbone
    index = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(i))[:20] for i in range(6)])
    with torch.no_grad():
        convolution = backbone.embed_patches(images, index)
        monkeypatch.setattr(backbones, "_matmul_rounds_like_conv", lambda images: True)
        matmul = backbone.embed_patches(images, index)
    assert not torch.equal(matmul, convolution)  # really the other path
    torch.testing.assert_close(matmul, convolution, **tolerance())


def test_whole_image_stage2_equals_plain_timm_under_cudnn_tf32(images):
    torch.manual_seed(0)
    pipe = build_pipeline(
        tiny_recipe("model.selector.type=full_image", "model.fuser.type=none", "model.reuser.type=none")
    ).eval()
    with torch.no_grad(), EmulatedTF32():
        expected = pipe.backbone.model(images)
        out = pipe(images)
    torch.testing.assert_close(out.logits[1], expected, **tolerance(torch.float32))


@pytest.mark.parametrize("sharp", [False, True], ids=["random", "sharpened"])
def test_the_tf32_tolerance_is_needed_and_enough(sharp):
    torch.manual_seed(0)
    pipe = peaked_pipeline() if sharp else build_pipeline(tiny_recipe(), with_loss=False).eval()
    images = torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mode = EmulatedTF32(matmul=True)
    with torch.no_grad():
        reference = pipe(images)
        with mode:
            rounded = pipe(images)
    assert {"convolution.default", "addmm.default"} <= mode.rounded
    same = (rounded.selection.full_index == reference.selection.full_index).all(1)
    assert same.float().mean() >= 0.9
    for stage, rows in ((0, slice(None)), (1, same)):
        difference = rounded.logits[stage][rows] - reference.logits[stage][rows]
        torch.testing.assert_close(rounded.logits[stage][rows], reference.logits[stage][rows], **tolerance(tf32=True))
        assert difference.abs().max() > TOLERANCES["float32"]["atol"]


# -- bfloat16 autocast (Accelerate's mixed_precision=bf16, eval.amp) against float32 ---------------------------

# Where a decision is a comparison, bfloat16 can flip it only for inputs near the boundary. These margins are
# the decisions' tolerances: the NGCA window and the top-K tokens must agree wherever the float32 winner beats
# the runner-up by more than WINDOW_MARGIN (relative; over 256 images of the sharpened model below, bfloat16
# moved window sums by <= 0.21%), and the exit decision wherever the float32 confidence is more than
# EXIT_MARGIN from eta (confidences moved by <= 0.0114).
WINDOW_MARGIN = 0.02
EXIT_MARGIN = 0.03


def peaked_pipeline(device: str = "cpu"):
    """The tiny model with sharper attention and larger logits, as training makes them.

    From random weights the CLS attention is nearly uniform, so every window ties and every confidence is
    close to 1 / classes: nothing would separate a rounding error from a real decision.
    """
    torch.manual_seed(0)
    return sharpen(build_pipeline(tiny_recipe(), with_loss=False).eval()).to(device)


def sharpen(pipe):
    """Queries and keys x5 (attention logits x25), the head x20."""
    with torch.no_grad():
        for block in pipe.backbone.model.blocks:
            width = block.attn.qkv.weight.shape[1]
            block.attn.qkv.weight[: 2 * width] *= 5
            block.attn.qkv.bias[: 2 * width] *= 5
        pipe.backbone.model.head.weight *= 20
    return pipe


def _windows(pipe, stage1):
    return window_sums(pipe.selector.gca(stage1), stage1.grid, pipe.selector.region).flatten(1)


def _compare_bfloat16_autocast(device: str, seed: int = 1) -> None:
    pipe = peaked_pipeline(device)
    images = torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(seed)).to(device)
    autocast, precision = _autocast(torch.device(device), True)  # what eval.amp times under
    assert precision == "bfloat16"
    with torch.no_grad():
        full, stage1 = pipe(images), pipe.run_stage1(images)
        with autocast:
            half, stage1_half = pipe(images), pipe.run_stage1(images)
    bf16 = tolerance(torch.bfloat16)

    # stage 1 and the window sums: within tolerance
    torch.testing.assert_close(half.logits[0].float(), full.logits[0], **bf16)
    windows, windows_half = _windows(pipe, stage1), _windows(pipe, stage1_half)
    torch.testing.assert_close(windows_half, windows, atol=0, rtol=WINDOW_MARGIN / 2)

    # selections: equal wherever the float32 window wins clearly (a good share of the samples, by construction)
    top2 = windows.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > WINDOW_MARGIN * top2[:, 0]
    assert clear.float().mean() >= 0.3, "the test model no longer separates its windows; sharpen its attention"
    assert torch.equal(half.selection.region[clear], full.selection.region[clear])
    assert torch.equal(half.selection.kept[clear].sort(1).values, full.selection.kept[clear].sort(1).values)

    # stage 2: within tolerance wherever both looked at the same tokens (their order follows the GCA ranking,
    # which near-ties may swap; stage 2 reads CLS, which does not depend on the order of the other tokens)
    same = (half.selection.full_index.sort(1).values == full.selection.full_index.sort(1).values).all(1)
    assert same[clear].all()
    torch.testing.assert_close(half.logits[1][same].float(), full.logits[1][same], **bf16)

    # early exit: the same decision wherever the confidence is not within EXIT_MARGIN of eta
    confidence = full.logits[0].softmax(-1).amax(-1)
    eta = confidence.median().item()
    with torch.no_grad():
        exact = pipe.infer(images, threshold=eta)
        with autocast:
            mixed = pipe.infer(images, threshold=eta)
    decided = (confidence - eta).abs() > EXIT_MARGIN
    assert decided.float().mean() >= 0.3, "confidences crowd around eta; the test model needs larger logits"
    assert torch.equal(mixed.exit_stage[decided], exact.exit_stage[decided])
    agree = decided & same & (mixed.exit_stage == exact.exit_stage)
    torch.testing.assert_close(mixed.logits[agree].float(), exact.logits[agree], **bf16)


def test_a_bfloat16_autocast_training_step_follows_the_float32_one():
    # as Accelerate's mixed_precision=bf16 runs it: the forward under autocast, the loss and backward outside
    torch.manual_seed(0)
    pipe = sharpen(build_pipeline(tiny_recipe()).train())
    images = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(32) % 10

    def step(amp: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pipe.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            output = pipe(images)
        loss = pipe.compute_loss(output, labels)
        loss.backward()
        return loss.detach(), {n: p.grad.flatten().float() for n, p in pipe.named_parameters() if p.grad is not None}

    (loss, grads), (loss_half, grads_half) = step(False), step(True)
    assert grads.keys() == grads_half.keys() and len(grads) > 20
    torch.testing.assert_close(loss_half, loss, **tolerance(torch.bfloat16))
    # every gradient points where float32's does: measured 1 - cosine <= 1.1e-4 (32 images), required <= 1e-3
    cosines = {n: F.cosine_similarity(grads[n], grads_half[n], dim=0).item() for n in grads if grads[n].norm() > 0}
    assert min(cosines.values()) >= 1 - 1e-3, sorted(cosines.items(), key=lambda kv: kv[1])[:3]


def test_bfloat16_autocast_agrees_with_float32_on_cpu():
    _compare_bfloat16_autocast("cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bfloat16_autocast_agrees_with_float32_on_cuda():
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    _compare_bfloat16_autocast("cuda")


def test_a_vit_whose_patches_overlap_is_refused(monkeypatch):
    # embedding only the selected patches relies on one patch in, one token out
    create = backbones.timm.create_model

    def overlapping(*args, **kwargs):
        model = create(*args, **kwargs)
        proj = model.patch_embed.proj
        model.patch_embed.proj = torch.nn.Conv2d(3, proj.out_channels, 2 * proj.kernel_size[0], proj.stride, 4)
        return model

    monkeypatch.setattr(backbones.timm, "create_model", overlapping)
    with pytest.raises(ValueError, match="non-overlapping patches"):
        backbones.TimmViT(patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10, image_size=64)
