"""Paired bootstrap confidence intervals for comparing two models on the same test data.

Perplexity is exp(mean NLL) over equally long windows. To compare models A and B, resample the
window indices with replacement (the same indices for both: the comparison is paired, so text
difficulty cancels) and take the percentile interval of ppl_A - ppl_B over the resamples.
Accuracy is compared the same way on per-question outcomes, resampling the questions of each task
(`paired_accuracy`); a selection objective that multiplies perplexities of different samples
(late positions of documents, passkey digits of prompts) resamples each apart (`paired_objective`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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

    def as_dict(self) -> dict:
        """What a report keeps: the difference, its interval and whether it excludes 0."""
        return {
            "difference": self.difference,
            "ci95": [self.low, self.high],
            "excludes_zero": self.excludes_zero,
        }


def paired_bootstrap(
    nll_a: np.ndarray,
    nll_b: np.ndarray,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Bootstrap interval of exp(mean nll_a) - exp(mean nll_b), resampling windows in pairs."""
    return paired_objective(
        {"nll": nll_a}, {"nll": nll_b}, {"nll": 1.0}, resamples, confidence, seed
    )


def paired_objective(
    terms_a: Mapping[str, Sequence[float]],
    terms_b: Mapping[str, Sequence[float]],
    weights: Mapping[str, float],
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Bootstrap interval of exp(sum_t w_t mean a_t) - exp(sum_t w_t mean b_t): a weighted
    geometric mean of perplexities (objectives.selection) from per-item NLLs of each term t (per
    document, per prompt). Each term's items are resampled in pairs, apart from the other terms'
    (documents and prompts are different samples)."""
    if set(terms_a) != set(weights) or set(terms_b) != set(weights):
        raise ValueError(
            f"need per-item NLLs for every weighted term {sorted(weights)}, got "
            f"{sorted(terms_a)} and {sorted(terms_b)}"
        )
    full, boot = _paired_means(terms_a, terms_b, weights, resamples, confidence, seed, "NLLs")
    return _interval(
        math.exp(full[0]) - math.exp(full[1]), np.exp(boot[0]) - np.exp(boot[1]), confidence
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
    weights = {task: 1 / len(correct_a) for task in correct_a}
    full, boot = _paired_means(
        correct_a, correct_b, weights, resamples, confidence, seed, "outcomes"
    )
    return _interval(float(full[0] - full[1]), boot[0] - boot[1], confidence)


def _paired_means(terms_a, terms_b, weights, resamples, confidence, seed, items: str):
    """sum_t w_t mean(x_t) for A and B (shape (2,)), and the same over `resamples` paired
    resamples of each term's items, drawn apart from the other terms' (shape (2, resamples))."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    full, boot = np.zeros(2), np.zeros((2, resamples))
    for term in sorted(weights):
        a = np.asarray(terms_a[term], dtype=float)
        b = np.asarray(terms_b[term], dtype=float)
        if a.shape != b.shape or a.ndim != 1 or a.size < 2:
            raise ValueError(
                f"{term}: need two equally long 1-d arrays of per-item {items}, got {a.shape} "
                f"and {b.shape}"
            )
        index = rng.integers(0, a.size, size=(resamples, a.size))
        full += weights[term] * np.array([a.mean(), b.mean()])
        boot += weights[term] * np.stack([a[index].mean(1), b[index].mean(1)])
    return full, boot


def _interval(difference: float, resampled: np.ndarray, confidence: float) -> PairedDifference:
    """The percentile interval of resampled differences around the full-sample one."""
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return PairedDifference(
        difference=float(difference),
        low=float(low),
        high=float(high),
        confidence=confidence,
        resamples=resampled.size,
    )
