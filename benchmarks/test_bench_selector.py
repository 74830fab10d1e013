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
def device(request) -> torch.device:
    device = torch.device(request.config.getoption("--dynvit-device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--dynvit-device cuda, but torch sees no CUDA device")
    return device


@pytest.fixture(scope="module")
def stage1(device) -> Stage1Output:
    generator = torch.Generator().manual_seed(0)
    cells = GRID[0] * GRID[1]
    attention = {b: torch.rand(BATCH, cells, generator=generator).softmax(-1).to(device) for b in range(3, DEPTH)}
    return Stage1Output(
        logits=torch.zeros(BATCH, 10, device=device),
        tokens=torch.zeros(BATCH, 1 + cells, DIM, device=device),
        class_attention=attention,
        embeddings=torch.zeros(BATCH, cells, DIM, device=device),
        grid=GRID,
    )


def synced(fn, device: torch.device):
    """``fn`` followed by a device synchronisation, so a benchmark times the kernels and not their launch."""

    def run():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return run


def build_selector(kind: str, region: int):
    return registry("region_selector").build({"type": kind, "region": region})


@pytest.mark.benchmark(group="select")
@pytest.mark.parametrize("kind", ["ngca", "max_gca", "topk_gca"])
@pytest.mark.parametrize("region", [4, 5, 6])
def test_selector(benchmark, stage1, device, kind, region):
    selector = build_selector(kind, region).to(device)
    run = synced(lambda: selector(stage1, GRID2), device)
    selection = benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    assert selection.full_index.shape == (BATCH, 4 * selector.num_kept)


def looped_ngca(stage1: Stage1Output, region: int, alpha: float = 0.88, beta: float = 0.99) -> Tensor:
    """Per-sample, per-window NGCA written with Python loops: the kept stage-1 cells, (B, K)."""
    rows, cols = stage1.grid
    keep = math.ceil(round(alpha * region * region, 6))
    kept = []
    for i in range(stage1.logits.shape[0]):
        g = torch.zeros(rows * cols, device=stage1.logits.device)
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
def test_python_loop_reference(benchmark, stage1, device):
    kept = benchmark.pedantic(synced(lambda: looped_ngca(stage1, 5), device), rounds=1, iterations=1, warmup_rounds=0)
    selection: Selection = build_selector("ngca", 5).to(device)(stage1, GRID2)
    # the reference is a reference: same cells kept (top-K order may differ only on exact ties)
    assert torch.equal(kept.sort(dim=1).values, selection.kept.sort(dim=1).values)
