"""DVT (NeurIPS 2021) against an independent plain-torch reference of the authors' implementation.

Random tiny checkpoints in the authors' layout (``tests/reference_dvt.py``,
written from notes/dvt_facts.md) are imported with the DVT converter and
run at the real 224 px geometry (7x7, 10x10 and 14x14 tokens), so the
patch embeddings, the 23 px padded patches, both resizes and the key
table are all exercised; only widths and depths are tiny.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from dynvit.plugins.dvt import resize_grid, resize_relations
from omegaconf import OmegaConf

from dynvit import build_pipeline, load_recipe
from dynvit.cli import main
from dynvit.weights import convert_authors_state_dict, load_pipeline_state, load_pipeline_weights

sys.path.insert(0, str(Path(__file__).parent))
from reference_dvt import dvt_authors_state_dict, reference_dvt  # noqa: E402

RECIPES = Path(__file__).parents[1] / "recipes"
D, DEPTH, HEADS, CLASSES = 32, 2, 2, 7
TOL = {"atol": 1e-5, "rtol": 1e-5}

# recipe -> (feature reuse, relation reuse): DVT and the authors' three ablation architectures
VARIANTS = {
    "dvt_deit_s": (True, True),
    "ablations/dvt_no_feature_reuse": (False, True),
    "ablations/dvt_no_relation_reuse": (True, False),
    "ablations/dvt_no_reuse": (False, False),
}


def tiny_recipe(name: str, directory: Path) -> Path:
    """The bundled recipe with tiny DeiT widths in every backbone, written as a standalone file.

    Dotlist overrides cannot reach into the ``model.stages`` list, so the
    tiny variant is a file of its own.
    """
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    model = OmegaConf.to_container(recipe.model)
    for section in [model["backbone"], *(s["backbone"] for s in model["stages"] if s.get("backbone"))]:
        section.update(embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES, drop_path_rate=0.0)
    tiny = {"model": {k: model[k] for k in ("image_size", "backbone", "stages")}, "loss": {"type": "ce_ce"}}
    path = directory / f"{name.replace('/', '_')}_tiny.yaml"
    OmegaConf.save(OmegaConf.create(tiny), path)
    return path


def tiny_pipeline(name: str, directory: Path, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    pipe = build_pipeline(load_recipe(tiny_recipe(name, directory)), with_loss=False).eval()
    load_pipeline_state(pipe, convert_authors_state_dict({"model_state_dict": state}, "dvt"), "authors", strict=True)
    return pipe


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def test_resize_grid_by_hand() -> None:
    """2x2 -> nearest 4x4 -> adaptive average pool to 3x3: windows [0, 2), [1, 3), [2, 4) on each axis."""
    maps = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    expected = torch.tensor([[1.0, 1.5, 2.0], [2.0, 2.5, 3.0], [3.0, 3.5, 4.0]])
    torch.testing.assert_close(resize_grid(maps, (3, 3)), expected)
    # leading dimensions are independent maps
    stacked = torch.stack([maps, 10 * maps]).reshape(1, 2, 2, 2)
    torch.testing.assert_close(resize_grid(stacked, (3, 3)), torch.stack([expected, 10 * expected])[None])


def test_resize_relations_keeps_cls_apart() -> None:
    """CLS-CLS copied; CLS row resized over keys, CLS column over queries; patch-patch over both (separable)."""
    u, v = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([5.0, -1.0, 0.5, 2.0])
    maps = torch.zeros(1, 1, 5, 5)
    maps[0, 0, 0, 0] = 7.0
    maps[0, 0, 0, 1:] = v  # CLS query row
    maps[0, 0, 1:, 0] = u  # CLS key column
    maps[0, 0, 1:, 1:] = torch.outer(u, v)
    out = resize_relations(maps, (2, 2), (3, 3))[0, 0]
    ru, rv = resize_grid(u.reshape(2, 2), (3, 3)).flatten(), resize_grid(v.reshape(2, 2), (3, 3)).flatten()
    assert out.shape == (10, 10)
    assert out[0, 0] == 7.0
    torch.testing.assert_close(out[0, 1:], rv)
    torch.testing.assert_close(out[1:, 0], ru)
    torch.testing.assert_close(out[1:, 1:], torch.outer(ru, rv))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_reference(name: str, images: torch.Tensor, tmp_path: Path) -> None:
    feature, relation = VARIANTS[name]
    state = dvt_authors_state_dict(D, DEPTH, HEADS, CLASSES, feature_reuse=feature, relation_reuse=relation)
    pipe = tiny_pipeline(name, tmp_path, state)
    with torch.no_grad():
        logits = pipe(images).logits
    expected = reference_dvt(state, images, feature, relation, num_heads=HEADS)
    assert len(logits) == 3
    for got, want in zip(logits, expected):
        torch.testing.assert_close(got, want, **TOL)
    if feature or relation:  # the reuse paths matter: without them stages 2 and 3 differ
        unreused = reference_dvt(state, images, False, False, num_heads=HEADS)
        assert (logits[2] - unreused[2]).abs().max() > 1e-3


def test_feature_reuse_switched_off_reads_zeros(images: torch.Tensor, tmp_path: Path) -> None:
    """A D+48-wide checkpoint run without the feature hook: the 48 channels are zeros (the reference's rule)."""
    state = dvt_authors_state_dict(D, DEPTH, HEADS, CLASSES)
    recipe = load_recipe(tiny_recipe("dvt_deit_s", tmp_path))
    for stage in recipe.model.stages[1:]:
        stage.hooks = [h for h in stage.hooks if h.type != "dvt_feature_reuse"]
    pipe = build_pipeline(recipe, with_loss=False).eval()
    kept = {k: v for k, v in state.items() if "feature_resuse_mlp" not in k}
    load_pipeline_state(pipe, convert_authors_state_dict(kept, "dvt"), "authors", strict=True)
    with torch.no_grad():
        logits = pipe(images).logits
    for got, want in zip(logits, reference_dvt(state, images, feature_reuse=False)):
        torch.testing.assert_close(got, want, **TOL)


def test_infer_per_exit_thresholds(images: torch.Tensor, tmp_path: Path) -> None:
    """Early exit: a sample stops at the first k with max softmax >= T_k; the last stage takes the rest."""
    state = dvt_authors_state_dict(D, DEPTH, HEADS, CLASSES, seed=3)
    pipe = tiny_pipeline("dvt_deit_s", tmp_path, state)
    batch = torch.cat([images, images.flip(-1)])
    with torch.no_grad():
        every = pipe(batch).logits
    conf = [logits.softmax(-1).amax(-1) for logits in every]
    # thresholds midway between samples' confidences (no ties), so that each exit takes some and leaves some
    first = conf[0].sort().values
    t1 = float(first[-3:-1].mean())
    second = conf[1][conf[0] < t1].sort().values
    middle = len(second) // 2
    t2 = float(second[middle - 1 : middle + 1].mean())
    exit_stage, chosen = [], []
    for i in range(batch.shape[0]):
        k = next((k for k, t in enumerate((t1, t2)) if conf[k][i] >= t), 2)
        exit_stage.append(k + 1)
        chosen.append(every[k][i])
    result = pipe.infer(batch, threshold=[t1, t2])
    assert result.exit_stage.tolist() == exit_stage
    assert set(exit_stage) == {1, 2, 3}
    torch.testing.assert_close(result.logits, torch.stack(chosen), **TOL)
    torch.testing.assert_close(result.stage1_logits, every[0], **TOL)


def test_import_dvt_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = dvt_authors_state_dict(D, DEPTH, HEADS, CLASSES)
    source, out = tmp_path / "dvt.pth.tar", tmp_path / "dvt.safetensors"
    torch.save({"model_state_dict": state, "flops": [0.3, 0.9, 2.0], "dynamic_threshold": torch.rand(59, 3)}, source)
    recipe = tiny_recipe("dvt_deit_s", tmp_path)
    assert main(["import-dvt", str(source), str(out), "--recipe", str(recipe)]) == 0
    printed = capsys.readouterr().out
    assert "DVT with width 32" in printed and "7x7 and 10x10 and 14x14" in printed and "(image 224)" in printed
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["flops"] == [0.3, 0.9, 2.0] and len(info["dynamic_threshold"]) == 59
    assert info["patch_sizes"] == [32, 23, 16]
    pipe = build_pipeline(load_recipe(recipe), with_loss=False).eval()
    assert load_pipeline_weights(pipe, out).exact
    # an ablation checkpoint does not fit the full DVT recipe: refused, nothing written
    ablation = tmp_path / "ablation.pth"
    torch.save({"model_state_dict": dvt_authors_state_dict(D, DEPTH, HEADS, CLASSES, relation_reuse=False)}, ablation)
    refused = tmp_path / "refused.safetensors"
    assert main(["import-dvt", str(ablation), str(refused), "--recipe", str(recipe)]) == 2
    assert "nothing was written" in capsys.readouterr().err and not refused.exists()


def test_converter_key_table() -> None:
    """Every authors' key lands on a dynvit key; hooks are numbered among those present."""
    full = convert_authors_state_dict(dvt_authors_state_dict(D, DEPTH, HEADS, CLASSES), "dvt")
    assert "backbone.model.patch_embed.proj.weight" in full
    assert full["stages.1.backbone.model.blocks.0.mlp.fc1.weight"].shape == (4 * D, D + 48)
    assert "stages.2.hooks.0.mlps.1.1.fc2.weight" in full and "stages.2.hooks.1.conv.2.weight" in full
    relation_only = convert_authors_state_dict(
        dvt_authors_state_dict(D, DEPTH, HEADS, CLASSES, feature_reuse=False), "dvt"
    )
    assert "stages.1.hooks.0.conv.0.weight" in relation_only
    assert not any(".mlps." in k for k in relation_only)
