"""bench_long_window: arm parsing into study configs, bad input, resumption, the choice on
validation and the pairing against the first arm."""

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from experiments.benchmarks import bench_long_window
from experiments.benchmarks.bench_long_window import LONG, Window, settings
from search.config import StudyConfig


def test_an_arm_replaces_only_the_distillation_windows():
    base = StudyConfig.load(Path("experiments/configs/default.toml"))
    config = Window.parse("2048x2").config(base)
    tuned = config.promote.recovery_config["finetune"]
    assert (tuned["seq_len"], tuned["batch_size"]) == (2048, 2)
    before = base.promote.recovery_config["finetune"]
    assert {k: v for k, v in tuned.items() if k not in ("seq_len", "batch_size")} == {
        k: v for k, v in before.items() if k not in ("seq_len", "batch_size")
    }
    assert (before["seq_len"], before["batch_size"]) == (4096, 1)  # the base is not changed
    assert config.promote.recovery_config["layerwise"] == base.promote.recovery_config["layerwise"]
    assert Window.parse("4096x1").config(base) == base  # the default config's own recipe


def test_an_arm_with_tokens_changes_the_budget_and_nothing_else():
    base = StudyConfig.load(Path("experiments/configs/default.toml"))
    tuned = Window.parse("2048x2@98304").config(base).promote.recovery_config["finetune"]
    same_budget = Window.parse("2048x2").config(base).promote.recovery_config["finetune"]
    assert tuned == {**same_budget, "tokens": 98304}
    assert same_budget["tokens"] == base.promote.recovery_config["finetune"]["tokens"] == 24576


def test_the_scores_read_long_prompts_and_the_studys_own_settings():
    base = StudyConfig.load(Path("experiments/configs/default.toml"))
    long = settings(base.long_context)
    assert long["valid"].seq_len == LONG and long["valid"].lengths == (LONG,)
    assert long["valid"].depths == base.long_context.depths
    assert long["test long"].depths == (0.1, 0.3, 0.5, 0.7, 0.9)
    assert long["test study"].seq_len == base.long_context.seq_len
    assert long["test study"].lengths == base.long_context.lengths
    assert long["test study"].ppl_windows == 16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arms", "4096"], "--arms: arm '4096' is not WINDOWxBATCH"),
        (["--arms", "4096x1,longx2"], "--arms: arm 'longx2' is not WINDOWxBATCH"),
        (["--arms", "128x2"], "--arms: arm '128x2': the window must be >= 256 tokens"),
        (["--arms", "4096x0"], "--arms: arm '4096x0': the window must be >= 256 tokens"),
        (["--arms", "2048x2@many"], "--arms: arm '2048x2@many' is not WINDOWxBATCH"),
        (["--arms", "2048x2@4000"], "arm '2048x2@4000': 4000 tokens do not fill one step"),
        (["--arms", ","], "--arms: no arm given"),
    ],
)
def test_bad_arms_are_one_line_errors(args, message, usage_error):
    assert message in usage_error(bench_long_window.main, *args)


def test_a_rerun_builds_nothing_again_and_validation_chooses(monkeypatch, tmp_path):
    """The model work is replaced: a built model is its windows; its scores are made up so that
    the 4096-token arm is better on validation and on test."""
    built = []

    @contextmanager
    def throwaway_study(config, progress):
        tuned = config.promote.recovery_config["finetune"]

        def build_candidate(grouping, progress):
            assert grouping == "the winner"
            built.append(tuned["seq_len"])
            return tuned["seq_len"]

        yield SimpleNamespace(
            build_candidate=build_candidate, loaded=SimpleNamespace(tokenizer=0), source=0
        )

    def scored(model, tokenizer, study, long):
        built.append(f"scored {model}")
        better = model in (0, 4096)
        return {
            "valid": 20.0 if better else 25.0,
            "valid_long_ppl": 15.0,
            "valid_passkey": 0.5,
            "valid_study_objective": 24.0,
            f"passkey {LONG}": 1.0 if better else 0.5,
            f"key_nll {LONG}": 0.2,
            f"outcomes {LONG}": json.dumps([True, True] if better else [True, False]),
            f"long_ppl {LONG}": 30.0,
            "long_ppl": 27.0,
            "window_loss": json.dumps([3.2, 3.3, 3.1] if better else [3.3, 3.4, 3.2]),
            "passkey": 1.0,
            "key_nll": 0.1,
        }

    monkeypatch.setattr(bench_long_window.common, "throwaway_study", throwaway_study)
    monkeypatch.setattr(bench_long_window.common, "saved_grouping", lambda pattern: "the winner")
    monkeypatch.setattr(bench_long_window, "scored", scored)
    monkeypatch.setattr(sys, "argv", ["bench_long_window.py", "--out", str(tmp_path)])
    bench_long_window.main()
    assert built == [2048, "scored 2048", 4096, "scored 4096", "scored 0"]  # 0: the source
    summary = json.loads((tmp_path / "long_window.json").read_text())
    assert summary["chosen_on_validation"] == "4096x1"
    assert "vs_first" not in summary["arms"]["2048x2"]
    paired = summary["arms"]["4096x1"]["vs_first"]
    assert paired["long_ppl"][0] < 0 and paired["long_ppl"][1] <= paired["long_ppl"][0]
    assert paired[f"passkey {LONG}"][0] == 0.5

    assert summary["source"][f"passkey {LONG}"] == 1.0 and "vs_first" not in summary["source"]

    bench_long_window.main()  # every arm is in the CSV: nothing is built or scored again
    assert len(built) == 5
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--arms", "2048x2,4096x1,8192x1"])
    bench_long_window.main()
    assert built[5:] == [8192, "scored 8192"]

    before = (tmp_path / "long_window.json").read_text()
    arms = ["--arms", "2048x2,2048x2@8192", "--summary", "tokens.json"]
    monkeypatch.setattr(sys, "argv", ["bench_long_window.py", "--out", str(tmp_path), *arms])
    bench_long_window.main()  # the 2048x2 row is reused; the summary goes to its own file
    assert built[7:] == [2048, "scored 2048"]
    assert (tmp_path / "long_window.json").read_text() == before
    assert set(json.loads((tmp_path / "tokens.json").read_text())["arms"]) == {
        "2048x2",
        "2048x2@8192",
    }
