"""Paired bootstrap confidence intervals for comparing two models on the same test windows.

Perplexity is exp(mean NLL) over equally long windows. To compare models A and B, resample the
window indices with replacement (the same indices for both: the comparison is paired, so text
difficulty cancels) and take the percentile interval of ppl_A - ppl_B over the resamples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedDifference:
    """ppl_a - ppl_b on the full set, and its bootstrap percentile interval."""

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
