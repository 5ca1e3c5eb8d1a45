"""bench_long_ranking: Spearman's rho of the scores against long-context quality, and bad input."""

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
        (["--candidates", "missing.csv"], "missing.csv not found: run bench_recoverability.py"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, message, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bench_long_ranking.py", *args])
    with pytest.raises(SystemExit) as exc:
        bench_long_ranking.main()
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_a_budget_with_no_candidate_is_refused(monkeypatch, capsys, tmp_path):
    path = tmp_path / "recoverability.csv"
    pd.DataFrame({"budget": [2.0], "candidate": ["neighbour"]}).to_csv(path, index=False)
    argv = ["bench_long_ranking.py", "--candidates", str(path), "--budget", "1.5"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        bench_long_ranking.main()
    assert exc.value.code == 2
    assert "no candidate at 1.5 KV heads per layer" in capsys.readouterr().err
