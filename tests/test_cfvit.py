"""CF-ViT (AAAI 2023) as a dynvit recipe, checked against an independent plain-torch CF-ViT.

The reference below is written from the authors' published semantics
(their ``deit/models_deit.py``, read for facts only) and works on the raw
tensors of an authors'-layout state dict: no timm, no dynvit. It follows
their order of operations where dynvit's differs: the fusion MLP runs over
every coarse token and is upsampled over the whole grid before the kept
patches are gathered; the kept patches enter as all top-left children, then
all top-right, bottom-left, bottom-right (their index formula), and the
reused coarse tokens in descending GCA order. Attention is permutation
equivariant, so the CLS logits agree with dynvit's up to float rounding,
while a wrong key mapping, position table, fusion, K or child mapping shows
up as different logits. The transformer helpers and the random state dict
are those of the LF-ViT reference in ``test_weights.py`` (the two methods
share the checkpoint layout).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import as_output, tolerance
from test_weights import CLASSES, DEPTH, PATCH, WIDTH, _encode, _lin, _ln, authors_state_dict, tiny_lfvit_recipe

from dynvit.cli import main
from dynvit.pipeline import build_pipeline
from dynvit.recipe import load_recipe
from dynvit.weights import (
    CheckpointError,
    convert_cfvit_state_dict,
    convert_lfvit_state_dict,
    import_cfvit,
    load_pipeline_weights,
)

# (recipe, tiny image size at patch 8, coarse grid, K = ceil(0.5 * grid^2) computed by hand)
CFVIT = (
    ("cfvit_deit_s", 112, 7, 25),  # the 224/112 layout: 14x14 fine and 7x7 coarse grids
    ("cfvit_star_deit_s", 144, 9, 41),  # CF-ViT*: 18x18 and 9x9 grids
)


def _take(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(tokens, 1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def reference_cfvit(p, images, ratio=0.5, beta=0.99, first_block=3, whole_image=False, fine_position=True):
    """CF-ViT from the authors' tensors: (coarse logits, fine logits, kept coarse cells in GCA order, GCA).

    ``whole_image``: the first training phase (every fine patch, nothing
    reused). ``fine_position=False`` reproduces the authors' code in that
    phase, which leaves the fine position table out.
    """
    b, _, size, _ = images.shape
    cls, pos1, pos2 = p["cls_token"].expand(b, -1, -1), p["pos_embed_list.0"], p["pos_embed_list.1"]

    def embed(img):
        return F.conv2d(img, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=PATCH).flatten(2).mT

    # coarse stage: half-size copy (bilinear, corners aligned), CLS prepended, then the coarse table added
    low = F.interpolate(images, size=(size // 2, size // 2), mode="bilinear", align_corners=True)
    x1 = torch.cat([cls, embed(low)], 1) + pos1
    logits1, tokens1, rows = _encode(x1, p)
    grid = math.isqrt(x1.shape[1] - 1)
    gca = torch.zeros_like(rows[0])
    for row in rows[first_block:]:  # EMA from zero over blocks first_block.. of the head-mean CLS row
        gca = beta * gca + (1 - beta) * row

    # fine stage: LN + MLP over all coarse tokens, nearest x2 to the fine grid, added before the fine table
    hidden = F.gelu(_lin(_ln(tokens1[:, 1:], p, "reuse_block.0"), p, "reuse_block.1.fc1"))
    fused = _lin(hidden, p, "reuse_block.1.fc2").mT.reshape(b, -1, grid, grid)
    fused = F.interpolate(fused, size=(2 * grid, 2 * grid), mode="nearest").flatten(2).mT
    x2 = torch.cat([cls, embed(images) + fused], 1)
    with_position = x2 + pos2

    kept = torch.zeros(b, 0, dtype=torch.long)
    if whole_image:
        sequence = with_position if fine_position else x2
    else:
        k = math.ceil(ratio * grid * grid)
        order = torch.argsort(gca, dim=1, descending=True)
        kept, rest = order[:, :k], order[:, k:]
        top_left = 4 * kept - 2 * (kept % grid)  # coarse (r, c) -> fine (2r, 2c) on the 2*grid-wide grid
        fine = torch.cat([top_left, top_left + 1, top_left + 2 * grid, top_left + 2 * grid + 1], 1)
        cls_index = torch.zeros(b, 1, dtype=torch.long)
        sequence = torch.cat([_take(with_position, torch.cat([cls_index, fine + 1], 1)), _take(x1, rest + 1)], 1)
    return logits1, _encode(sequence, p)[0], kept, gca


def _imported_pipeline(tmp_path, recipe_name, image_size, grid1, seed=0):
    raw = authors_state_dict(grid1, seed)
    torch.save({"model": raw, "flop": torch.tensor([1.1, 4.0])}, tmp_path / "cfvit.pth")
    summary = import_cfvit(tmp_path / "cfvit.pth", tmp_path / "cfvit.safetensors")
    pipe = build_pipeline(tiny_lfvit_recipe(recipe_name, image_size)).eval()
    load_pipeline_weights(pipe, summary.weights)
    return raw, summary, pipe


@pytest.mark.parametrize("recipe_name,image_size,grid1,k", CFVIT)
def test_imported_cfvit_matches_a_plain_torch_cfvit(tmp_path, recipe_name, image_size, grid1, k):
    raw, summary, pipe = _imported_pipeline(tmp_path, recipe_name, image_size, grid1)
    assert summary.method == "cfvit" and summary.grids == [grid1, 2 * grid1] and summary.image_size == image_size
    assert (summary.embed_dim, summary.depth, summary.patch_size, summary.num_classes) == (WIDTH, DEPTH, PATCH, CLASSES)
    assert json.loads(summary.sidecar.read_text())["flop"] == pytest.approx([1.1, 4.0])
    assert pipe.stage2_length == 1 + 4 * k + (grid1 * grid1 - k)

    images = torch.randn(4, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = pipe(images)
        inferred = pipe.infer(images)  # the recipe's threshold 1: every image goes on to the fine stage
        # the reference runs in float64: the tolerance covers only the pipeline's float32 rounding
        ref1, ref2, kept, gca = reference_cfvit({n: t.double() for n, t in raw.items()}, images.double())
    ref1, ref2 = ref1.float(), ref2.float()
    # the comparison means something only if the K-th and (K+1)-th GCA values are not a near-tie: a relative
    # gap well above float32's error on the GCA (about 1e-6 relative after a few blocks)
    ranked = gca.sort(dim=1, descending=True).values
    assert ((ranked[:, k - 1] - ranked[:, k]) / ranked[:, k - 1]).min() > 2e-5
    assert out.selection.kept.sort(dim=1).values.tolist() == kept.sort(dim=1).values.tolist()  # the same cells
    assert sorted(out.selection.full_index[0].tolist()) == sorted(
        (2 * (c // grid1) + dr) * 2 * grid1 + 2 * (c % grid1) + dc
        for c in kept[0].tolist()
        for dr in (0, 1)
        for dc in (0, 1)
    )
    torch.testing.assert_close(out.logits[0], ref1, **tolerance())
    torch.testing.assert_close(out.logits[1], ref2, **tolerance())
    assert inferred.exit_stage.tolist() == [2] * len(images)
    torch.testing.assert_close(inferred.logits, ref2, **tolerance())
    # the stages differ, so a swapped position table or a misplaced fusion would not pass by accident
    assert (ref1 - ref2).abs().max() > 1e-2


def test_whole_image_phase_matches_the_reference_with_the_fine_position_table(tmp_path):
    raw, _, pipe = _imported_pipeline(tmp_path, "cfvit_deit_s", 112, 7)
    pipe.whole_image_stage2 = True
    images = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    double = {n: t.double() for n, t in raw.items()}
    with torch.no_grad():
        out = pipe(images)
        _, ref2, _, _ = reference_cfvit(double, images.double(), whole_image=True)
        _, authors2, _, _ = reference_cfvit(double, images.double(), whole_image=True, fine_position=False)
    torch.testing.assert_close(out.logits[1], ref2.float(), **tolerance())
    # dynvit deliberately adds the fine position table in this phase; the authors' code leaves it out
    assert (ref2 - authors2).abs().max() > 1e-2


def test_cfvit_loss_is_ce_on_fine_plus_kl_to_the_detached_fine_distribution():
    pipe = build_pipeline(load_recipe("quickstart", ["loss.type=ce_kl"]), with_loss=True)
    g = torch.Generator().manual_seed(3)
    coarse, fine = torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g, requires_grad=True)
    target = torch.tensor([0, 3, 9, 1, 1])
    loss = pipe.loss(as_output(coarse, fine), target)
    # the authors' objective: CE(fine, y) + KLDivLoss(batchmean)(log_softmax(coarse), softmax(fine).detach())
    expected = F.cross_entropy(fine, target) + torch.nn.KLDivLoss(reduction="batchmean")(
        coarse.log_softmax(1), fine.detach().softmax(1)
    )
    torch.testing.assert_close(loss, expected, **tolerance())
    (grad,) = torch.autograd.grad(loss, fine)
    (ce_grad,) = torch.autograd.grad(F.cross_entropy(fine, target), fine)
    torch.testing.assert_close(grad, ce_grad, **tolerance())  # no gradient reaches the fine stage through KL


@pytest.mark.parametrize("recipe_name,image_size,tokens", [("cfvit_deit_s", 224, 125), ("cfvit_star_deit_s", 288, 205)])
def test_full_size_recipes_have_cfvit_geometry(recipe_name, image_size, tokens):
    recipe = load_recipe(recipe_name)
    assert recipe.model.image_size == image_size and recipe.model.selector.keep_ratio == 0.5
    assert (recipe.train.epochs, recipe.train.full_image_epochs) == (300, 201)
    with torch.device("meta"):
        pipe = build_pipeline(recipe, with_loss=False)
    assert (pipe.grid1, pipe.grid2) == ((image_size // 32,) * 2, (image_size // 16,) * 2)
    assert pipe.stage2_length == tokens  # 1 + 4 * 25 + 24 at 224; 1 + 4 * 41 + 40 at 288


def test_cfvit_converter_shares_the_lfvit_mapping_and_names_cfvit_in_errors():
    raw = authors_state_dict(9)
    converted = convert_cfvit_state_dict({"model": raw})
    assert set(converted) == set(build_pipeline(tiny_lfvit_recipe("cfvit_star_deit_s", 144)).state_dict())
    assert all(torch.equal(v, converted[k]) for k, v in convert_lfvit_state_dict(raw).items())
    with pytest.raises(CheckpointError, match="not part of the CF-ViT layout: dist_token"):
        convert_cfvit_state_dict(raw | {"dist_token": torch.zeros(1, 1, WIDTH)})


def test_import_cfvit_command_checks_the_recipe_before_writing(tmp_path, capsys):
    overrides = [f"model.backbone.embed_dim={WIDTH}", f"model.backbone.depth={DEPTH}", "model.backbone.num_heads=2"]
    overrides += [f"model.backbone.patch_size={PATCH}", f"model.backbone.num_classes={CLASSES}"]
    torch.save({"model": authors_state_dict(7), "flop": [1.1, 4.0]}, tmp_path / "a.pth")
    out = tmp_path / "a.safetensors"
    assert main(["import-cfvit", str(tmp_path / "a.pth"), str(out), "model.image_size=112", *overrides]) == 0
    printed = capsys.readouterr().out
    assert "CF-ViT with width 32" in printed and "7x7 and 14x14" in printed and "cfvit_deit_s pipeline" in printed
    assert "kept the authors' flop" in printed
    # a 9x9/18x18 checkpoint does not fit the 7x7 recipe: refused before anything is written
    torch.save({"model": authors_state_dict(9)}, tmp_path / "star.pth")
    star_out = tmp_path / "star.safetensors"
    assert main(["import-cfvit", str(tmp_path / "star.pth"), str(star_out), "model.image_size=112", *overrides]) == 2
    err = capsys.readouterr().err
    assert "nothing was written" in err and "other shape" in err
    assert not star_out.exists()
