"""Region selectors: which full-resolution tokens stage 2 computes.

LF-ViT's NGCA and every alternative the paper ablates (Table 6, Fig. 5),
plus CF-ViT's global top-K. All are vectorised over the batch and over
windows: the window scores are one box filter, the choice one argmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dynvit.registry import register
from dynvit.stages import Grid, RegionSelector, Selection, StageOutput


def global_class_attention(class_attention: dict[int, Tensor], blocks: list[int], beta: float) -> Tensor:
    """Eq. 8: g = beta * g + (1 - beta) * a_l over ``blocks`` in order, from g = 0. (B, N1)."""
    g = torch.zeros_like(class_attention[blocks[0]])
    for block in blocks:
        g = torch.lerp(g, class_attention[block], 1 - beta)
    return g


def window_sums(gca: Tensor, grid: Grid, size: int) -> Tensor:
    """Sum of the GCA inside every ``size`` x ``size`` window, stride 1: (B, rows-size+1, cols-size+1)."""
    maps = gca.reshape(-1, 1, *grid)
    return (F.avg_pool2d(maps, size, stride=1) * (size * size)).squeeze(1)


def window_cells(corner: Tensor, size: int, grid: Grid) -> Tensor:
    """Flat stage-1 indices of the windows with top-left cells ``corner`` (B, 2): (B, size*size)."""
    offsets = torch.arange(size, device=corner.device)
    rows = corner[:, :1, None] + offsets[None, :, None]  # (B, size, 1)
    cols = corner[:, 1:, None] + offsets[None, None, :]  # (B, 1, size)
    return (rows * grid[1] + cols).reshape(corner.shape[0], -1)


def children(kept: Tensor, grid1: Grid, grid2: Grid) -> Tensor:
    """Full-resolution cells under each kept stage-1 cell, grouped per cell: (B, K * s * s)."""
    scale = grid2[0] // grid1[0]
    if grid2 != (grid1[0] * scale, grid1[1] * scale):
        raise ValueError(f"the full-resolution grid {grid2} is not an integer multiple of the stage-1 grid {grid1}")
    rows, cols = kept // grid1[1], kept % grid1[1]
    off = torch.arange(scale, device=kept.device)
    r = rows[:, :, None, None] * scale + off[None, None, :, None]
    c = cols[:, :, None, None] * scale + off[None, None, None, :]
    return (r * grid2[1] + c).reshape(kept.shape[0], -1)


def complement(kept: Tensor, total: int) -> Tensor:
    """Indices in [0, total) not in ``kept``, ascending: (B, total - K).

    A top-k over distinct keys (2 * total - index for the cells not kept,
    -index for the kept ones): no ties, so no stable sort is needed, and it
    exports to ONNX as one TopK.
    """
    cells = torch.arange(total, device=kept.device, dtype=torch.float32).expand(kept.shape[0], total)
    key = torch.full_like(cells, 2.0 * total).scatter(1, kept, 0.0) - cells
    return torch.topk(key, total - kept.shape[1], dim=1, sorted=True).indices


@register("region_selector", "full_image")
class FullImageSelector(RegionSelector):
    """No region identification: stage 2 sees every full-resolution token (Fig. 5)."""

    def num_tokens(self, grid1: Grid, grid2: Grid, depth: int) -> tuple[int, int]:
        return grid2[0] * grid2[1], 0

    def forward(self, stage1: StageOutput, grid2: Grid) -> Selection:
        return Selection.whole_image(stage1.logits.shape[0], stage1.grid, grid2, stage1.logits.device)


class GCASelector(RegionSelector):
    """Shared machinery: GCA accumulated over blocks ``first_block``..end, K = ceil(alpha * m^2)."""

    def __init__(self, region: int = 5, alpha: float = 0.88, beta: float = 0.99, first_block: int = 3) -> None:
        super().__init__()
        if region < 1:
            raise ValueError(f"region size must be >= 1, got {region}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.region = region
        self.alpha = alpha
        self.beta = beta
        self.first_block = first_block
        self.num_kept = math.ceil(round(alpha * region * region, 6))

    def kept_count(self, grid: Grid) -> int:
        """K, the stage-1 cells whose full-resolution children stage 2 computes."""
        return self.num_kept

    def num_tokens(self, grid1: Grid, grid2: Grid, depth: int) -> tuple[int, int]:
        self.check_grid(grid1)
        scale = grid2[0] // grid1[0]
        kept = self.kept_count(grid1)
        return kept * scale * scale, grid1[0] * grid1[1] - kept

    def attention_blocks(self, depth: int) -> list[int]:
        if not 0 <= self.first_block < depth:
            raise ValueError(f"first_block={self.first_block} is outside the backbone's {depth} blocks")
        return list(range(self.first_block, depth))

    def gca(self, stage1: StageOutput) -> Tensor:
        blocks = sorted(b for b in stage1.class_attention if b >= self.first_block)
        if not blocks:
            raise ValueError(f"stage 1 returned no class attention from block {self.first_block} on")
        return global_class_attention(stage1.class_attention, blocks, self.beta)

    def check_grid(self, grid: Grid) -> None:
        if self.region > min(grid):
            raise ValueError(
                f"region size {self.region} does not fit the stage-1 grid {grid[0]}x{grid[1]}; use at most {min(grid)}"
            )

    def choose_window(self, gca: Tensor, grid: Grid) -> Tensor:
        """(B, N1) GCA -> (B, 2) top-left (row, col) of the window."""
        raise NotImplementedError

    def forward(self, stage1: StageOutput, grid2: Grid) -> Selection:
        grid = stage1.grid
        self.check_grid(grid)
        gca = self.gca(stage1)
        corner = self.choose_window(gca, grid)
        cells = window_cells(corner, self.region, grid)
        top = torch.topk(torch.gather(gca, 1, cells), self.num_kept, dim=1, sorted=True).indices
        kept = torch.gather(cells, 1, top)
        size = torch.full_like(corner, self.region)
        return Selection(
            full_index=children(kept, grid, grid2),
            reuse_index=complement(kept, grid[0] * grid[1]),
            region=torch.cat([corner, size], dim=1),
            kept=kept,
        )


def _corner_of_flat(index: Tensor, cols: int) -> Tensor:
    return torch.stack([index // cols, index % cols], dim=1)


def _centred_corner(cell: Tensor, grid: Grid, size: int) -> Tensor:
    """Top-left of the window centred on ``cell`` (B,), clamped inside the grid."""
    rows, cols = cell // grid[1], cell % grid[1]
    half = (size - 1) // 2
    return torch.stack(
        [(rows - half).clamp(0, grid[0] - size), (cols - half).clamp(0, grid[1] - size)],
        dim=1,
    )


@register("region_selector", "ngca")
class NGCASelector(GCASelector):
    """LF-ViT: the window with the largest summed GCA (ties: the first in row-major order)."""

    def choose_window(self, gca: Tensor, grid: Grid) -> Tensor:
        sums = window_sums(gca, grid, self.region)
        return _corner_of_flat(sums.flatten(1).argmax(dim=1), sums.shape[-1])


@register("region_selector", "negative_ngca")
class NegativeNGCASelector(GCASelector):
    """Table 6: the window with the smallest summed GCA."""

    def choose_window(self, gca: Tensor, grid: Grid) -> Tensor:
        sums = window_sums(gca, grid, self.region)
        return _corner_of_flat(sums.flatten(1).argmin(dim=1), sums.shape[-1])


@register("region_selector", "max_gca")
class MaxGCASelector(GCASelector):
    """Table 6: the window centred (as far as the grid allows) on the highest-GCA token."""

    def choose_window(self, gca: Tensor, grid: Grid) -> Tensor:
        return _centred_corner(gca.argmax(dim=1), grid, self.region)


@register("region_selector", "min_gca")
class MinGCASelector(GCASelector):
    """Table 6: the window centred (as far as the grid allows) on the lowest-GCA token."""

    def choose_window(self, gca: Tensor, grid: Grid) -> Tensor:
        return _centred_corner(gca.argmin(dim=1), grid, self.region)


_MASK32 = 0xFFFFFFFF


def hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixer (xor-shift-multiply) on int64 values in [0, 2**32): every op is plain tensor
    arithmetic, identical on every device, inside a compiled graph and in ONNX. Shifts are floor divisions and the
    multipliers are below 2**31, so no intermediate overflows int64."""
    x = x ^ (x // 65536)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x // 32768)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x // 65536)


@register("region_selector", "random")
class RandomSelector(GCASelector):
    """Table 6: a uniformly random window, reproducible from ``seed``; top-K inside still by GCA.

    The stream is counter-based: the n-th sample this selector sees (counted
    from construction, over every call) gets window ``hash32(hash32(n) ^ seed)
    % windows``. The counter is a device buffer advanced inside the call, so
    the draw needs no host generator: the selection compiles into one graph,
    and a batch of 8 draws what two batches of 4 draw.
    """

    def __init__(
        self, region: int = 5, alpha: float = 0.88, beta: float = 0.99, first_block: int = 3, seed: int = 0
    ) -> None:
        super().__init__(region, alpha, beta, first_block)
        self.seed = seed
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64), persistent=False)

    def choose_window(self, gca: Tensor, grid: Grid) -> Tensor:
        spots = (grid[0] - self.region + 1) * (grid[1] - self.region + 1)
        count = torch.arange(gca.shape[0], device=gca.device) + self.draws.to(gca.device)
        self.draws.add_(gca.shape[0])
        flat = hash32(hash32(count & _MASK32) ^ (self.seed & _MASK32)) % spots
        return _corner_of_flat(flat, grid[1] - self.region + 1)


