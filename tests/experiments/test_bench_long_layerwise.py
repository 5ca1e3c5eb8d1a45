"""bench_long_layerwise: fit specs into layer-wise configs, the study's allocated grouping, bad
input, and a run that fits, chooses on validation, tunes and resumes."""

import json
import math
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from experiments.benchmarks import bench_long_layerwise
from experiments.benchmarks.bench_long_layerwise import Fit, allocated_grouping
from gqa.grouping import Grouping


def test_a_fit_sets_steps_projections_and_inputs():
    fit = Fit.parse("96/qkvo/converted")
    assert fit == Fit(96, "qkvo", "converted")
    config = fit.config()
    assert (config.steps, config.lr, config.batch_size) == (96, 3e-3, 2)
    assert config.train == ("q", "k", "v", "o") and config.inputs == "converted"
    assert Fit.parse("24/kv/source").config().train == ("k", "v")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("24/kv", "fit '24/kv' is not STEPS/TRAIN/INPUTS"),
        ("many/kv/source", "fit 'many/kv/source' is not STEPS/TRAIN/INPUTS"),
        ("0/kv/source", "fit '0/kv/source': STEPS must be >= 1"),
        ("24/q/source", "TRAIN one of kv, qkvo"),
        ("24/kv/target", "INPUTS one of source, converted"),
    ],
)
def test_bad_fits_name_themselves(spec, message):
    with pytest.raises(ValueError, match=message):
        Fit.parse(spec)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fits", "24/kv/source,24/kv"], "--fits: fit '24/kv' is not STEPS/TRAIN/INPUTS"),
        (["--fits", ","], "--fits: no fit given"),
        (["--finetune", "100"], "--finetune must be 0 or >= 2048 tokens (one window), got 100"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, message, usage_error):
    assert message in usage_error(bench_long_layerwise.main, *args)


def test_the_allocated_grouping_is_the_saved_one_whose_head_counts_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the pattern is relative to the repository root, as the study's
    uniform = Grouping.neighbour(6, 3, 2)
    allocated = Grouping.neighbour(6, 3, [1, 2, 3])
    uniform.save(tmp_path / "2kv_coarsen_source_a.json")
    allocated.save(tmp_path / "2kv_coarsen_source_b.json")
    assert allocated_grouping("2kv_coarsen_source_*.json") == allocated
    allocated.save(tmp_path / "2kv_coarsen_source_c.json")
    with pytest.raises(SystemExit, match="expected one allocated grouping .*, found 2"):
        allocated_grouping("2kv_coarsen_source_*.json")


def test_a_run_fits_each_spec_once_tunes_the_choice_and_the_first_and_resumes(
    monkeypatch, tmp_path
):
    """The model work is replaced by counters: a fitted model is its spec, a tuned one the spec
    with its token budget; validation prefers converted inputs, test agrees."""
    calls = {"fitted": [], "tuned": []}

    def fitted(study, grouping, fit):
        assert grouping == "allocated"
        calls["fitted"].append(fit)
        return (fit, 0), SimpleNamespace(seconds=1.0, final_loss=0.5)

    def tuned(model, study, config):
        assert config.lr == 3e-4 and config.batch_size == 2
        calls["tuned"].append(model[0])
        return (model[0], config.tokens)

    def loss(model) -> float:
        fit, tokens = model
        return 3.0 - (0.2 if fit.inputs == "converted" else 0.0) - (0.1 if tokens else 0.0)

    def measure(model, tokenizer):
        value = loss(model)
        return {
            "long_ppl": math.exp(value),
            "window_loss": json.dumps([value, value + 0.1]),
            "outcomes": json.dumps([True, False]),
            "key_nll": 0.3,
            "buckets": "{}",
            "passkey": 0.5,
            **{f"passkey {n}": 0.5 for n in (1024, 2048, 4096)},
        }

    monkeypatch.setattr(
        bench_long_layerwise.common,
        "throwaway_study",
        contextmanager(
            lambda *a, **k: iter([SimpleNamespace(loaded=SimpleNamespace(tokenizer=None))])
        ),
    )
    monkeypatch.setattr(bench_long_layerwise, "allocated_grouping", lambda: "allocated")
    monkeypatch.setattr(bench_long_layerwise, "fitted", fitted)
    monkeypatch.setattr(bench_long_layerwise, "tuned", tuned)
    monkeypatch.setattr(bench_long_layerwise, "measure", measure)
    monkeypatch.setattr(
        bench_long_layerwise, "validation_value", lambda model, tok: 10 * math.exp(loss(model))
    )
    argv = ["bench.py", "--out", str(tmp_path), "--fits", "24/kv/source,24/kv/converted"]
    monkeypatch.setattr(sys, "argv", [*argv, "--finetune", "4096"])
    bench_long_layerwise.main()
    source, converted = Fit(24, "kv", "source"), Fit(24, "kv", "converted")
    assert calls["fitted"] == [source, converted]
    assert calls["tuned"] == [source, converted]  # the first fit and the chosen one
    summary = json.loads((tmp_path / "long_layerwise.json").read_text())
    assert summary["chosen_on_validation"] == "24/kv/converted"
    arms = summary["arms"]
    assert set(arms) == {
        "24/kv/source",
        "24/kv/converted",
        "24/kv/source, tuned 4096",
        "24/kv/converted, tuned 4096",
    }
    assert arms["24/kv/converted"]["vs_first"]["long_ppl"][0] < 0
    assert "vs_first" not in arms["24/kv/source, tuned 4096"]
    # Paired with the first fit tuned alike (mean losses 2.75 and 2.95), not with it untuned.
    tuned_pair = arms["24/kv/converted, tuned 4096"]["vs_first"]["long_ppl"]
    assert tuned_pair[0] == pytest.approx(math.exp(2.75) - math.exp(2.95), abs=0.01)
    assert arms["24/kv/source"]["fit_seconds"] == 1.0

    bench_long_layerwise.main()  # everything is in the CSV: nothing is fitted or tuned again
    assert len(calls["fitted"]) == 2 and len(calls["tuned"]) == 2

    monkeypatch.setattr(sys, "argv", argv)  # no tuning this time: tuned rows keep their pairs
    bench_long_layerwise.main()
    assert len(calls["tuned"]) == 2
    arms = json.loads((tmp_path / "long_layerwise.json").read_text())["arms"]
    assert arms["24/kv/converted, tuned 4096"]["vs_first"]["long_ppl"] == tuned_pair
