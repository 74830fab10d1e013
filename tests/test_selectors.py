"""Region selectors on hand-made GCA grids."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tolerance
from dynvit.plugins.selectors import (
    MaxGCASelector,
    MinGCASelector,
    NegativeNGCASelector,
    NGCASelector,
    RandomSelector,
    TopKGCASelector,
    children,
    complement,
    global_class_attention,
    window_sums,
)

from dynvit.pipeline import parent_index
from dynvit.stages import Stage1Output


def stage1_from_grid(gca: torch.Tensor) -> Stage1Output:
    """A stage-1 output whose only class attention is ``gca`` (B, rows, cols) at block 3."""
    b, rows, cols = gca.shape
    n = rows * cols
    return Stage1Output(
        logits=torch.zeros(b, 10),
        tokens=torch.zeros(b, 1 + n, 4),
        class_attention={3: gca.reshape(b, n)},
        embeddings=torch.zeros(b, n, 4),
        grid=(rows, cols),
    )


def select(selector, gca, grid2=None):
    rows, cols = gca.shape[-2:]
    return selector(stage1_from_grid(gca), grid2 or (2 * rows, 2 * cols))


def test_gca_is_the_moving_average_of_eq8():
    a = {3: torch.tensor([[1.0, 0.0]]), 4: torch.tensor([[0.0, 1.0]]), 5: torch.tensor([[2.0, 2.0]])}
    beta = 0.5
    # g3 = 0.5 * a3; g4 = 0.5 * g3 + 0.5 * a4; g5 = 0.5 * g4 + 0.5 * a5
    g3 = torch.tensor([[0.5, 0.0]])
    g4 = 0.5 * g3 + torch.tensor([[0.0, 0.5]])
    g5 = 0.5 * g4 + torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(global_class_attention(a, [3, 4, 5], beta), g5, **tolerance())
    torch.testing.assert_close(global_class_attention(a, [3, 4, 5], 0.0), a[5], **tolerance())


def test_window_sums_are_box_filter_sums():
    gca = torch.arange(16.0).reshape(1, 4, 4)
    sums = window_sums(gca.reshape(1, 16), (4, 4), 3)
    expected = torch.tensor(
        [[sum(gca[0, r : r + 3, c : c + 3].flatten().tolist()) for c in range(2)] for r in range(2)]
    )
    torch.testing.assert_close(sums[0], expected, **tolerance())


def test_ngca_picks_the_window_with_the_largest_sum():
    gca = torch.zeros(1, 7, 7)
    gca[0, 4:7, 1:4] = 1.0  # a hot 3x3 block
    gca[0, 0, 6] = 2.5  # a single hotter token elsewhere, but its neighbourhood is cold
    sel = select(NGCASelector(region=3, alpha=1.0), gca)
    assert sel.region.tolist() == [[4, 1, 3, 3]]
    assert sorted(sel.kept[0].tolist()) == sorted(r * 7 + c for r in range(4, 7) for c in range(1, 4))


def test_ngca_ties_resolve_to_the_first_window_in_row_major_order():
    gca = torch.ones(1, 7, 7)
    sel = select(NGCASelector(region=5), gca)
    assert sel.region.tolist() == [[0, 0, 5, 5]]


def test_ngca_at_grid_edge_and_corner():
    gca = torch.zeros(2, 7, 7)
    gca[0, 6, 6] = 1.0  # bottom-right corner
    gca[1, 3, 0] = 1.0  # left edge, middle row
    sel = select(NGCASelector(region=5), gca)
    assert sel.region[0].tolist() == [2, 2, 5, 5]  # the windows containing (6, 6) all start at (2, 2)
    assert sel.region[1].tolist()[1] == 0 and sel.region[1].tolist()[0] <= 3 <= sel.region[1].tolist()[0] + 4


def test_ngca_with_m_one_is_the_argmax_token_and_m_grid_is_everything():
    gca = torch.rand(3, 7, 7, generator=torch.Generator().manual_seed(0))
    one = select(NGCASelector(region=1, alpha=1.0), gca)
    assert one.kept[:, 0].tolist() == gca.reshape(3, -1).argmax(1).tolist()
    whole = select(NGCASelector(region=7, alpha=1.0), gca)
    assert whole.region.tolist() == [[0, 0, 7, 7]] * 3
    assert whole.reuse_index.shape == (3, 0)
    assert sorted(whole.full_index[0].tolist()) == list(range(196))


def test_region_larger_than_grid_is_refused():
    with pytest.raises(ValueError, match="does not fit the stage-1 grid 7x7"):
        select(NGCASelector(region=8), torch.rand(1, 7, 7))


def test_topk_and_child_mapping_by_hand():
    # 4x4 grid, window m=2, alpha=0.75 -> K = 3 of the 4 window tokens
    gca = torch.zeros(1, 4, 4)
    gca[0, 1, 2], gca[0, 1, 3], gca[0, 2, 2], gca[0, 2, 3] = 0.9, 0.5, 0.7, 0.1
    sel = select(NGCASelector(region=2, alpha=0.75), gca)
    assert sel.region.tolist() == [[1, 2, 2, 2]]
    # kept by GCA, highest first: (1,2)=6, (2,2)=10, (1,3)=7
    assert sel.kept.tolist() == [[6, 10, 7]]
    # children on the 8x8 grid: (r, c) -> (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1)
    expected = []
    for r, c in [(1, 2), (2, 2), (1, 3)]:
        expected += [(2 * r) * 8 + 2 * c, (2 * r) * 8 + 2 * c + 1, (2 * r + 1) * 8 + 2 * c, (2 * r + 1) * 8 + 2 * c + 1]
    assert sel.full_index.tolist() == [expected]
    assert sel.reuse_index.tolist() == [[i for i in range(16) if i not in (6, 10, 7)]]


def test_k_is_ceil_alpha_m_squared():
    assert NGCASelector(region=5, alpha=0.88).num_kept == 22
    assert NGCASelector(region=8, alpha=0.88).num_kept == 57
    assert NGCASelector(region=4, alpha=0.88).num_kept == math.ceil(0.88 * 16) == 15
    assert NGCASelector(region=6, alpha=0.88).num_kept == 32


def test_children_parents_round_trip_and_match_nearest_upsampling():
    kept = torch.tensor([[0, 8, 48, 23]])
    kids = children(kept, (7, 7), (14, 14))
    parents = parent_index(kids, (7, 7), (14, 14)).reshape(1, 4, 4)
    assert torch.equal(parents, kept[:, :, None].expand(1, 4, 4))
    # parent_index is the index map of nearest x2 upsampling (what the fuser relies on)
    grid = torch.arange(49.0).reshape(1, 1, 7, 7)
    up = torch.nn.functional.interpolate(grid, scale_factor=2, mode="nearest").flatten()
    assert torch.equal(parent_index(torch.arange(196), (7, 7), (14, 14)), up.long())


def test_complement_is_sorted_and_disjoint():
    kept = torch.tensor([[5, 1, 3], [0, 2, 4]])
    rest = complement(kept, 7)
    assert rest.tolist() == [[0, 2, 4, 6], [1, 3, 5, 6]]


def test_negative_ngca_picks_the_minimum_sum_window():
    gca = torch.ones(1, 7, 7)
    gca[0, 0:3, 4:7] = 0.0
    pos = select(NGCASelector(region=3), gca)
    neg = select(NegativeNGCASelector(region=3), gca)
    assert neg.region.tolist() == [[0, 4, 3, 3]]
    assert pos.region.tolist() != neg.region.tolist()


def test_max_and_min_gca_windows_centre_on_the_extreme_tokens():
    gca = torch.full((1, 7, 7), 0.5)
    gca[0, 3, 3] = 1.0  # max in the middle
    gca[0, 0, 6] = 0.0  # min in the top-right corner
    max_sel = select(MaxGCASelector(region=3), gca)
    min_sel = select(MinGCASelector(region=3), gca)
    assert max_sel.region.tolist() == [[2, 2, 3, 3]]
    assert min_sel.region.tolist() == [[0, 4, 3, 3]]  # clamped into the grid, still contains (0, 6)


def test_max_gca_differs_from_ngca_when_the_peak_is_isolated():
    gca = torch.zeros(1, 7, 7)
    gca[0, 0, 0] = 1.0
    gca[0, 4:7, 4:7] = 0.4
    assert select(MaxGCASelector(region=3), gca).region.tolist() == [[0, 0, 3, 3]]
    assert select(NGCASelector(region=3), gca).region.tolist() == [[4, 4, 3, 3]]


def test_random_selector_is_reproducible_and_varies():
    gca = torch.rand(16, 7, 7, generator=torch.Generator().manual_seed(0))
    a = select(RandomSelector(region=5, seed=1), gca).region
    b = select(RandomSelector(region=5, seed=1), gca).region
    c = select(RandomSelector(region=5, seed=2), gca).region
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(r) for r in a.tolist()}) > 1
    assert a[:, :2].min() >= 0 and a[:, :2].max() <= 2


def test_topk_gca_takes_the_global_top_tokens_without_a_window():
    gca = torch.zeros(1, 7, 7)
    gca[0, 0, 0], gca[0, 6, 6], gca[0, 3, 0] = 3.0, 2.0, 1.0
    sel = select(TopKGCASelector(region=2, alpha=0.75), gca)
    assert sel.kept.tolist() == [[0, 48, 21]]
    assert sel.region.tolist() == [[0, 0, 7, 7]]  # the bounding box of the kept tokens


def test_topk_gca_keep_ratio_is_cfvit_k_by_hand():
    # CF-ViT: K = ceil(0.5 * cells): 7x7 -> ceil(24.5) = 25, 9x9 -> ceil(40.5) = 41, 3x3 -> ceil(4.5) = 5
    assert TopKGCASelector(keep_ratio=0.5).kept_count((7, 7)) == 25
    assert TopKGCASelector(keep_ratio=0.5).kept_count((9, 9)) == 41
    assert TopKGCASelector(keep_ratio=0.5).num_tokens((7, 7), (14, 14), depth=12) == (100, 24)  # 1 + 100 + 24 = 125
    assert TopKGCASelector(keep_ratio=0.5).num_tokens((9, 9), (18, 18), depth=12) == (164, 40)  # 1 + 164 + 40 = 205
    assert TopKGCASelector(keep_ratio=0.2).kept_count((5, 5)) == 5  # exactly 5.0: no rounding up to 6
    # region/alpha play no part with keep_ratio: a window larger than the grid is no error
    sel = TopKGCASelector(region=9, alpha=0.1, keep_ratio=0.5)
    # a 3x3 grid, GCA by hand: the 5 largest are cells 7 (0.9), 2 (0.8), 3 (0.7), 0 (0.6), 8 (0.5)
    gca = torch.tensor([[[0.6, 0.1, 0.8], [0.7, 0.2, 0.3], [0.4, 0.9, 0.5]]])
    out = select(sel, gca)
    assert out.kept.tolist() == [[7, 2, 3, 0, 8]]
    assert out.reuse_index.tolist() == [[1, 4, 5, 6]]
    # 2x2 children on the 6x6 grid, per kept cell: (r, c) -> 6 * 2r + 2c + {0, 1, 6, 7}
    assert out.full_index.tolist() == [[26, 27, 32, 33, 4, 5, 10, 11, 12, 13, 18, 19, 0, 1, 6, 7, 28, 29, 34, 35]]
    assert out.region.tolist() == [[0, 0, 3, 3]]
    with pytest.raises(ValueError, match="keep_ratio"):
        TopKGCASelector(keep_ratio=0.0)


def test_topk_gca_without_keep_ratio_keeps_the_ngca_count():
    assert TopKGCASelector().kept_count((7, 7)) == 22  # ceil(0.88 * 25), as before
    assert TopKGCASelector().num_tokens((7, 7), (14, 14), depth=12) == (88, 27)
    with pytest.raises(ValueError, match="does not fit"):
        TopKGCASelector(region=8).num_tokens((7, 7), (14, 14), depth=12)


@pytest.mark.parametrize(
    "selector", [NGCASelector, NegativeNGCASelector, MaxGCASelector, MinGCASelector, TopKGCASelector]
)
def test_selectors_are_batch_independent(selector):
    gca = torch.rand(5, 9, 9, generator=torch.Generator().manual_seed(3))
    sel = select(selector(region=4), gca)
    for i in range(5):
        alone = select(selector(region=4), gca[i : i + 1])
        assert torch.equal(alone.full_index[0], sel.full_index[i])
        assert torch.equal(alone.reuse_index[0], sel.reuse_index[i])


@pytest.mark.parametrize(
    "selector",
    [
        NGCASelector(region=3),
        RandomSelector(region=4, alpha=0.5),
        TopKGCASelector(region=2),
        TopKGCASelector(keep_ratio=0.5),
        MaxGCASelector(region=5),
    ],
)
def test_declared_token_counts_match_the_selection(selector):
    gca = torch.rand(2, 7, 7, generator=torch.Generator().manual_seed(4))
    sel = select(selector, gca)
    assert selector.num_tokens((7, 7), (14, 14), depth=6) == (sel.full_index.shape[1], sel.reuse_index.shape[1])
