"""Paired bootstrap confidence intervals for comparing two models on the same test data.

Perplexity is exp(mean NLL) over equally long windows. To compare models A and B, resample the
window indices with replacement (the same indices for both: the comparison is paired, so text
difficulty cancels) and take the percentile interval of ppl_A - ppl_B over the resamples.
Accuracy is compared the same way on per-question outcomes, resampling the questions of each task
(`paired_accuracy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedDifference:
    """a - b (perplexity, or mean accuracy) on the full set, and its bootstrap percentile
    interval."""

    difference: float
    low: float
    high: float
    confidence: float
    resamples: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(
    nll_a: np.ndarray,
    nll_b: np.ndarray,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Bootstrap interval of exp(mean nll_a) - exp(mean nll_b), resampling windows in pairs."""
    a, b = np.asarray(nll_a, dtype=float), np.asarray(nll_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(
            f"need two equally long 1-d arrays of per-window NLLs, got {a.shape} and {b.shape}"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, a.size, size=(resamples, a.size))
    diffs = np.exp(a[index].mean(1)) - np.exp(b[index].mean(1))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return PairedDifference(
        difference=math.exp(a.mean()) - math.exp(b.mean()),
        low=float(low),
        high=float(high),
        confidence=confidence,
        resamples=resamples,
    )


def paired_accuracy(
    correct_a: dict[str, list[bool]],
    correct_b: dict[str, list[bool]],
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Bootstrap interval of mean accuracy A - mean accuracy B, the mean taken over tasks (as a
    study's `mean_acc`), from per-question outcomes on the same questions: each task's questions
    are resampled in pairs, apart from the other tasks'."""
    if set(correct_a) != set(correct_b) or not correct_a:
        raise ValueError(
            f"need outcomes on the same tasks, got {sorted(correct_a)} and {sorted(correct_b)}"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    full, boot = 0.0, np.zeros(resamples)
    for task in sorted(correct_a):
        a = np.asarray(correct_a[task], dtype=float)
        b = np.asarray(correct_b[task], dtype=float)
        if a.shape != b.shape or a.ndim != 1 or a.size < 2:
            raise ValueError(
                f"{task}: need two equally long lists of per-question outcomes, got "
                f"{a.shape} and {b.shape}"
            )
        index = rng.integers(0, a.size, size=(resamples, a.size))
        full += (a.mean() - b.mean()) / len(correct_a)
        boot += (a[index].mean(1) - b[index].mean(1)) / len(correct_a)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(boot, [tail, 100 - tail])
    return PairedDifference(
        difference=float(full),
        low=float(low),
        high=float(high),
        confidence=confidence,
        resamples=resamples,
    )