@register("region_selector", "topk_gca")
class TopKGCASelector(GCASelector):
    """The K highest-GCA stage-1 cells anywhere on the grid, no window (CF-ViT's informative cells).

    By default K = ceil(alpha * region^2), NGCA's count, so an LF-ViT recipe
    can swap its window for a global top-K at the same cost. With
    ``keep_ratio`` set, K = ceil(keep_ratio * rows * cols) of the stage-1
    grid, CF-ViT's rule (0.5: 25 of 7x7, 41 of 9x9), and ``region`` and
    ``alpha`` play no part. ``region`` in the selection is the bounding box
    of the kept cells.
    """

    def __init__(
        self,
        region: int = 5,
        alpha: float = 0.88,
        beta: float = 0.99,
        first_block: int = 3,
        keep_ratio: float | None = None,
    ) -> None:
        super().__init__(region, alpha, beta, first_block)
        if keep_ratio is not None and not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.keep_ratio = keep_ratio

    def kept_count(self, grid: Grid) -> int:
        if self.keep_ratio is None:
            return self.num_kept
        return math.ceil(round(self.keep_ratio * grid[0] * grid[1], 6))

    def check_grid(self, grid: Grid) -> None:
        if self.keep_ratio is None:  # K comes from the window's size, which must fit the grid
            super().check_grid(grid)

    def forward(self, stage1: StageOutput, grid2: Grid) -> Selection:
        grid = stage1.grid
        self.check_grid(grid)
        kept = torch.topk(self.gca(stage1), self.kept_count(grid), dim=1, sorted=True).indices
        rows, cols = kept // grid[1], kept % grid[1]
        lo_r, lo_c = rows.amin(1), cols.amin(1)
        region = torch.stack([lo_r, lo_c, rows.amax(1) - lo_r + 1, cols.amax(1) - lo_c + 1], dim=1)
        return Selection(children(kept, grid, grid2), complement(kept, grid[0] * grid[1]), region, kept)
