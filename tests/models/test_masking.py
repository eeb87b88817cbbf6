import pytest
import torch

from pretrain.models.masking import make_mask, running_cell_mask, tube_mask

GRID = (4, 6, 6)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", ["tube", "random"])
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_exact_count_and_dtype(kind: str, ratio: float) -> None:
    m = make_mask(kind, 8, GRID, ratio, gen())
    n = 4 * 36
    assert m.dtype == torch.bool and m.shape == (8, n)
    per_slice = round(36 * ratio)
    want = per_slice * 4 if kind == "tube" else round(n * ratio)
    assert (m.sum(1) == want).all()


def test_tube_is_constant_over_time() -> None:
    m = tube_mask(5, GRID, 0.9, gen()).view(5, 4, 36)
    assert (m == m[:, :1]).all()


def test_random_is_not_tube() -> None:
    m = make_mask("random", 5, GRID, 0.5, gen()).view(5, 4, 36)
    assert not (m == m[:, :1]).all()


@pytest.mark.parametrize("kind", ["tube", "random", "running_cell"])
def test_deterministic_and_varies_across_samples(kind: str) -> None:
    a = make_mask(kind, 6, GRID, 0.5, gen(3))
    b = make_mask(kind, 6, GRID, 0.5, gen(3))
    c = make_mask(kind, 6, GRID, 0.5, gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) or kind == "running_cell"
    if kind != "running_cell":  # running cell has only 4 phases
        assert len({tuple(r.tolist()) for r in a}) > 1


def test_running_cell_pattern() -> None:
    m = running_cell_mask(16, GRID, 0.5, gen()).view(16, 4, 6, 6)
    assert (m.flatten(1).sum(1) == 4 * 18).all()
    cells = m.view(16, 4, 3, 2, 3, 2).permute(0, 1, 2, 4, 3, 5).reshape(16, 4, 9, 4)
    # every 2×2 cell keeps exactly 2, all cells of a slice share the pattern, the pattern moves in time
    assert (cells.sum(-1) == 2).all()
    assert (cells == cells[:, :, :1]).all()
    assert (cells[:, 1:, 0] != cells[:, :-1, 0]).any(-1).all()
    # over 4 consecutive slices every position is reconstructed
    assert cells[:, :, 0].any(1).all()
    assert len({tuple(r.flatten().tolist()) for r in m}) > 1  # phases differ across samples


def test_bad_args() -> None:
    with pytest.raises(ValueError, match="even"):
        running_cell_mask(1, (2, 3, 4), 0.5, gen())
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        make_mask("tube", 1, GRID, 1.0, gen())
    with pytest.raises(ValueError, match="unknown mask kind"):
        make_mask("block", 1, GRID, 0.5, gen())
