"""`headgroup compare-bytes` on a tiny study's byte front: paired intervals per budget, accuracy
only where the joint and the single-axis choices differ, and a second run that rebuilds nothing."""

import json

import pytest

import experiments.held_out as held_out
from experiments.cli import main
from search.config import StudyConfig
from search.kv_front import KVFront
from search.study import Study
from tests.search.study_fixtures import save_tiny_model, write_config

PRECISION = """
[precision]
budgets = [1.0, 0.6, 0.3]
bits = [8, 2]
group_sizes = [8]
valid_windows = 2
test_windows = 2
"""


@pytest.fixture()
def finished_front(tmp_path, smol_tokenizer, monkeypatch):
    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model(tmp_path / "model", smol_tokenizer)
    path = write_config(tmp_path / "c.toml", model, f"sqlite:///{tmp_path}/s.db", trials=4)
    path.write_text(path.read_text() + PRECISION)
    study = Study(StudyConfig.load(path), progress=False)
    study.run()
    KVFront(study, progress=False).run()
    return path


def _contest_the_middle_budget(monkeypatch):
    """At 60% the joint family takes a point of its own (another fitting point than the best
    single axis's), so that budget compares two points; the others keep their choices."""
    run = KVFront.run

    def contested(self):
        chosen = run(self)
        rows = chosen[chosen["budget_fraction"] == 0.6]
        singles = rows[rows["family"] != "joint"].sort_values("valid_ppl")
        best = singles.iloc[0]["point"].key
        other = next(p for p in rows["point"] if p.key != best)
        joint = rows.index[rows["family"] == "joint"][0]
        chosen.at[joint, "point"] = other
        return chosen

    monkeypatch.setattr(KVFront, "run", contested)


def test_compare_bytes_measures_accuracy_where_the_choices_differ(finished_front, monkeypatch):
    out = finished_front.parent / "out"
    _contest_the_middle_budget(monkeypatch)
    evaluated = []
    import experiments.compare_bytes as module

    outcomes = module.question_outcomes
    monkeypatch.setattr(
        module,
        "question_outcomes",
        lambda model, tok, task, limit, **k: (
            evaluated.append((task, limit)) or outcomes(model, tok, task, limit, **k)
        ),
    )
    argv = ["compare-bytes", "--config", str(finished_front), "--seeds", "0,1"]
    argv += ["--windows", "3", "--limit", "2", "--out", str(out)]
    assert main(argv) == 0
    answer = json.loads((out / "byte_answer.json").read_text())["budgets"]
    assert set(answer) == {"1", "0.6", "0.3"}
    contested = answer["0.6"]
    diff = contested["joint - single"]
    assert not diff.get("same_point")
    assert diff["ci95"][0] <= diff["ppl"] <= diff["ci95"][1]
    for side in ("joint", "best single-axis"):
        entry = contested[side]
        assert "correct" not in entry and set(entry["accuracy"]) == {"piqa"}
        assert entry["mean_acc"] == entry["accuracy"]["piqa"]
    acc = diff["mean_acc"]  # paired over the same 2 questions
    expected = contested["joint"]["mean_acc"] - contested["best single-axis"]["mean_acc"]
    assert acc["difference"] == pytest.approx(expected, abs=1e-12)
    assert acc["ci95"][0] <= acc["difference"] <= acc["ci95"][1]
    for budget, entry in answer.items():
        if budget == "0.6":
            continue
        single = entry["best single-axis"]
        assert "mean_acc" not in entry["joint"]  # same point, or nothing to compare with
        if single is not None:
            assert entry["joint - single"]["same_point"] and "mean_acc" not in single
    assert evaluated == [("piqa", 2), ("piqa", 2)]  # the contested points, once each (seed 0)
    assert "mean acc" in (out / "byte_answer.md").read_text()

    # A second run reads every result back: no model is measured again.
    monkeypatch.setattr(module, "question_outcomes", lambda *a, **k: pytest.fail("measured again"))
    monkeypatch.setattr(held_out, "window_nlls", lambda *a, **k: pytest.fail("measured again"))
    assert main(argv) == 0
    assert json.loads((out / "byte_answer.json").read_text())["budgets"] == answer


