"""bench_long_grouping: each arm's choice from the measured costs, paired intervals, bad input."""

import json

import pytest

from experiments.benchmarks import bench_long_grouping
from experiments.benchmarks.bench_long_grouping import against, chosen


def test_the_cheapest_and_the_costliest_coarsening_per_layer():
    a, b, c = ((0, 1, 2, 3), (4, 5)), ((0, 1, 4, 5), (2, 3)), ((0, 1), (2, 3, 4, 5))
    costs = {1: {a: 0.2, b: -0.01, c: 0.05}, 0: {a: 0.01, b: 0.3, c: 0.02}}
    best, worst = chosen(costs, min), chosen(costs, max)
    assert [lg.k for lg in best.layers] == [a, b] and [lg.v for lg in best.layers] == [a, b]
    assert [lg.k for lg in worst.layers] == [b, a] and best.num_heads == 6


def test_intervals_are_paired_over_documents_and_prompts():
    row = {"window_loss": json.dumps([3.0, 3.2, 2.9]), "outcomes": json.dumps([1, 1, 0, 1])}
    same = against(row, row)
    assert same == {"long_ppl": [0.0, 0.0, 0.0], "passkey": [0.0, 0.0, 0.0]}
    worse = {"window_loss": json.dumps([3.5, 3.7, 3.4]), "outcomes": json.dumps([0, 1, 0, 0])}
    result = against(worse, row)
    assert result["long_ppl"][1] > 0  # every document worse by 0.5 nats: the interval excludes 0
    assert result["passkey"][0] == pytest.approx(-0.5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arms", "demo,oracle"], "--arms: unknown arm 'oracle' (arms: demo, fisher"),
        (["--arms", ","], "--arms: unknown arm '(none)'"),
        (["--cost-windows", "0"], "--cost-windows must be >= 1, got 0"),
        (["--finetune-arm", "best"], "--finetune-arm: unknown arm 'best' (arms: demo, fisher"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, message, usage_error):
    assert message in usage_error(bench_long_grouping.main, *args)
