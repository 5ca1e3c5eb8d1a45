"""Reports built from a tiny study's storage, and the main job's results folder."""

import json
import re

import pandas as pd
import pytest

from experiments.cli import main
from experiments.main_job import run_main_job
from experiments.reports import pareto_front
from gqa.grouping import Grouping
from search.results import rung_columns, stage1_frame, stage2_frame
from tests.search.study_fixtures import save_tiny_model, write_config


@pytest.fixture(scope="module")
def finished(tmp_path_factory, smol_tokenizer):
    tmp = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADGROUP_CACHE", str(tmp / "cache"))
        model = save_tiny_model(tmp / "model", smol_tokenizer)
        storage = f"sqlite:///{tmp}/study.db"
        # No pruning: on a random tiny model it is arbitrary, and compare needs a survivor.
        config = write_config(tmp / "s.toml", model, storage, trials=10, pruner="none")
        readme = run_main_job(config, tmp / "out", progress=False)
    return tmp / "out", storage, readme


def test_main_job_writes_every_file(finished):
    out, storage, readme = finished
    for name in (
        "pareto.png",
        "pareto.csv",
        "ablation.md",
        "ablation.csv",
        "ablation.tex",
        "trials.csv",
        "rungs.png",
        "README.md",
    ):
        assert (out / name).stat().st_size > 0, name
    stage2 = stage2_frame("tiny", storage)
    groupings = sorted((out / "groupings").glob("*.json"))
    assert len(groupings) == len(stage2)
    assert {Grouping.load(p) for p in groupings} == {
        Grouping.from_json(g) for g in stage2["grouping"]
    }
    text = readme.read_text()
    assert (
        "What the numbers say" in text
        and "Source model: perplexity" in text
        and "min (wall time" in text
    )


def test_groupings_folder_holds_only_the_storages_groupings(finished, tmp_path):
    from experiments.main_job import write_groupings

    _, storage, _ = finished
    stale = tmp_path / "2kv_old_0123456789abcdef.json"
    stale.write_text("{}")
    paths = write_groupings(stage2_frame("tiny", storage), tmp_path)
    assert sorted(tmp_path.glob("*.json")) == sorted(paths) and not stale.exists()


def test_trials_csv_matches_storage(finished):
    out, storage, _ = finished
    trials = pd.read_csv(out / "trials.csv")
    assert (trials["stage"] == 1).sum() == len(stage1_frame("tiny", storage)) == 10
    assert (trials["stage"] == 2).sum() == len(stage2_frame("tiny", storage))


def test_pareto_csv_is_the_non_dominated_set(finished):
    out, storage, _ = finished
    front = pd.read_csv(out / "pareto.csv")
    stage2 = stage2_frame("tiny", storage)
    evaluated = front[(front["stage"] == "recovered") & (front["metric"] == "valid_ppl")]
    assert len(evaluated)
    candidates = stage2[(stage2["kind"] != "source") & (stage2["state"] == "complete")]
    for _, point in evaluated.iterrows():  # nothing recovered dominates a front point
        better = candidates[
            (candidates["kv_bytes"] <= point["kv_bytes"])
            & (candidates["valid_ppl"] < point["valid_ppl"] - 1e-12)
        ]
        assert better.empty
    assert set(evaluated["key"]) <= set(candidates["key"])
    assert ((front["kv_pct"] > 0) & (front["kv_pct"] <= 100)).all()


def test_ablation_tables_cover_strategies_and_budgets(finished):
    out, storage, _ = finished
    table = pd.read_csv(out / "ablation.csv")
    stage1 = stage1_frame("tiny", storage)
    best = table[table["table"] == "Best proxy per strategy x budget (stage 1)"]
    assert len(best) == stage1.groupby(["budget", "strategy"]).ngroups
    md = (out / "ablation.md").read_text()
    assert "## Recovered candidates (stage 2)" in md and re.search(r"\|\s+budget\s+\|", md)
    assert "## Stage-2 pruning" in md
    assert "\\begin{tabular}" in (out / "ablation.tex").read_text()


