"""Recipes: inheritance, overrides, validation messages, and ``dynvit show``."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from dynvit import RecipeError, build_pipeline, load_recipe
from dynvit.cli import main
from dynvit.recipe import RecipeWarning, bundled_recipe_names


def write(path, text):
    path.write_text(text)
    return path


def test_every_bundled_recipe_loads():
    names = bundled_recipe_names()
    assert {"lfvit_deit_s", "lfvit_star_deit_s", "deit_s", "quickstart"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        stages = recipe.model.stages
        assert stages in (1, 2) if isinstance(stages, int) else len(stages) >= 2  # a list of stages (DVT)


def test_base_inheritance_and_override_order(tmp_path):
    star = load_recipe("lfvit_star_deit_s")
    assert star.model.image_size == 288
    assert star.model.selector.region == 8
    assert star.model.selector.alpha == 0.88  # inherited from the base
    child = write(tmp_path / "child.yaml", "base: lfvit_star_deit_s.yaml\nmodel: {selector: {alpha: 0.5}}\n")
    recipe = load_recipe(child, ["model.selector.alpha=0.7"])
    assert recipe.model.selector.alpha == 0.7  # the command line wins over the file
    assert recipe.model.selector.region == 8


def test_relative_base_next_to_the_file(tmp_path):
    write(tmp_path / "parent.yaml", "model: {image_size: 96}\n")
    child = write(tmp_path / "child.yaml", "base: parent.yaml\nmodel: {stages: 1}\n")
    recipe = load_recipe(child)
    assert recipe.model.image_size == 96 and recipe.model.stages == 1


def test_switching_plugin_type_keeps_shared_arguments_and_drops_the_rest():
    with pytest.warns(RecipeWarning, match="dropping arguments it does not take: region, alpha, beta, first_block"):
        recipe = load_recipe("lfvit_deit_s", ["model.selector.type=full_image"])
    assert dict(recipe.model.selector) == {"type": "full_image"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        random = load_recipe("lfvit_star_deit_s", ["model.selector.type=random"])
    assert random.model.selector.region == 8 and random.model.selector.type == "random"


def test_unknown_plugin_lists_the_registered_ones():
    with pytest.raises(RecipeError) as err:
        load_recipe("lfvit_deit_s", ["model.selector.type=ngcaa"])
    message = str(err.value)
    assert "unknown region_selector plugin 'ngcaa'" in message
    assert "registered: full_image, max_gca, min_gca, negative_ngca, ngca, random, topk_gca" in message
    assert "command-line overrides" in message


def test_unknown_plugin_argument_names_key_file_and_accepted(tmp_path):
    bad = write(tmp_path / "bad.yaml", "base: lfvit_deit_s.yaml\nmodel: {selector: {regoin: 4}}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    message = str(err.value)
    assert str(bad) in message
    assert "model.selector.regoin: unknown key for region_selector 'ngca'" in message
    assert "accepted keys: region, alpha, beta, first_block" in message


def test_unknown_section_key_names_the_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", "model: {imgae_size: 224}\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: model\.imgae_size"):
        load_recipe(bad)


def test_bad_types_are_named(tmp_path):
    with pytest.raises(RecipeError, match=r"model\.image_size"):
        load_recipe(write(tmp_path / "a.yaml", "model: {image_size: big}\n"))
    with pytest.raises(RecipeError, match=r"model\.selector\.region: expected int, got 'five'"):
        load_recipe("lfvit_deit_s", ["model.selector.region=five"])
    with pytest.raises(RecipeError, match=r"model\.exit\.threshold: expected float"):
        load_recipe("lfvit_deit_s", ["model.exit.threshold=high"])


def test_missing_required_value(tmp_path):
    template = write(tmp_path / "m.yaml", "model:\n  selector:\n    type: ngca\n    region: ???\n")
    with pytest.raises(RecipeError, match=r"m\.yaml: required values not set: model\.selector\.region"):
        load_recipe(template)
    assert load_recipe(template, ["model.selector.region=3"]).model.selector.region == 3


def test_missing_file_lists_bundled_recipes():
    with pytest.raises(RecipeError, match=r"recipe file not found: nope\.yaml.*lfvit_deit_s"):
        load_recipe("nope.yaml")


def test_missing_base_and_cycles(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found: gone.yaml"):
        load_recipe(write(tmp_path / "x.yaml", "base: gone.yaml\n"))
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_pipeline_supplied_arguments_cannot_be_set(tmp_path):
    with pytest.raises(RecipeError, match=r"model\.fuser\.embed_dim is set by the pipeline"):
        load_recipe("lfvit_deit_s", ["model.fuser.embed_dim=8"])


def test_malformed_override():
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe("lfvit_deit_s", ["model.selector.region"])


def test_show_prints_the_resolved_recipe(capsys):
    assert main(["show", "lfvit_star_deit_s", "model.selector.type=random"]) == 0
    out = capsys.readouterr().out
    assert "type: random" in out and "region: 8" in out and "image_size: 288" in out
    assert "base:" not in out


def test_show_exits_nonzero_with_the_message():
    proc = subprocess.run(
        [sys.executable, "-m", "dynvit.cli", "show", "lfvit_deit_s", "model.selector.type=nope"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "unknown region_selector plugin 'nope'" in proc.stderr


def test_ablation_is_one_override_and_builds():
    recipe = load_recipe(
        "quickstart",
        ["model.backbone.depth=2", "model.backbone.embed_dim=16", "model.backbone.num_heads=2"]
        + ["model.selector.type=negative_ngca", "model.selector.first_block=0", "loss.type=ce_ce"],
    )
    pipe = build_pipeline(recipe)
    assert type(pipe.selector).__name__ == "NegativeNGCASelector"
    assert type(pipe.loss).__name__ == "CEPlusCE"


THREE_STAGES = Path(__file__).with_name("tiny_three_stages.yaml")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.stages.0.exit=null"], r"model.stages.0 needs an exit policy"),
        (["model.stages.2.exit.type=confidence"], r"model.stages.2.exit: the last stage has no exit policy"),
        (["model.stages.1.foo=1"], r"model.stages.1.foo: unknown stage key; accepted keys: backbone, downsampler"),
        (["model.exit.threshold=0.3"], r"model.exit is read only by the two-stage shorthand .* model.stages.0.exit"),
        (["model.stages.1.exit.type=sometimes"], r"model.stages.1.exit.type: unknown exit_policy plugin 'sometimes'"),
        (["model.stages.1.backbone.depht=3"], r"model.stages.1.backbone.depht: unknown key for backbone"),
        (["model.stages.5.exit.threshold=0.3"], r"command-line overrides: model.stages.5.exit.threshold"),
        (["model.stages=3"], r"model.stages must be 1, 2 or a list of stages"),
    ],
)
def test_stage_list_mistakes_name_the_key(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(THREE_STAGES, overrides)


def test_an_override_through_the_stage_list_changes_that_stage_only():
    recipe = load_recipe(THREE_STAGES, ["model.stages.1.exit.threshold=0.25", "model.stages.2.backbone.depth=3"])
    assert [s.get("exit", {}).get("threshold") for s in recipe.model.stages] == [0.5, 0.25, None]
    assert [s.get("backbone", {}).get("depth") for s in recipe.model.stages] == [None, 2, 3]
