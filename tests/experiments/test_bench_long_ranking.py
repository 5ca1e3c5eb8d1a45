"""bench_long_ranking: Spearman's rho of the scores against long-context quality, and bad input."""

import json
import sys

import numpy as np
import pandas as pd
import pytest

from experiments.benchmarks import bench_long_ranking
from experiments.benchmarks.bench_long_ranking import rho_table


def test_rho_reads_each_score_against_both_targets():
    """A score that orders the candidates as their long perplexity does has rho 1 against it; one
    that orders them backwards, -1; the key NLL target ranks by its own values."""
    frame = pd.DataFrame(
        {
            "long_ppl": [30.0, 45.0, 60.0, 90.0],
            "key_nll": [0.4, 0.1, 0.3, 0.2],
            "fisher": [1e-5, 2e-5, 3e-5, 4e-5],
            "valid_ppl": [90.0, 80.0, 70.0, 60.0],
        }
    )
    table = rho_table(frame, ["fisher", "valid_ppl"])
    assert table["long_ppl"] == {"fisher": 1.0, "valid_ppl": -1.0}
    expected = round(float(np.corrcoef([4, 1, 3, 2], [1, 2, 3, 4])[0, 1]), 3)  # ranks, no ties
    assert table["key_nll"]["fisher"] == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seq-len", "100"], "--seq-len must be >= 256"),
        (["--valid-long-windows", "-1"], "--*-long*-windows >= 0"),
        (["--candidates", "missing.csv"], "missing.csv not found: run bench_recoverability.py"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, message, usage_error, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert message in usage_error(bench_long_ranking.main, *args)


def test_a_budget_with_no_candidate_is_refused(usage_error, tmp_path):
    path = tmp_path / "recoverability.csv"
    pd.DataFrame({"budget": [2.0], "candidate": ["neighbour"]}).to_csv(path, index=False)
    err = usage_error(bench_long_ranking.main, "--candidates", str(path), "--budget", "1.5")
    assert "no candidate at 1.5 KV heads per layer" in err


def test_a_rerun_measures_nothing_again_and_adds_the_long_range_score(monkeypatch, tmp_path):
    """The model work is replaced by counters: a first run measures the source and each
    candidate once; a rerun measures nothing; a rerun with --long-range-windows adds the score to
    the rows already there (measuring only it) and ranks it in the summary."""
    import gqa
    from objectives.long_range import LongRangeCosts

    candidates = tmp_path / "recoverability.csv"
    pool = pd.DataFrame(
        {
            "budget": [2.0, 2.0, 2.0, 1.5],
            "candidate": ["a", "b", "c", "other budget"],
            "key": ["ka", "kb", "kc", "kd"],
            "grouping": ["1", "2", "3", "4"],
            "fisher": [1.0, 2.0, 3.0, 4.0],
            "valid_ppl": [10.0, 30.0, 20.0, 40.0],
        }
    )
    pool.to_csv(candidates, index=False)
    (tmp_path / "recoverability_summary.json").write_text('{"recovery": {"steps": 1, "lr": 0.1}}')
    calls = {"measure": 0, "long_range": 0, "valid_long": 0}
    long_ppl = {1: 50.0, 2: 90.0, 3: 70.0}

    def measure(model, tokenizer, config):
        calls["measure"] += 1
        ppl = long_ppl.get(model, 20.0)
        return {"long_ppl": ppl, "buckets": "{}", "passkey": 1.0, "key_nll": ppl / 100}

    def costs(base, model, tokenizer, config, progress):
        calls["long_range"] += 1
        assert config.ppl_windows == 2
        return LongRangeCosts([0.0, float(model)], 3.0)

    def valid_long(model, tokenizer, config):
        calls["valid_long"] += 1
        assert config.ppl_windows == 3
        return {1: 40.0, 2: 80.0, 3: 60.0}[model]

    module = bench_long_ranking
    monkeypatch.setattr(module.common, "calibrated", lambda **_: (_Loaded(), None))
    monkeypatch.setattr(module.Grouping, "from_json", staticmethod(int))
    monkeypatch.setattr(gqa, "convert", lambda model, grouping, **_: grouping)
    monkeypatch.setattr(gqa, "converted_copy", lambda model, grouping: "base")
    monkeypatch.setattr(gqa, "current_grouping", lambda model: None)
    monkeypatch.setattr(module, "recover", lambda *a, **k: None)
    monkeypatch.setattr(module, "measure", measure)
    monkeypatch.setattr(module, "long_range_costs", costs)
    monkeypatch.setattr(module, "valid_long_ppl", valid_long)
    out = tmp_path / "long_ranking.csv"
    argv = ["bench_long_ranking.py", "--candidates", str(candidates), "--out", str(out)]

    monkeypatch.setattr(sys, "argv", argv)
    module.main()
    assert calls == {"measure": 4, "long_range": 0, "valid_long": 0}  # the source and a, b, c
    module.main()
    assert calls == {"measure": 4, "long_range": 0, "valid_long": 0}
    monkeypatch.setattr(sys, "argv", [*argv, "--long-range-windows", "2"])
    module.main()
    assert calls == {"measure": 4, "long_range": 3, "valid_long": 0}
    both = [*argv, "--long-range-windows", "2", "--valid-long-windows", "3"]
    monkeypatch.setattr(sys, "argv", both)
    module.main()
    module.main()
    assert calls == {"measure": 4, "long_range": 3, "valid_long": 3}
    frame = pd.read_csv(out)
    assert list(frame["candidate"]) == ["source", "a", "b", "c"]
    assert list(frame["long_range"].iloc[1:]) == [1.0, 2.0, 3.0]
    assert list(frame["valid_long_ppl"].iloc[1:]) == [40.0, 80.0, 60.0]
    summary = json.loads(out.with_suffix(".json").read_text())
    # long perplexity 50, 90, 70 for a, b, c: the short validation perplexity (10, 30, 20) and
    # the long validation one (40, 80, 60) rank them exactly, fisher and the long-range score
    # (1, 2, 3) half right
    rho = {"fisher": 0.5, "valid_ppl": 1.0, "long_range": 0.5, "valid_long_ppl": 1.0}
    assert summary["rho"]["long_ppl"] == rho
    assert summary["best_by_long_test"] == "a" and summary["candidates"] == 3


class _Loaded:
    model = 0  # the source: measure() gives it the default perplexity
    tokenizer = None
