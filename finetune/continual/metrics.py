"""Continual-learning metrics on an accuracy matrix, with Avalanche's definitions.

`R[i][j]` = accuracy on experience j's test split after training on experience i (None where j was not yet
trained: the matrix is lower-triangular). After the last experience T−1:

- average accuracy = mean_j≤T−1 R[T−1][j];
- forgetting of j = R[j][j] − R[T−1][j] (accuracy right after training on j minus at the latest evaluation),
  averaged over the experiences trained *before* the last one (Avalanche's StreamForgetting: the experience
  just trained has no forgetting yet, so it is left out); None with a single experience;
- BWT = −forgetting;
- forward transfer of k = accuracy on k right before training on it (after k−1) minus its accuracy at
  initialisation (the model before any experience), averaged over k ≥ 1.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

Matrix = list[list[float | None]]


def average_accuracy(matrix: Matrix, row: int = -1) -> float:
    """Mean accuracy over the experiences trained so far, after experience `row` (default: the last)."""
    i = row % len(matrix)
    values = [matrix[i][j] for j in range(i + 1)]
    return sum(v for v in values if v is not None) / len(values)


def forgetting_per_experience(matrix: Matrix, row: int = -1) -> list[float | None]:
    """R[j][j] − R[row][j] for every experience j trained before `row`; None from `row` on."""
    i = row % len(matrix)
    return [matrix[j][j] - matrix[i][j] if j < i else None for j in range(len(matrix[i]))]


def forgetting(matrix: Matrix, row: int = -1) -> float | None:
    """Average forgetting over the experiences trained before `row` (None when there are none)."""
    values = [f for f in forgetting_per_experience(matrix, row) if f is not None]
    return sum(values) / len(values) if values else None


def bwt(matrix: Matrix, row: int = -1) -> float | None:
    f = forgetting(matrix, row)
    return None if f is None else -f


def forward_transfer(before: list[float | None], at_init: list[float | None]) -> float | None:
    """Mean over k ≥ 1 of (accuracy on k right before training on it − accuracy on k at initialisation)."""
    pairs = [(b, a) for b, a in list(zip(before, at_init))[1:] if b is not None and a is not None]
    return sum(b - a for b, a in pairs) / len(pairs) if pairs else None


def summary(matrix: Matrix, before: list[float | None], at_init: list[float | None]) -> dict[str, Any]:
    """The metrics of `continual.json`, plus their value after every experience (`*_per_step`)."""
    rows = range(len(matrix))
    return {
        "average_accuracy": average_accuracy(matrix),
        "forgetting": forgetting(matrix),
        "bwt": bwt(matrix),
        "forward_transfer": forward_transfer(before, at_init),
        "average_accuracy_per_step": [average_accuracy(matrix, i) for i in rows],
        "forgetting_per_step": [forgetting(matrix, i) for i in rows],
        "forgetting_per_experience": forgetting_per_experience(matrix),
    }


def plot_matrix(matrix: Matrix, names: list[str], path: Path, title: str) -> Path:
    """The accuracy matrix as an annotated heatmap (rows: after experience i; columns: experience j)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(names)
    data = np.array(
        [[math.nan if v is None else v for v in row] + [math.nan] * (n - len(row)) for row in matrix]
    )
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * n, 1.2 + 0.8 * len(matrix)))
    ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), names, fontsize=8)
    ax.set_yticks(range(len(matrix)), [f"after {i}" for i in range(len(matrix))], fontsize=8)
    ax.set_xlabel("evaluated on experience")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if v is not None:
                ax.text(
                    j,
                    i,
                    f"{100 * v:.0f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if v < 0.6 else "black",
                )
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
