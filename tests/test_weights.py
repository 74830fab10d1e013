"""Weights: timm/DeiT initialisation, pipeline checkpoints, and the authors' LF-ViT checkpoints.

The LF-ViT import is checked against an independent plain-torch forward of
LF-ViT written here from the authors' raw tensors (no dynvit code), so a
wrong key mapping, a swapped position table or a misplaced fusion shows up
as different logits.
"""

from __future__ import annotations

import argparse
import json
import logging
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tolerance
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

import dynvit.weights as weights
from dynvit.cli import main
from dynvit.pipeline import build_pipeline
from dynvit.recipe import load_recipe
from dynvit.weights import (
    CheckpointError,
    convert_lfvit_state_dict,
    import_lfvit,
    load_backbone_checkpoint,
    load_pipeline_weights,
    read_checkpoint,
    save_pipeline_weights,
)

# -- an authors'-layout LF-ViT checkpoint, tiny ------------------------------------

WIDTH, HEADS, DEPTH, PATCH, CLASSES = 32, 2, 5, 8, 10
# (recipe, image size, stage-1 grid, region m, K = ceil(0.88 m^2) computed by hand)
LFVIT = (
    ("lfvit_deit_s", 112, 7, 5, 22),  # the 224/112 layout at patch 8: 14x14 and 7x7 grids
    ("lfvit_star_deit_s", 144, 9, 8, 57),  # LF-ViT*: 18x18 and 9x9 grids, m = 8
)


def tiny_lfvit_recipe(name: str, image_size: int):
    return load_recipe(
        name,
        [
            f"model.image_size={image_size}",
            f"model.backbone.embed_dim={WIDTH}",
            f"model.backbone.depth={DEPTH}",
            f"model.backbone.num_heads={HEADS}",
            f"model.backbone.patch_size={PATCH}",
            f"model.backbone.num_classes={CLASSES}",
            "model.backbone.drop_path_rate=0.0",
        ],
    )


