"""The selection machinery alone: GCA accumulation, NGCA and top-K on a batch of stage-1 class-attention maps.

Group ``select`` compares the vectorised selectors (one box filter, one
argmax, batched gathers) at m = 4, 5, 6 with a reference that loops in
Python over samples and windows, the shape of the authors' code.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from dynvit.registry import registry
from dynvit.stages import Selection, Stage1Output

BATCH, GRID, GRID2, DEPTH, DIM = 1024, (7, 7), (14, 14), 12, 8


@pytest.fixture(scope="module")
def stage1() -> Stage1Output:
    generator = torch.Generator().manual_seed(0)
    cells = GRID[0] * GRID[1]
    attention = {b: torch.rand(BATCH, cells, generator=generator).softmax(-1) for b in range(3, DEPTH)}
    return Stage1Output(
        logits=torch.zeros(BATCH, 10),
        tokens=torch.zeros(BATCH, 1 + cells, DIM),
        class_attention=attention,
        embeddings=torch.zeros(BATCH, cells, DIM),
        grid=GRID,
    )


def build_selector(kind: str, region: int):
    return registry("region_selector").build({"type": kind, "region": region})


@pytest.mark.benchmark(group="select")
@pytest.mark.parametrize("kind", ["ngca", "max_gca", "topk_gca"])
@pytest.mark.parametrize("region", [4, 5, 6])
def test_selector(benchmark, stage1, kind, region):
    selector = build_selector(kind, region)
    selection = benchmark.pedantic(lambda: selector(stage1, GRID2), rounds=20, iterations=1, warmup_rounds=2)
    assert selection.full_index.shape == (BATCH, 4 * selector.num_kept)


def looped_ngca(stage1: Stage1Output, region: int, alpha: float = 0.88, beta: float = 0.99) -> Tensor:
    """Per-sample, per-window NGCA written with Python loops: the kept stage-1 cells, (B, K)."""
    rows, cols = stage1.grid
    keep = math.ceil(round(alpha * region * region, 6))
    kept = []
    for i in range(stage1.logits.shape[0]):
        g = torch.zeros(rows * cols)
        for block in sorted(stage1.class_attention):
            g = beta * g + (1 - beta) * stage1.class_attention[block][i]
        grid = g.reshape(rows, cols)
        best, corner = -1.0, (0, 0)
        for r in range(rows - region + 1):
            for c in range(cols - region + 1):
                total = grid[r : r + region, c : c + region].sum().item()
                if total > best:
                    best, corner = total, (r, c)
        window = grid[corner[0] : corner[0] + region, corner[1] : corner[1] + region].reshape(-1)
        top = window.topk(keep).indices
        kept.append((corner[0] + top // region) * cols + corner[1] + top % region)
    return torch.stack(kept)


@pytest.mark.benchmark(group="select")
def test_python_loop_reference(benchmark, stage1):
    kept = benchmark.pedantic(lambda: looped_ngca(stage1, 5), rounds=1, iterations=1, warmup_rounds=0)
    selection: Selection = build_selector("ngca", 5)(stage1, GRID2)
    # the reference is a reference: same cells kept (top-K order may differ only on exact ties)
    assert torch.equal(kept.sort(dim=1).values, selection.kept.sort(dim=1).values)
