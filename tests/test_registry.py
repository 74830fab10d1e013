"""Plugin registries: by name, by dotted path, by entry point."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap

import pytest
import torch

from dynvit import PluginError, build_pipeline, load_recipe, registry
from dynvit.registry import STAGE_KINDS, load_entry_points

PLUGIN_SOURCE = textwrap.dedent(
    """
    from dynvit.stages import Selection, RegionSelector

    class CornerSelector(RegionSelector):
        '''Always the top-left window.'''

        def __init__(self, region: int = 2) -> None:
            super().__init__()
            self.region = region

        def forward(self, stage1, grid2):
            from dynvit.plugins.selectors import children, complement, window_cells
            b = stage1.logits.shape[0]
            corner = stage1.logits.new_zeros(b, 2, dtype=__import__("torch").long)
            kept = window_cells(corner, self.region, stage1.grid)
            n1 = stage1.grid[0] * stage1.grid[1]
            region = __import__("torch").tensor([0, 0, self.region, self.region]).expand(b, 4)
            return Selection(children(kept, stage1.grid, grid2), complement(kept, n1), region, kept)

    class SizedCorner(CornerSelector):
        def __init__(self, region: int) -> None:
            super().__init__(region)
    """
)


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    pkg = tmp_path / "my_dynvit_ext"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "selectors.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("my_dynvit_ext")]:
        del sys.modules[name]


def test_every_kind_has_at_least_two_plugins_except_backbone():
    for kind in STAGE_KINDS:
        names = registry(kind).names()
        assert len(names) >= (1 if kind == "backbone" else 2), (kind, names)


def test_lookup_by_name():
    assert registry("region_selector").get("ngca").__name__ == "NGCASelector"
    assert registry("loss").get("ce_kl").__name__ == "CEPlusKL"


def test_unknown_name_lists_registered():
    with pytest.raises(PluginError, match=r"unknown fuser plugin 'mlp'; registered: mlp_upsample, none"):
        registry("fuser").get("mlp")


def test_duplicate_registration_is_refused():
    class Other(torch.nn.Module):
        pass

    with pytest.raises(PluginError, match="'ngca' is taken"):
        registry("region_selector").register("ngca")(Other)


def test_dotted_path_plugin_used_from_a_recipe(user_package):
    recipe = load_recipe(
        "quickstart",
        ["model.backbone.depth=2", "model.backbone.embed_dim=16", "model.backbone.num_heads=2"]
        + ["model.selector.type=my_dynvit_ext.selectors:CornerSelector"],
    )
    pipe = build_pipeline(recipe).eval()
    out = pipe(torch.randn(2, 3, 64, 64))
    assert out.selection.region.tolist() == [[0, 0, 2, 2]] * 2
    # the contract's default token count (a dummy run) agrees with what stage 2 received
    assert pipe.stage2_length == 1 + out.selection.full_index.shape[1] + out.selection.reuse_index.shape[1] == 29


def test_dotted_path_errors_are_clear(user_package):
    with pytest.raises(PluginError, match="has no attribute 'Nope'"):
        registry("region_selector").get("my_dynvit_ext.selectors:Nope")
    with pytest.raises(PluginError, match="cannot import module 'no_such_pkg'"):
        registry("region_selector").get("no_such_pkg:X")


def test_entry_point_registration(user_package):
    dist = user_package / "my_dynvit_ext-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-dynvit-ext\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dynvit.plugins]\nmine = my_dynvit_ext.registered\n")
    (user_package / "my_dynvit_ext" / "registered.py").write_text(
        "from dynvit.registry import register\n"
        "from my_dynvit_ext.selectors import CornerSelector\n"
        "register('region_selector', 'corner')(CornerSelector)\n"
    )
    names = [ep.name for ep in importlib.metadata.entry_points(group="dynvit.plugins")]
    assert "mine" in names and "builtin" in names
    load_entry_points(force=True)
    assert registry("region_selector").get("corner").__name__ == "CornerSelector"
    registry("region_selector")._classes.pop("corner")


def test_required_plugin_argument_is_named(user_package):
    from dynvit import RecipeError

    with pytest.raises(RecipeError, match=r"model\.selector\.region is required by region_selector"):
        load_recipe("deit_s", ["model.selector.type=my_dynvit_ext.selectors:SizedCorner"])