def test_long_task_scores_reach_the_ablation_and_the_pareto_fronts(finished, tmp_path, monkeypatch):
    """A study that measured long tasks shows them: ablation columns and pareto.csv fronts."""
    import experiments.reports as reports

    _, storage, _ = finished
    stage2 = stage2_frame("tiny", storage)
    done = stage2["state"] == "complete"
    stage2.loc[done, "long_ppl"] = [30.0 + i for i in range(done.sum())]
    stage2.loc[done, "passkey"] = [i % 3 / 2 for i in range(done.sum())]
    monkeypatch.setattr(reports, "stage2_frame", lambda name, storage: stage2)
    table = pd.read_csv(reports.ablation_report(["tiny"], storage, tmp_path)["csv"])
    best = table[table["table"].str.startswith("Recovered candidates")]
    assert {"long_ppl", "passkey"} <= set(best.columns)
    by_strategy = stage2[done].assign(strategy=stage2["strategy"].fillna("source"))
    for _, row in best.iterrows():  # each shown score is that strategy's complete candidate's
        rows = by_strategy[
            (by_strategy["strategy"] == row["strategy"]) & (by_strategy["kind"] == row["kind"])
        ]
        assert float(row["long_ppl"]) in set(rows["long_ppl"])
    reports.pareto_report("tiny", storage, tmp_path)
    front = pd.read_csv(tmp_path / "pareto.csv")
    candidates = stage2[done & (stage2["kind"] != "source")]
    for metric, better in (("long_ppl", -1), ("passkey", 1)):
        points = front[front["metric"] == metric]
        assert len(points)
        for _, point in points.iterrows():  # nothing recovered dominates a front point
            beaten = candidates[
                (candidates["kv_bytes"] <= point["kv_bytes"])
                & (better * (candidates[metric] - point[metric]) > 1e-12)
            ]
            assert beaten.empty, metric


def _rungs(*steps):
    return json.dumps([{"after": "merge", "valid_ppl": 9.0}, *({"after": a} for a in steps)])


def test_rung_columns_follow_the_recovery_order_not_the_alphabet():
    frame = pd.DataFrame(  # the storage returns attributes sorted by name: finetune first
        {
            "valid_ppl_after_finetune": [3.0],
            "valid_ppl_after_layerwise": [5.0],
            "valid_ppl_merged": [9.0],
            "valid_ppl": [3.0],
            "rungs": [_rungs("layerwise", "finetune")],
        }
    )
    assert rung_columns(frame) == [
        "valid_ppl_merged",
        "valid_ppl_after_layerwise",
        "valid_ppl_after_finetune",
        "valid_ppl",
    ]


def test_compare_prefers_the_searched_candidate_that_went_deepest_when_all_were_pruned():
    from experiments.compare import finalists

    frame = pd.DataFrame(
        {
            "budget": [2.0, 2.0, 2.0],
            "kind": ["searched", "searched", "baseline"],
            "strategy": ["a", "b", "neighbour"],
            "state": ["pruned", "pruned", "complete"],
            "valid_ppl_merged": [50.0, 40.0, 60.0],
            "valid_ppl_after_finetune": [30.0, None, 20.0],
            "valid_ppl_after_layerwise": [35.0, 10.0, 25.0],  # b: best there, pruned before tuning
            "valid_ppl": [None, None, 20.0],
            "rungs": [_rungs("layerwise", "finetune"), _rungs("layerwise"), None],
        }
    )
    chosen = finalists(frame, 2.0)
    assert chosen["searched"]["strategy"] == "a" and chosen["searched"]["valid_ppl"] == 30.0
    assert chosen["neighbour"]["valid_ppl"] == 20.0


def test_pareto_front_brute_force():
    frame = pd.DataFrame({"kv_bytes": [1, 1, 2, 3, 3, 4], "y": [5.0, 4.0, 4.5, 2.0, 3.0, 2.5]})
    front = pareto_front(frame, "kv_bytes", "y")
    assert list(zip(front["kv_bytes"], front["y"], strict=True)) == [(1, 4.0), (3, 2.0)]


def test_seeds_are_shown_as_mean_and_std():
    from experiments.reports import _mean_std

    frame = pd.DataFrame({"study": ["a", "b", "a"], "budget": [1, 1, 2], "ppl": [10.0, 14.0, 5.0]})
    table = _mean_std(frame, ["budget"], ["ppl"])
    assert list(table["ppl"]) == ["12 ± 2.8", "5"]
    assert list(table["n"]) == [2, 1]