def authors_state_dict(grid1: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The documented LF-ViT key layout with random values (unit-variance activations, well conditioned)."""
    g = torch.Generator().manual_seed(seed)
    d, h = WIDTH, 4 * WIDTH

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + rand(d, scale=0.1), f"{prefix}.bias": rand(d, scale=0.1)}

    def linear(prefix: str, n_in: int, n_out: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": rand(n_out, n_in, scale=n_in**-0.5), f"{prefix}.bias": rand(n_out, scale=0.1)}

    sd = {
        "cls_token": rand(1, 1, d),
        "pos_embed_list.0": rand(1, 1 + grid1 * grid1, d, scale=0.5),
        "pos_embed_list.1": rand(1, 1 + 4 * grid1 * grid1, d, scale=0.5),
        "patch_embed.proj.weight": rand(d, 3, PATCH, PATCH, scale=1 / (3 * PATCH * PATCH) ** 0.5),
        "patch_embed.proj.bias": rand(d, scale=0.1),
    }
    for i in range(DEPTH):
        p = f"blocks.{i}"
        sd |= norm(f"{p}.norm1") | linear(f"{p}.attn.qkv", d, 3 * d) | linear(f"{p}.attn.proj", d, d)
        sd |= norm(f"{p}.norm2") | linear(f"{p}.mlp.fc1", d, h) | linear(f"{p}.mlp.fc2", h, d)
    sd |= norm("norm") | linear("head", d, CLASSES)
    sd |= norm("reuse_block.0") | linear("reuse_block.1.fc1", d, h) | linear("reuse_block.1.fc2", h, d)
    return sd


# -- LF-ViT from the raw tensors, in plain torch ------------------------------------


def _ln(x, p, name):
    return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-6)


def _lin(x, p, name):
    return F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"])


def _encode(x, p):
    """Blocks with materialised attention, final norm, head on CLS; CLS attention row per block (head mean)."""
    b, n, d = x.shape
    rows = []
    for i in range(DEPTH):
        q, k, v = _lin(_ln(x, p, f"blocks.{i}.norm1"), p, f"blocks.{i}.attn.qkv").reshape(b, n, 3, HEADS, -1).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(d // HEADS)).softmax(-1)
        x = x + _lin((attn @ v).transpose(1, 2).reshape(b, n, d), p, f"blocks.{i}.attn.proj")
        hidden = F.gelu(_lin(_ln(x, p, f"blocks.{i}.norm2"), p, f"blocks.{i}.mlp.fc1"))
        x = x + _lin(hidden, p, f"blocks.{i}.mlp.fc2")
        rows.append(attn[:, :, 0, 1:].mean(1))
    x = _ln(x, p, "norm")
    return _lin(x[:, 0], p, "head"), x, rows


def reference_lfvit(p, images, grid1, m, k, beta=0.99, first_block=3):
    """Eqs. of LF-ViT from the authors' tensors: returns (logits1, logits2, window top-left per sample)."""
    b = images.shape[0]
    pos1, pos2 = p["pos_embed_list.0"], p["pos_embed_list.1"]
    cls = p["cls_token"]
    embed = lambda img: F.conv2d(img, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=PATCH)  # noqa: E731
    # stage 1: bilinear x0.5 (align_corners), 7x7 (or 9x9) table
    low = F.interpolate(images, scale_factor=0.5, mode="bilinear", align_corners=True)
    emb1 = embed(low).flatten(2).transpose(1, 2) + pos1[:, 1:]
    logits1, tokens1, rows = _encode(torch.cat([(cls + pos1[:, :1]).expand(b, -1, -1), emb1], 1), p)
    gca = torch.zeros_like(rows[0])
    for a in rows[first_block:]:
        gca = beta * gca + (1 - beta) * a
    # NGCA window (explicit loops), top-K inside it, 2x2 children on the full grid
    logits2, corners = [], []
    full = embed(images)  # (B, D, 2g, 2g)
    fused = _lin(F.gelu(_lin(_ln(tokens1[:, 1:], p, "reuse_block.0"), p, "reuse_block.1.fc1")), p, "reuse_block.1.fc2")
    fused = fused.transpose(1, 2).reshape(b, -1, grid1, grid1)
    full = full + F.interpolate(fused, scale_factor=2, mode="nearest")
    full = full.flatten(2).transpose(1, 2) + pos2[:, 1:]
    for s in range(b):
        grid = gca[s].reshape(grid1, grid1)
        best, corner = -1.0, None
        for r in range(grid1 - m + 1):
            for c in range(grid1 - m + 1):
                total = grid[r : r + m, c : c + m].sum().item()
                if total > best:
                    best, corner = total, (r, c)
        corners.append(corner)
        cells = [(corner[0] + i) * grid1 + corner[1] + j for i in range(m) for j in range(m)]
        kept = sorted(cells, key=lambda cell: -gca[s, cell].item())[:k]
        children = [
            (2 * (cell // grid1) + dr) * 2 * grid1 + 2 * (cell % grid1) + dc
            for cell in kept
            for dr in (0, 1)
            for dc in (0, 1)
        ]
        reused = [cell for cell in range(grid1 * grid1) if cell not in kept]
        seq = torch.cat([cls[0] + pos2[0, :1], full[s, children], emb1[s, reused]], 0)
        logits2.append(_encode(seq[None], p)[0])
    return logits1, torch.cat(logits2), corners, gca


@pytest.mark.parametrize("recipe_name,image_size,grid1,m,k", LFVIT)
def test_imported_lfvit_matches_a_plain_torch_lfvit(tmp_path, recipe_name, image_size, grid1, m, k):
    raw = authors_state_dict(grid1)
    torch.save({"model": raw, "flops": torch.tensor([1.1, 2.5])}, tmp_path / "lfvit.pth")
    summary = import_lfvit(tmp_path / "lfvit.pth", tmp_path / "lfvit.safetensors")
    assert summary.grids == [grid1, 2 * grid1] and summary.image_size == image_size
    assert (summary.embed_dim, summary.depth, summary.patch_size, summary.num_classes) == (WIDTH, DEPTH, PATCH, CLASSES)

    pipe = build_pipeline(tiny_lfvit_recipe(recipe_name, image_size)).eval()
    load_pipeline_weights(pipe, summary.weights)
    assert pipe.stage2_length == 1 + 4 * k + (grid1 * grid1 - k)

    images = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = pipe(images)
        inferred = pipe.infer(images, threshold=2.0)  # nobody exits: every sample's stage-2 logits
        # the reference runs in float64: the tolerance covers only the pipeline's float32 rounding
        ref1, ref2, corners, gca = reference_lfvit(
            {n: t.double() for n, t in raw.items()}, images.double(), grid1, m, k
        )
    ref1, ref2 = ref1.float(), ref2.float()
    # the comparison means something only if neither the window nor the top-K cut is a near-tie
    sums = F.avg_pool2d(gca.reshape(-1, 1, grid1, grid1), m, stride=1).flatten(1).sort(dim=1, descending=True).values
    assert ((sums[:, 0] - sums[:, 1]) * m * m).min() > 1e-5
    for sample, (row, col) in enumerate(corners):
        inside = gca[sample].reshape(grid1, grid1)[row : row + m, col : col + m].flatten().sort(descending=True).values
        assert inside[k - 1] - inside[k] > 1e-7
    assert out.selection.region[:, :2].tolist() == [list(c) for c in corners]
    torch.testing.assert_close(out.logits[0], ref1, **tolerance())
    torch.testing.assert_close(out.logits[1], ref2, **tolerance())
    torch.testing.assert_close(inferred.logits, ref2, **tolerance())
    # the stage outputs differ, so a swapped position table or fusion would not pass by accident
    assert (ref1 - ref2).abs().max() > 1e-2


def test_converter_reads_sizes_from_tensors_and_names_every_key():
    converted = convert_lfvit_state_dict({"model": authors_state_dict(9)})
    pipe = build_pipeline(tiny_lfvit_recipe("lfvit_star_deit_s", 144))
    assert set(converted) == set(pipe.state_dict())
    assert converted["backbone.stage_pos_embed.9x9"].shape == (1, 82, WIDTH)
    assert converted["backbone.model.pos_embed"].shape == (1, 325, WIDTH)
    assert converted["stages.1.fuser.block.1.fc2.weight"].shape == (WIDTH, 4 * WIDTH)


def test_converter_refuses_foreign_keys_and_a_missing_stage_table():
    raw = authors_state_dict(7)
    with pytest.raises(CheckpointError, match="dist_token"):
        convert_lfvit_state_dict(raw | {"dist_token": torch.zeros(1, 1, WIDTH)})
    del raw["pos_embed_list.0"]
    with pytest.raises(CheckpointError, match="one position table per stage"):
        convert_lfvit_state_dict(raw)


# -- round trips and atomic writes ----------------------------------------------------


def test_import_then_load_round_trips_and_keeps_the_authors_metadata(tmp_path):
    raw = authors_state_dict(7)
    anytime = {"flops": [1.1, 2.2], "acc": [75.0, 80.0]}
    torch.save({"model": raw, "flops": torch.tensor([1.1, 2.5]), "anytime_classification": anytime}, tmp_path / "a.pth")
    summary = import_lfvit(tmp_path / "a.pth", tmp_path / "out.safetensors")
    expected = convert_lfvit_state_dict(raw)

    pipe = build_pipeline(tiny_lfvit_recipe("lfvit_deit_s", 112))
    report = load_pipeline_weights(pipe, tmp_path / "out.safetensors")
    assert report.exact
    state = pipe.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key

    sidecar = json.loads(summary.sidecar.read_text())
    assert sidecar["flops"] == pytest.approx([1.1, 2.5])
    assert sidecar["anytime_classification"] == anytime
    assert sidecar["grids"] == ["7x7", "14x14"]

    # the same weights from a .pth with a 'model' entry and from a training checkpoint folder
    torch.save({"model": state}, tmp_path / "pipe.pth")
    (tmp_path / "ckpt").mkdir()
    save_file(read_checkpoint(tmp_path / "out.safetensors"), tmp_path / "ckpt" / "model.safetensors")
    save_pipeline_weights(pipe, tmp_path / "saved.safetensors")
    for source in (tmp_path / "pipe.pth", tmp_path / "ckpt", tmp_path / "saved.safetensors"):
        other = build_pipeline(tiny_lfvit_recipe("lfvit_deit_s", 112))
        load_pipeline_weights(other, source)
        assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items())


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    torch.save({"model": authors_state_dict(7)}, tmp_path / "a.pth")
    dst = tmp_path / "out" / "lfvit.safetensors"

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        import_lfvit(tmp_path / "a.pth", dst)
    assert list(dst.parent.iterdir()) == []

    # an existing checkpoint survives a failed overwrite untouched
    monkeypatch.undo()
    import_lfvit(tmp_path / "a.pth", dst)
    before = dst.read_bytes()
    monkeypatch.setattr(weights, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        import_lfvit(tmp_path / "a.pth", dst)
    assert dst.read_bytes() == before
    assert sorted(p.name for p in dst.parent.iterdir()) == ["lfvit.json", "lfvit.safetensors"]


def test_strict_load_lists_the_differences_and_non_strict_loads_what_fits(tmp_path):
    pipe = build_pipeline(tiny_lfvit_recipe("lfvit_deit_s", 112))
    state = dict(pipe.state_dict())
    del state["stages.1.fuser.block.0.weight"]
    state["backbone.model.dist_token"] = torch.zeros(1, 1, WIDTH)
    state["backbone.model.head.weight"] = torch.ones(3, WIDTH)
    torch.save(state, tmp_path / "bad.pth")

    other = build_pipeline(tiny_lfvit_recipe("lfvit_deit_s", 112))
    with pytest.raises(CheckpointError) as error:
        load_pipeline_weights(other, tmp_path / "bad.pth")
    message = str(error.value)
    assert "missing from the checkpoint (1): stages.1.fuser.block.0.weight" in message
    assert "not in the pipeline (1): backbone.model.dist_token" in message
    assert "backbone.model.head.weight: checkpoint (3, 32) vs pipeline (10, 32)" in message

    report = load_pipeline_weights(other, tmp_path / "bad.pth", strict=False)
    assert report.missing == ["stages.1.fuser.block.0.weight"] and report.mismatched == ["backbone.model.head.weight"]
    assert torch.equal(other.backbone.model.blocks[1].mlp.fc1.weight, pipe.backbone.model.blocks[1].mlp.fc1.weight)
    assert not torch.equal(other.backbone.model.head.weight, pipe.backbone.model.head.weight)


def test_import_command_converts_and_proves_the_fit(tmp_path, capsys):
    torch.save({"model": authors_state_dict(7)}, tmp_path / "a.pth")
    overrides = [f"model.image_size={112}", f"model.backbone.embed_dim={WIDTH}", f"model.backbone.depth={DEPTH}"]
    overrides += [f"model.backbone.num_heads={HEADS}", f"model.backbone.patch_size={PATCH}"]
    overrides += [f"model.backbone.num_classes={CLASSES}"]
    out = tmp_path / "b.safetensors"
    assert main(["import-lfvit", str(tmp_path / "a.pth"), str(out), *overrides]) == 0
    printed = capsys.readouterr().out
    assert "7x7 and 14x14" in printed and "loads it strictly" in printed
    # a recipe of another width does not fit: the command says so before writing, and OUT stays as it was
    written = out.read_bytes()
    torch.save({"model": authors_state_dict(8)}, tmp_path / "a.pth")
    narrower = [o.replace(f"embed_dim={WIDTH}", "embed_dim=16") for o in overrides]
    assert main(["import-lfvit", str(tmp_path / "a.pth"), str(out), *narrower]) == 2
    err = capsys.readouterr().err
    assert "nothing was written" in err and "other shape" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == written


# -- timm / DeiT backbone initialisation ---------------------------------------------


def tiny_timm_vit(num_classes: int = 7):
    """A timm ViT trained at 64px (8x8 grid): the 'pretrained' checkpoint."""
    torch.manual_seed(3)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=num_classes
    )
    with torch.no_grad():
        model.pos_embed.normal_()  # make the table non-trivial, so resampling is visible
    return model


def quickstart_with(checkpoint, image_size=96):
    """Tiny LF-ViT (3 blocks) at 96px (12x12 full grid, 6x6 stage-1 grid), 10 classes, from a backbone checkpoint."""
    return build_pipeline(
        load_recipe(
            "quickstart",
            [
                "model.backbone.depth=3",
                "model.backbone.embed_dim=32",
                "model.backbone.num_heads=2",
                f"model.image_size={image_size}",
                f"model.backbone.checkpoint={checkpoint}",
            ],
        )
    )


@pytest.mark.parametrize("fmt", ["pth_model_key", "bare_pth", "safetensors"])
def test_backbone_checkpoint_at_another_resolution_loads_and_rederives_the_stage_table(tmp_path, fmt, caplog):
    source = tiny_timm_vit()
    state = source.state_dict()
    path = tmp_path / ("ckpt.safetensors" if fmt == "safetensors" else "ckpt.pth")
    if fmt == "pth_model_key":
        torch.save({"model": state, "epoch": 300}, path)
    elif fmt == "bare_pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, path)

    with caplog.at_level(logging.INFO, logger="dynvit.weights"):
        pipe = quickstart_with(path)
    backbone = pipe.backbone
    expected_full = resample_abs_pos_embed(state["pos_embed"], new_size=[12, 12], num_prefix_tokens=1)
    torch.testing.assert_close(backbone.model.pos_embed.data, expected_full)
    expected_stage1 = resample_abs_pos_embed(expected_full, new_size=[6, 6], old_size=[12, 12], num_prefix_tokens=1)
    torch.testing.assert_close(backbone.stage_pos_embed["6x6"].data, expected_stage1)
    assert torch.equal(backbone.model.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    assert torch.equal(backbone.model.cls_token, state["cls_token"])
    # the 7-class head does not fit 10 classes: left out, and said so
    assert backbone.model.head.weight.shape == (10, 32)
    assert "head.weight" in caplog.text and "class count differs" in caplog.text
    assert "pos_embed (1, 65, 32) -> (1, 145, 32)" in caplog.text


def test_backbone_checkpoint_reports_missing_and_unexpected_keys(tmp_path, caplog):
    state = tiny_timm_vit(num_classes=10).state_dict()
    del state["norm.weight"]
    state["pre_extra.weight"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "ckpt.pth")
    pipe = quickstart_with(tmp_path / "ckpt.pth")
    report = load_backbone_checkpoint(pipe.backbone, tmp_path / "ckpt.pth")
    assert report.missing == ["norm.weight"]
    assert report.unexpected == ["pre_extra.weight"]
    assert report.dropped == []  # same class count: the head loads
    assert torch.equal(pipe.backbone.model.head.weight, state["head.weight"])
    assert "missing keys kept as initialised: norm.weight" in caplog.text
    assert "unexpected keys ignored: pre_extra.weight" in caplog.text


def test_unsafe_or_non_tensor_checkpoints_are_refused(tmp_path):
    pipe = quickstart_with("null", image_size=64)
    sd = tiny_timm_vit().state_dict()
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "deit_train.pth")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_backbone_checkpoint(pipe.backbone, tmp_path / "deit_train.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list, not a dictionary of tensors"):
        load_backbone_checkpoint(pipe.backbone, tmp_path / "list.pth")
    torch.save({"model": {"blocks.0.norm1.weight": [1.0, 2.0]}}, tmp_path / "lists.pth")
    with pytest.raises(CheckpointError, match=r"'blocks.0.norm1.weight' \(list\)"):
        load_backbone_checkpoint(pipe.backbone, tmp_path / "lists.pth")
    wide = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=48, depth=3, num_heads=2)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match="another architecture"):
        load_backbone_checkpoint(pipe.backbone, tmp_path / "wide.pth")


