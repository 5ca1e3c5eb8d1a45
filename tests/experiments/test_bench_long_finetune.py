"""bench_long_finetune: recipe parsing into fine-tuning configs, what counts as measured, bad
input, resumption and the choice of the control's recipe."""

import json
import math
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from experiments.benchmarks import bench_long_finetune
from experiments.benchmarks.bench_long_finetune import Recipe, measured, summarised
from objectives.recovery.base import RecoveryDivergedError


def test_a_recipe_sets_lr_batch_steps_and_what_is_trained():
    recipe = Recipe.parse("3e-4/1")
    assert recipe == Recipe(3e-4, 1, False)
    config = recipe.config(24576)
    assert (config.lr, config.batch_size, config.seq_len) == (3e-4, 1, 2048)
    assert config.steps == 12 and config.warmup_steps == 1  # 24576 / (1 x 2048)
    assert config.trainable == ("q", "k", "v", "o") and config.distill and config.text == "reading"
    everything = Recipe.parse("1e-3/2/all").config(4096 * 40)
    assert everything.trainable == "all" and everything.steps == 40 and everything.warmup_steps == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("1e-4", "recipe '1e-4' is not LR/BATCH or LR/BATCH/all"),
        ("fast/2", "recipe 'fast/2' is not LR/BATCH"),
        ("1e-4/2/lora", "recipe '1e-4/2/lora' is not LR/BATCH"),
        ("0/2", "recipe '0/2': the lr must be positive and the batch >= 1"),
        ("1e-4/0", "recipe '1e-4/0': the lr must be positive"),
    ],
)
def test_bad_recipes_name_themselves(spec, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        Recipe.parse(spec)


def test_diverged_and_read_back_gaps_are_not_measured():
    row = {"window_loss": json.dumps([3.0, 3.1]), "outcomes": json.dumps([1, 0]), "key_nll": 0.5}
    row.update({"long_ppl": 21.0, "valid": 30.0, "passkey 1024": 1.0, "passkey 2048": 0.5})
    row["passkey 4096"] = 0.0
    diverged = {"arm": "1e-2/2", "valid": math.nan, "long_ppl": math.nan, "note": "the loss..."}
    assert measured(row) and not measured(diverged) and not measured({"long_ppl": ""})
    assert summarised(diverged, row) == {"note": "the loss..."}
    assert "vs_first" not in summarised(row, row)  # the first recipe is not paired with itself
    worse = {**row, "window_loss": json.dumps([3.5, 3.6]), "outcomes": json.dumps([0, 0])}
    out = summarised(worse, row)
    assert out["valid"] == 30.0 and out["passkey"] == {1024: 1.0, 2048: 0.5, 4096: 0.0}
    assert out["vs_first"]["long_ppl"][0] > 0 and out["vs_first"]["passkey"][0] == -0.5
    control = {k: v for k, v in worse.items() if k != "valid"}  # the source control: test only
    assert "valid" not in summarised(control, row) and "vs_first" not in summarised(control, row)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--recipes", "1e-4/2,3e-4"], "--recipes: recipe '3e-4' is not LR/BATCH"),
        (["--recipes", ","], "--recipes: no recipe given"),
        (["--tokens", "100"], "--tokens must be >= 2048 (one window), got 100"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, message, usage_error):
    assert message in usage_error(bench_long_finetune.main, *args)


def test_a_rerun_tunes_nothing_again_and_the_control_takes_the_validation_choice(
    monkeypatch, tmp_path
):
    """The model work is replaced by counters: tuned models are (model, lr, batch) tuples with
    made-up validation values; a diverging recipe is recorded and never chosen."""
    calls = {"build": 0, "tuned": []}

    class FakeStudy:
        loaded = SimpleNamespace(tokenizer=None)
        source = "source"

        def build_candidate(self, grouping, progress):
            assert grouping == "allocated grouping"
            calls["build"] += 1
            return "grouped"

    def tuned(model, study, config):
        calls["tuned"].append((model, config.lr, config.batch_size))
        if config.lr >= 1e-2:
            raise RecoveryDivergedError("finetune step 3: the loss became nan")
        return (model, config.lr, config.batch_size)

    def measure(model, tokenizer):
        loss = (2.5 if model[0] == "source" else 3.0) + model[1] * 100  # higher lr: worse
        return (
            {"long_ppl": math.exp(loss), "window_loss": json.dumps([loss, loss + 0.1])}
            | {
                "outcomes": json.dumps([True, True]),
                "key_nll": 0.2,
                "buckets": "{}",
                "passkey": 1.0,
            }
            | {f"passkey {n}": 1.0 for n in (1024, 2048, 4096)}
        )

    valid = {("grouped", 1e-4, 2): 36.9, ("grouped", 3e-4, 2): 35.8, ("grouped", 3e-4, 1): 35.0}
    monkeypatch.setattr(
        bench_long_finetune.common,
        "throwaway_study",
        contextmanager(lambda *a, **k: iter([FakeStudy()])),
    )
    monkeypatch.setattr(bench_long_finetune, "allocated", lambda study: "allocated grouping")
    monkeypatch.setattr(bench_long_finetune, "tuned", tuned)
    monkeypatch.setattr(bench_long_finetune, "measure", measure)
    monkeypatch.setattr(bench_long_finetune, "validation_value", lambda model, tok: valid[model])
    argv = ["bench_long_finetune.py", "--out", str(tmp_path), "--recipes"]

    monkeypatch.setattr(sys, "argv", [*argv, "1e-4/2,3e-4/2,1e-2/2"])
    bench_long_finetune.main()
    assert calls["build"] == 1
    assert calls["tuned"] == [
        ("grouped", 1e-4, 2),
        ("grouped", 3e-4, 2),
        ("grouped", 1e-2, 2),
        ("source", 3e-4, 2),
    ]
    summary = json.loads((tmp_path / "long_finetune.json").read_text())
    assert summary["chosen_on_validation"] == "3e-4/2"
    assert summary["arms"]["1e-2/2"] == {"note": "finetune step 3: the loss became nan"}
    assert summary["arms"]["3e-4/2"]["vs_first"]["long_ppl"][0] > 0  # worse test loss than 1e-4
    assert summary["chosen_vs_its_control"] == pytest.approx(math.exp(0.5), abs=1e-3)

    bench_long_finetune.main()  # everything is in the CSV: nothing is built or tuned again
    assert calls["build"] == 1 and len(calls["tuned"]) == 4

    monkeypatch.setattr(sys, "argv", [*argv, "1e-4/2,3e-4/2,3e-4/1"])
    bench_long_finetune.main()  # one new recipe, better on validation: it and its control run
    assert calls["build"] == 2
    assert calls["tuned"][4:] == [("grouped", 3e-4, 1), ("source", 3e-4, 1)]
    summary = json.loads((tmp_path / "long_finetune.json").read_text())
    assert summary["chosen_on_validation"] == "3e-4/1" and "source, 3e-4/1" in summary["arms"]

    before = (tmp_path / "long_finetune.json").read_text()
    monkeypatch.setattr(sys, "argv", [*argv, "1e-4/2", "--tokens", "8192"])
    bench_long_finetune.main()  # another budget: tuned anew, summarised apart
    assert calls["tuned"][6:] == [("grouped", 1e-4, 2), ("source", 1e-4, 2)]
    assert json.loads((tmp_path / "long_finetune_8192.json").read_text())["arms"].keys() == {
        "1e-4/2",
        "source, 1e-4/2",
    }
    assert (tmp_path / "long_finetune.json").read_text() == before