def test_report_cli_and_errors(finished, tmp_path, capsys):
    _, storage, _ = finished
    assert (
        main(["pareto", "--study", "tiny", "--storage", storage, "--out", str(tmp_path / "p")]) == 0
    )
    assert (tmp_path / "p" / "pareto.png").is_file()
    assert (
        main(
            [
                "ablate",
                "--study",
                "tiny",
                "--study",
                "tiny",
                "--storage",
                storage,
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert (tmp_path / "a" / "ablation.md").is_file()
    code = main(["pareto", "--study", "nope", "--storage", storage, "--out", str(tmp_path / "x")])
    assert code == 2 and "no completed trials" in capsys.readouterr().err
    code = main(
        [
            "ablate",
            "--study",
            "tiny",
            "--storage",
            f"sqlite:///{tmp_path}/missing.db",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_compare_gives_paired_intervals_and_resumes(finished, monkeypatch, capsys):
    import json

    from search.study import Study

    out, _, _ = finished
    monkeypatch.setenv("HEADGROUP_CACHE", str(out.parent / "cache"))
    config = str(out.parent / "s.toml")
    argv = ["compare", "--config", config, "--seeds", "0,1", "--windows", "4", "--limit", "3"]
    argv += ["--out", str(out)]
    builds = []
    build = Study.build_candidate
    monkeypatch.setattr(
        Study,
        "build_candidate",
        lambda self, g, **k: builds.append((g, k["recovery_seed"])) or build(self, g, **k),
    )
    assert main(argv) == 0
    answer = json.loads((out / "answer.json").read_text())
    compared = [e for e in answer["budgets"].values() if "candidates" in e]
    assert compared
    # one build per candidate and seed (each seed its own recovery, not one model measured
    # twice); the accuracy pass reuses the first seed's model
    assert len(builds) == len(set(builds)) == 2 * sum(len(e["candidates"]) for e in compared)
    for entry in compared:
        searched = entry["candidates"]["searched"]
        assert len(searched["test_ppl"]) == 2 and searched["questions"]["piqa"] == 3
        for diff in entry["differences"].values():
            assert diff["ci95"][0] <= diff["ppl"] <= diff["ci95"][1]
    assert "paired bootstrap" in (out / "answer.md").read_text()
    # A second run reads every (candidate, seed) result back: nothing is rebuilt.
    monkeypatch.setattr(Study, "build_candidate", lambda *a, **k: pytest.fail("rebuilt"))
    assert main(argv) == 0
    assert json.loads((out / "answer.json").read_text())["budgets"] == answer["budgets"]
    # A study whose models are built differently (another merge) measures again: a cached result
    # is keyed by how its model is built, not only by its label.
    path = out.parent / "s.toml"
    path.write_text(path.read_text().replace('merge = "query_aware"', 'merge = "mean"'))
    monkeypatch.setattr(
        Study,
        "build_candidate",
        lambda self, g, **k: builds.append(("mean", k["recovery_seed"])) or build(self, g, **k),
    )
    argv[argv.index("--limit") + 1] = "0"
    assert main(argv) == 0
    assert ("mean", 0) in builds and ("mean", 1) in builds
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--config", config, "--seeds", "x"])
    assert exit_info.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_compare_at_long_context_pairs_late_positions_and_passkeys(finished, monkeypatch):
    import json

    import experiments.held_out as held_out
    from search.study import Study

    out, _, _ = finished
    monkeypatch.setenv("HEADGROUP_CACHE", str(out.parent / "cache"))
    long_out = out.parent / "long"
    argv = ["compare", "--config", str(out.parent / "s.toml"), "--seeds", "0", "--windows", "2"]
    argv += ["--limit", "0", "--context", "96", "--out", str(long_out)]
    assert main(argv) == 0
    answer = json.loads((long_out / "answer.json").read_text())
    assert "late-position perplexity (48-95) of 2 held-out long test documents" in answer["scored"]
    compared = [e for e in answer["budgets"].values() if "candidates" in e]
    assert compared
    for entry in compared:
        candidates = entry["candidates"]
        for name, diff in entry["differences"].items():
            base = name.removeprefix("searched - ")
            expected = candidates["searched"]["passkey"] - candidates[base]["passkey"]
            assert diff["passkey"]["difference"] == pytest.approx(expected, abs=1e-12)
            assert diff["ci95"][0] <= diff["ppl"] <= diff["ci95"][1]
    assert "passkey" in (long_out / "answer.md").read_text()

    def fail(*a, **k):
        pytest.fail("measured again")

    monkeypatch.setattr(Study, "build_candidate", fail)
    monkeypatch.setattr(held_out, "late_window_nlls", fail)
    monkeypatch.setattr(held_out, "passkey", fail)
    assert main(argv) == 0
    assert json.loads((long_out / "answer.json").read_text())["budgets"] == answer["budgets"]


def test_the_readme_names_a_question_limit_only_for_multiple_choice_tasks():
    from experiments.main_job import _tasks_text
    from objectives.calibration import CalibrationConfig
    from search.config import PromoteConfig, SearchConfig, StudyConfig

    def text(tasks):
        promote = PromoteConfig(tasks=tuple(tasks), limit=30)
        config = StudyConfig(
            "s",
            "sqlite:///x.db",
            "m",
            0,
            CalibrationConfig(),
            SearchConfig(budgets=(2.0,)),
            promote,
        )
        return _tasks_text(config)

    assert text(["ppl"]) == "tasks ['ppl'] (perplexity only)"
    assert text(["ppl", "long_ppl", "passkey"]) == "tasks ['ppl', 'long_ppl', 'passkey']"
    assert text(["ppl", "piqa", "passkey"]).endswith("(limit 30 test questions)")