@pytest.mark.parametrize("layout", ["weights_file", "run_folder"])
def test_backbone_starts_from_a_dynvit_run(tmp_path, layout):
    # how the quickstart LF-ViT starts from its trained full-resolution baseline (train.init_backbone)
    torch.manual_seed(5)
    baseline = build_pipeline(
        load_recipe(
            "quickstart",
            ["model.backbone.depth=3", "model.backbone.embed_dim=32", "model.backbone.num_heads=2", "model.stages=1"],
        )
    )
    with torch.no_grad():
        baseline.backbone.model.pos_embed.normal_()
    if layout == "weights_file":
        path = save_pipeline_weights(baseline, tmp_path / "baseline.safetensors")
    else:
        path = tmp_path / "run"
        save_pipeline_weights(baseline, path / "checkpoints" / "best" / "model.safetensors")
    pipe = quickstart_with("null", image_size=64)
    report = load_backbone_checkpoint(pipe.backbone, path)
    assert report.missing == report.unexpected == report.dropped == []
    source = baseline.backbone.model.state_dict()
    for key, value in pipe.backbone.model.state_dict().items():
        assert torch.equal(value, source[key]), key
    # the half-resolution table is re-derived from the loaded full-resolution one
    expected = resample_abs_pos_embed(source["pos_embed"], new_size=[4, 4], old_size=[8, 8], num_prefix_tokens=1)
    torch.testing.assert_close(pipe.backbone.stage_pos_embed["4x4"].data, expected)
