"""Paired bootstrap of a perplexity difference over test windows."""

import math

import numpy as np
import pytest

from objectives.significance import paired_accuracy, paired_bootstrap, paired_objective


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


def test_paired_accuracy_is_the_mean_over_tasks_and_pairs_questions():
    rng = np.random.default_rng(1)
    a = {"arc": list(rng.random(200) < 0.6), "piqa": list(rng.random(100) < 0.7)}
    same = paired_accuracy(a, a)
    assert same.difference == same.low == same.high == 0.0  # paired: no spread at all
    # B answers 20 more ARC questions right and nothing else changes: +0.1 on ARC, 0 on PIQA
    b = {"arc": list(a["arc"]), "piqa": list(a["piqa"])}
    wrong = [i for i, c in enumerate(b["arc"]) if not c][:20]
    for i in wrong:
        b["arc"][i] = True
    diff = paired_accuracy(b, a)
    assert diff.difference == pytest.approx(0.1 / 2)  # the mean over the two tasks
    assert 0 < diff.low <= diff.difference <= diff.high and diff.excludes_zero
    with pytest.raises(ValueError, match="same tasks"):
        paired_accuracy(a, {"arc": a["arc"]})
    with pytest.raises(ValueError, match="piqa: need two equally long"):
        paired_accuracy(a, {"arc": a["arc"], "piqa": a["piqa"][:50]})


def test_an_objective_multiplies_the_perplexities_of_its_terms_each_resampled_apart():
    rng = np.random.default_rng(2)
    docs_b, keys_b = rng.normal(3.0, 0.3, size=16), rng.normal(0.2, 0.1, size=12)
    docs_a, keys_a = docs_b + 0.02, keys_b + rng.normal(0.0, 0.05, size=12)
    weights = {"long_ppl": 1.0, "passkey": 0.5}
    a, b = {"long_ppl": docs_a, "passkey": keys_a}, {"long_ppl": docs_b, "passkey": keys_b}
    result = paired_objective(a, b, weights, resamples=500)
    expected = math.exp(docs_a.mean() + 0.5 * keys_a.mean()) - math.exp(
        docs_b.mean() + 0.5 * keys_b.mean()
    )
    assert result.difference == pytest.approx(expected, rel=1e-12)
    assert result.low <= result.difference <= result.high
    # The keys' noise widens the interval of the documents' perplexity alone.
    alone = paired_objective({"d": docs_a}, {"d": docs_b}, {"d": 1.0}, resamples=500)
    assert alone.low > 0 and result.high - result.low > alone.high - alone.low
    # One term is paired_bootstrap exactly.
    same = paired_bootstrap(docs_a, docs_b, resamples=500)
    assert (alone.low, alone.high, alone.difference) == (same.low, same.high, same.difference)
    with pytest.raises(ValueError, match=r"per-item NLLs for every weighted term \['long_ppl'"):
        paired_objective({"long_ppl": docs_a}, b, weights)
    with pytest.raises(ValueError, match="passkey: need two equally long"):
        paired_objective(a, {"long_ppl": docs_b, "passkey": keys_b[:5]}, weights)
