"""Paired bootstrap of a perplexity difference over test windows."""

import math

import numpy as np
import pytest

from objectives.significance import paired_bootstrap


def test_identical_models_differ_by_exactly_zero():
    nll = np.random.default_rng(0).normal(4.0, 0.5, size=48)
    result = paired_bootstrap(nll, nll)
    assert result.difference == result.low == result.high == 0.0 and not result.excludes_zero


def test_a_consistently_worse_model_has_an_interval_above_zero():
    rng = np.random.default_rng(1)
    b = rng.normal(4.0, 0.5, size=48)
    a = b + rng.normal(0.05, 0.01, size=48)  # a little worse on every window
    result = paired_bootstrap(a, b, resamples=500)
    assert result.difference == pytest.approx(math.exp(a.mean()) - math.exp(b.mean()))
    assert 0 < result.low < result.difference < result.high
    assert result.excludes_zero
    # Unpaired noise of the same size would swamp the difference: pairing is what removes it.
    shuffled = paired_bootstrap(a, rng.permutation(b), resamples=500)
    assert shuffled.high - shuffled.low > 5 * (result.high - result.low)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(np.ones(3), np.ones(3), confidence=1.5)
