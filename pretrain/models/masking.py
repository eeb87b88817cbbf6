"""Token masks for masked-video pretraining, drawn from an explicit ``torch.Generator``.

All masks are bool ``[B, N]`` over the (t, h, w)-ordered token grid with a fixed count per sample (so
the encoder's visible set stays rectangular). For encoder masks True = hidden from the encoder, the
convention of transformers' ``bool_masked_pos``. ``running_cell_mask`` is a *decoder* mask:
True = the decoder reconstructs that token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange, repeat

Grid = tuple[int, int, int]


def _num_masked(n: int, ratio: float) -> int:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return round(n * ratio)


def _random_rows(batch: int, n: int, n_masked: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, n]`` bool with exactly ``n_masked`` True per row, uniformly placed."""
    noise_BN = torch.rand(batch, n, generator=generator, device=generator.device)
    ranks_BN = noise_BN.argsort(dim=1).argsort(dim=1)
    return ranks_BN < n_masked


def tube_mask(batch: int, grid: Grid, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """VideoMAE tube masking: one random spatial mask repeated over every temporal slice."""
    t, h, w = grid
    spatial_BS = _random_rows(batch, h * w, _num_masked(h * w, ratio), generator)
    return repeat(spatial_BS, "b s -> b (t s)", t=t)


def random_mask(batch: int, grid: Grid, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """MAE-ST space-time agnostic masking: ``ratio`` of all T'·H'·W' tokens, uniformly at random."""
    n = grid[0] * grid[1] * grid[2]
    return _random_rows(batch, n, _num_masked(n, ratio), generator)


def running_cell_mask(batch: int, grid: Grid, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """VideoMAE V2 decoder "running cell" mask; True = token the decoder reconstructs.

    The grid is tiled by 2×2 cells. Within a cell, 4·(1−ratio) of the 4 positions are kept for the
    decoder; the kept pattern shifts by one position every time step, so over consecutive slices every
    position gets reconstructed while each slice costs only (1−ratio) of the decoder tokens. Each sample
    starts the cycle at a random phase. ``ratio`` is the fraction *dropped* by the decoder (V2 uses 0.5).
    """
    t, h, w = grid
    if h % 2 or w % 2:
        raise ValueError(f"running_cell_mask needs an even spatial grid, got H'={h}, W'={w}")
    keep = 4 - _num_masked(4, ratio)
    if abs(4 * (1 - ratio) - keep) > 1e-6 or keep == 0:
        raise ValueError(f"running_cell_mask ratio must be one of 0.25, 0.5, 0.75; got {ratio}")
    device = generator.device
    phase_B = torch.randint(0, 4, (batch,), generator=generator, device=device)
    cell_pos_4 = torch.arange(4, device=device)
    time_T = torch.arange(t, device=device)
    # position p is kept at step s when (p - s) mod 4 < keep  → a window of `keep` positions that runs.
    shift_BT = phase_B[:, None] + time_T[None, :]
    kept_BT4 = (cell_pos_4[None, None, :] - shift_BT[:, :, None]) % 4 < keep
    cells_BT4 = repeat(kept_BT4, "b t c -> b t c hc wc", hc=h // 2, wc=w // 2)
    # cell position c enumerates (row-in-cell, col-in-cell) as in a 2×2 raster.
    full = rearrange(cells_BT4, "b t (i j) hc wc -> b t (hc i) (wc j)", i=2, j=2)
    return rearrange(full, "b t h w -> b (t h w)")


MASK_KINDS = ("tube", "random", "running_cell")


def make_mask(kind: str, batch: int, grid: Grid, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Dispatch to ``tube_mask`` / ``random_mask`` / ``running_cell_mask`` by name."""
    fns = {"tube": tube_mask, "random": random_mask, "running_cell": running_cell_mask}
    if kind not in fns:
        raise ValueError(f"unknown mask kind {kind!r}; choose from {MASK_KINDS}")
    return fns[kind](batch, tuple(grid), ratio, generator)


def keyed_mask(kind: str, seeds: Sequence[int], grid: Grid, ratio: float) -> torch.Tensor:
    """One mask per seed, bool ``[len(seeds), N]``: row b is ``make_mask(kind, 1, ...)`` drawn from a
    generator seeded with ``seeds[b]``, so a sample's mask depends on its own key only, never on the batch,
    rank or micro-batch it lands in. One ``torch.Generator`` re-seeded per row: ~0.1 ms a clip on a CPU core
    (tube mask; a random mask over 8x14x14 tokens ~0.6 ms, close to what one batched draw costs per clip)."""
    gen = torch.Generator()
    rows = []
    for seed in seeds:
        gen.manual_seed(int(seed))
        rows.append(make_mask(kind, 1, grid, ratio, gen))
    if not rows:
        return torch.zeros(0, grid[0] * grid[1] * grid[2], dtype=torch.bool)
    return torch.cat(rows)