def test_compare_bytes_at_long_context_pairs_late_positions_and_passkeys(
    finished_front, monkeypatch, capsys
):
    out = finished_front.parent / "out_long"
    _contest_the_middle_budget(monkeypatch)
    argv = ["compare-bytes", "--config", str(finished_front), "--seeds", "0"]
    argv += ["--windows", "2", "--limit", "0", "--context", "96", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "byte_answer.json").read_text())
    assert "(48-95)" in report["scored"]  # the study's edges exceed 96 tokens: half of it
    contested = report["budgets"]["0.6"]
    diff = contested["joint - single"]
    assert diff["ci95"][0] <= diff["ppl"] <= diff["ci95"][1]
    retrieval = diff["passkey"]  # paired over the same 10 test prompts
    expected = contested["joint"]["passkey"] - contested["best single-axis"]["passkey"]
    assert retrieval["difference"] == pytest.approx(expected, abs=1e-12)
    assert "mean_acc" not in diff  # --limit 0: no questions
    text = (out / "byte_answer.md").read_text()
    assert "late-position perplexity (48-95) of 2 held-out long test documents" in text
    assert "passkey" in text

    def fail(*a, **k):
        pytest.fail("measured again")

    monkeypatch.setattr(held_out, "late_window_nlls", fail)
    monkeypatch.setattr(held_out, "passkey", fail)
    assert main(argv) == 0
    assert json.loads((out / "byte_answer.json").read_text())["budgets"] == report["budgets"]
    # --budgets: only the byte budgets asked for (read back, measured once above)
    assert main([*argv, "--budgets", "0.6"]) == 0
    answer = json.loads((out / "byte_answer.json").read_text())["budgets"]
    assert answer == {"0.6": report["budgets"]["0.6"]}
    assert main([*argv, "--budgets", "0.6,0.5"]) == 2  # not a budget of the study
    assert "--budgets 0.5 not among the study's byte budgets 1,0.6,0.3" in capsys.readouterr().err
    assert main([*argv[:-4], "--context", "10", "--out", str(out)]) == 2


def test_compare_bytes_control_rebuilds_the_single_axis_point_on_the_recovered_source(
    finished_front, monkeypatch
):
    out = finished_front.parent / "out_control"
    run = KVFront.run

    def single_on_the_source(self):  # at 60%: the joint takes a grouped point, a source one wins
        chosen = run(self)
        rows = chosen[chosen["budget_fraction"] == 0.6]
        singles = rows[rows["family"] != "joint"]
        on_source = singles.index[[p.model.is_source for p in singles["point"]]][0]
        chosen.at[on_source, "valid_ppl"] = 0.0
        joint = rows.index[rows["family"] == "joint"][0]
        chosen.at[joint, "point"] = next(p for p in rows["point"] if not p.model.is_source)
        return chosen

    monkeypatch.setattr(KVFront, "run", single_on_the_source)
    built = []
    build = Study.build_candidate

    def recorded(self, grouping, **kwargs):
        built.append((grouping == self.source_grouping, kwargs.get("recovery_seed")))
        return build(self, grouping, **kwargs)

    monkeypatch.setattr(Study, "build_candidate", recorded)
    argv = ["compare-bytes", "--config", str(finished_front), "--seeds", "0"]
    argv += ["--windows", "3", "--limit", "0", "--control", "--out", str(out)]
    assert main(argv) == 0
    answer = json.loads((out / "byte_answer.json").read_text())["budgets"]
    assert [b for b, e in answer.items() if "control" in e] == ["0.6"]  # the contested budget
    entry = answer["0.6"]
    single, control = entry["best single-axis"], entry["control"]
    assert single["model"] == "source"
    assert control["precision"] == single["precision"] and control["family"] == single["family"]
    assert (True, 0) in built  # the source, recovered by the study's chain under seed 0
    # The tiny study's chain is layer-wise fits, which fit the source's own outputs: its
    # control is the source up to float rounding, so the two comparisons agree.
    assert control["test_ppl_mean"] == pytest.approx(single["test_ppl_mean"], rel=1e-4)
    diff = entry["joint - control"]
    assert diff["ppl"] == pytest.approx(entry["joint - single"]["ppl"], rel=1e-3, abs=1e-4)
    assert diff["ci95"][0] <= diff["ppl"] <= diff["ci95"][1]
    assert "## Against the control" in (out / "byte_answer.md").read_text()

    monkeypatch.setattr(held_out, "window_nlls", lambda *a, **k: pytest.fail("measured again"))
    assert main(argv) == 0
    assert json.loads((out / "byte_answer.json").read_text())["budgets"] == answer


def test_the_control_exists_only_for_points_on_the_source(finished_front):
    study = Study(StudyConfig.load(finished_front), progress=False)
    front = KVFront(study, progress=False)
    chosen = front.run()
    grouped = next(p for p in chosen["point"] if not p.model.is_source)
    with pytest.raises(ValueError, match="the control is the source recovered"):
        front.module(grouped.model, 0, control=True)
