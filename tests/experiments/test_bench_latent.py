"""bench_latent's table: one row per budget, tokens and family, latent rows paired against the
best non-latent family at the same budget and tokens."""

import json
import math

import pandas as pd

from experiments.benchmarks.bench_latent import markdown


def _rows(family, budget, tokens, losses, keys):
    detail = {"buckets": {"0-255": 30.0, "1024-2047": math.exp(sum(losses) / len(losses))}}
    common = {"family": family, "budget": budget, "recovery_tokens": tokens, "kv_fraction": budget}
    return [
        {
            **common,
            "task": "long_ppl",
            "score": math.exp(sum(losses) / len(losses)),
            "detail": json.dumps(detail),
            "outcomes": json.dumps(losses),
        },
        {
            **common,
            "task": "passkey",
            "score": sum(keys) / len(keys),
            "detail": "{}",
            "outcomes": json.dumps(keys),
        },
    ]


def test_latent_rows_are_paired_with_the_best_other_family_at_the_same_tokens():
    rows = (
        _rows("source", 1.0, 0, [3.0, 3.0, 3.0], [True, True])
        + _rows("latent", 0.5, 0, [3.5, 3.4, 3.6], [True, False])
        + _rows("mixed_precision", 0.5, 0, [3.0, 3.1, 3.0], [True, True])
        + _rows("grouping", 0.5, 0, [5.0, 5.0, 5.0], [False, False])
        + _rows("latent", 0.5, 25000, [3.2, 3.2, 3.2], [True, True])
        + _rows("grouping", 0.5, 25000, [3.3, 3.3, 3.3], [True, False])
    )
    lines = markdown(pd.DataFrame(rows)).splitlines()
    assert len(lines) == 2 + 6
    zero = next(line for line in lines if "| 0.5 | 0 | latent |" in line)
    assert "vs mixed_precision" in zero and "| 1/2 |" in zero
    expected = math.exp(3.5) - math.exp(sum([3.0, 3.1, 3.0]) / 3)
    assert f"{expected:+.2f} [" in zero
    cells = [cell.strip() for cell in zero.split("|")]
    assert cells[-2].startswith(f"{math.exp(3.5) - math.exp(5.0):+.2f} [")  # vs grouping
    recovered = next(line for line in lines if "| 0.5 | 25000 | latent |" in line)
    assert "vs grouping" in recovered  # the only other family at 25000 tokens
    assert "vs" not in next(line for line in lines if "| 0.5 | 0 | grouping |" in line)


def test_accuracy_is_paired_with_the_source_on_the_same_questions():
    from experiments.benchmarks.bench_latent import accuracy_markdown

    def row(family, budget, task, correct):
        return {
            "family": family,
            "budget": budget,
            "recovery_tokens": 0,
            "task": task,
            "outcomes": json.dumps(correct),
        }

    rows = [
        row("source", 1.0, "piqa", [True, True, False, True]),
        row("source", 1.0, "arc_easy", [True, False]),
        row("latent", 0.5, "piqa", [True, False, False, True]),
        row("latent", 0.5, "arc_easy", [True, False]),
        row("latent", 0.5, "long_ppl", [3.0]),  # not a multiple-choice row
    ]
    lines = accuracy_markdown(pd.DataFrame(rows)).splitlines()
    latent = next(line for line in lines if "| latent |" in line)
    # mean over tasks: (2/4 + 1/2) / 2 = 0.5 against (3/4 + 1/2) / 2 = 0.625
    assert "| 0.500 | -0.125 [" in latent
    source = next(line for line in lines if "| source |" in line)
    assert source.endswith("| 0.625 |  |")
    assert accuracy_markdown(pd.DataFrame(rows[-1:])) == ""
