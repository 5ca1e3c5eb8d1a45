"""The study: stage 1 and 2 end to end on a tiny model, resumption after SIGKILL, two workers."""

import json
import os
import subprocess
import sys
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState

from gqa.grouping import Grouping
from search.config import StudyConfig
from search.study import STAGE2_SUFFIX, Study, make_storage
from tests.search.study_fixtures import save_tiny_model, write_config

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture()
def tiny(tmp_path, smol_tokenizer, monkeypatch):
    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path / "cache"))
    return save_tiny_model(tmp_path / "model", smol_tokenizer)


def _trials(storage: str, name: str, states=(TrialState.COMPLETE,)):
    return optuna.load_study(study_name=name, storage=make_storage(storage)).get_trials(
        states=states
    )


def _check_complete_study(storage: str, trials: int):
    stage1 = _trials(storage, "tiny")
    assert len(stage1) == trials
    for t in stage1:
        grouping = Grouping.from_json(t.user_attrs["grouping"])
        assert grouping.kv_heads() == t.user_attrs["kv_heads"]
        budget = t.params["budget"]
        assert grouping.kv_heads() == 2 * round(budget * 2)  # K and V, 2 layers
    scored = [t.user_attrs["key"] for t in stage1 if "duplicate_of" not in t.user_attrs]
    assert len(scored) == len(set(scored)), "a grouping was scored twice"
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    stage2 = [
        t
        for t in _trials(storage, "tiny" + STAGE2_SUFFIX, states=finished)
        if "item" in t.user_attrs and "duplicate_of" not in t.user_attrs
    ]
    items = [t.user_attrs["item_key"] for t in stage2]
    assert len(items) == len(set(items)), "a stage-2 candidate was evaluated twice"
    waiting = _trials(
        storage, "tiny" + STAGE2_SUFFIX, states=(TrialState.WAITING, TrialState.RUNNING)
    )
    assert not waiting
    kinds = Counter(json.loads(t.user_attrs["item"])["kind"] for t in stage2)
    assert kinds["source"] == 1 and kinds["baseline"] >= 2 and kinds["searched"] >= 1
    for t in stage2:
        kind = json.loads(t.user_attrs["item"])["kind"]
        rungs = json.loads(t.user_attrs["rungs"])
        # Rungs: the merged model, then one per recovery method (the source has just itself).
        assert [r["after"] for r in rungs] == (
            ["source"] if kind == "source" else ["merge", "layerwise"]
        )[: len(rungs)]
        assert all(r["valid_ppl"] > 1 for r in rungs)
        if t.state == TrialState.PRUNED:
            assert kind == "searched" and t.user_attrs["pruned_after"] == "layerwise"
            assert "ppl" not in t.user_attrs  # a pruned candidate never reads the test data
            continue
        assert t.user_attrs["ppl"] > 1 and 0 <= t.user_attrs["acc_piqa"] <= 1
        assert t.value == t.user_attrs["valid_ppl"] == rungs[-1]["valid_ppl"]
        assert ("valid_ppl_merged" in t.user_attrs) != (kind == "source")
    return stage1, stage2


def test_study_runs_both_stages_and_resumes_without_new_work(tiny, tmp_path):
    storage = f"sqlite:///{tmp_path}/study.db"
    config = StudyConfig.load(write_config(tmp_path / "s.toml", tiny, storage))
    Study(config, progress=False).run()
    stage1, stage2 = _check_complete_study(storage, trials=12)
    baselines = {
        (t.params["budget"], t.params["strategy"]) for t in stage1 if not t.params["allocation"]
    }
    assert {(b, s) for b in (2.0, 1.5) for s in ("neighbour", "neighbour_kv")} <= baselines
    reference = {
        t.params["budget"]: t.user_attrs["proxy"]
        for t in stage1
        if t.params["strategy"] == "neighbour" and not t.params["allocation"]
    }
    for t in stage1:  # Optuna minimises the proxy relative to neighbour at the same budget
        assert t.value == pytest.approx(t.user_attrs["proxy"] / reference[t.params["budget"]])
    study = Study(config, progress=False)
    first = study.wall_seconds()
    assert first > 0  # the work's wall time is in the storage
    study.run()  # resuming a finished study does nothing
    with pytest.raises(RuntimeError), study.timed():  # an interrupted run's time counts too
        raise RuntimeError("stopped")
    assert study.wall_seconds() > first
    again = _trials(storage, "tiny", states=None)
    assert len([t for t in again if t.state == TrialState.COMPLETE]) == 12
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    assert len(_trials(storage, "tiny" + STAGE2_SUFFIX, states=finished)) == len(stage2)


def test_study_runs_under_the_aligned_merge(tiny, tmp_path):
    """`aligned` as the study's merge: the fisher guide proxy scores it (no closed-form error),
    and stage 2 builds its candidates with it."""
    storage = f"sqlite:///{tmp_path}/study.db"
    path = write_config(tmp_path / "s.toml", tiny, storage, trials=6, merge="aligned")
    config = StudyConfig.load(path)
    assert config.search.merge == "aligned"
    Study(config, progress=False).run()
    stage1, _ = _check_complete_study(storage, trials=6)
    assert all(t.user_attrs["proxy"] >= 0 for t in stage1)


def _run_cli(config, env_extra=None, storage=None):
    env = dict(os.environ, **(env_extra or {}))
    cmd = [sys.executable, "-m", "experiments.cli", "study", "--config", str(config)]
    if storage:
        cmd += ["--storage", storage]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("fault", ["stage1:4", "stage2:1"])
def test_sigkill_then_resume_loses_and_duplicates_nothing(tiny, tmp_path, fault):
    storage = f"sqlite:///{tmp_path}/study.db"
    config = write_config(tmp_path / "s.toml", tiny, storage)
    killed = _run_cli(config, {"HEADGROUP_FAULT": fault})
    killed.communicate(timeout=300)
    assert killed.returncode == -9
    stage = "tiny" if fault.startswith("stage1") else "tiny" + STAGE2_SUFFIX
    assert _trials(storage, stage, states=(TrialState.RUNNING,)), "the kill left no trial in flight"
    resumed = _run_cli(config)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert "stage 2: candidates" in out
    _check_complete_study(storage, trials=12)
    failed = _trials(storage, stage, states=(TrialState.FAIL,))
    assert len(failed) == 1  # the killed trial, whose work was redone by a retry
    retries = [
        t for t in _trials(storage, stage) if t.user_attrs.get("retry_of") == failed[0].number
    ]
    assert len(retries) == 1


def test_two_workers_on_journal_storage_share_the_work(tiny, tmp_path):
    storage = f"journal:{tmp_path}/study.log"
    config = write_config(tmp_path / "s.toml", tiny, storage, trials=16)
    workers = [_run_cli(config) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-2000:]
    _check_complete_study(storage, trials=16)


def test_deterministic_configurations_run_once_and_do_not_count(tiny, tmp_path):
    """Only neighbour and neighbour_kv, two budgets: 4 distinct configurations. Repeats are
    pruned without work and not counted, and the study stops once nothing new is left."""
    storage = f"sqlite:///{tmp_path}/study.db"
    path = write_config(tmp_path / "s.toml", tiny, storage, trials=10)
    text = path.read_text()
    start, end = text.index("[search.strategies.random]"), text.index("[promote]")
    path.write_text(
        text[:start].replace("allocation = [false, true]", "allocation = [false]") + text[end:]
    )
    study = Study(StudyConfig.load(path), progress=False)
    stage1 = study.stage1()
    complete = stage1.get_trials(states=(TrialState.COMPLETE,))
    assert sorted((t.params["budget"], t.params["strategy"]) for t in complete) == [
        (1.5, "neighbour"),
        (1.5, "neighbour_kv"),
        (2.0, "neighbour"),
        (2.0, "neighbour_kv"),
    ]
    copies = stage1.get_trials(states=(TrialState.PRUNED,))
    assert copies and all("copy_of" in t.user_attrs and "proxy" not in t.user_attrs for t in copies)
    from search.results import summary_table

    assert "4 trials, 4 distinct groupings (100%)" in summary_table("tiny", storage)


def test_candidates_own_the_projections_their_recovery_trains():
    from objectives.recovery.finetune import FinetuneConfig
    from objectives.recovery.layerwise import LayerwiseConfig
    from search.study import trained

    layerwise = ("layerwise", LayerwiseConfig())
    assert trained([layerwise]) == ()
    assert trained([("layerwise", LayerwiseConfig(train=("q", "k", "v")))]) == ("q",)
    assert trained([layerwise, ("finetune", FinetuneConfig(trainable=("o", "v")))]) == ("o",)
    assert trained([layerwise, ("finetune", FinetuneConfig(trainable="all"))]) == "all"


def test_kv_allocation_trials_spend_the_budget_on_k_and_v_as_the_curves_divide_it(tiny, tmp_path):
    from search.budget import Budget, allocate_kv_together, error_curves
    from search.strategies import make_strategy

    storage = f"sqlite:///{tmp_path}/study.db"
    path = write_config(tmp_path / "s.toml", tiny, storage, trials=8)  # 4 are the baselines
    path.write_text(
        path.read_text().replace("allocation = [false, true]", 'allocation = [false, "kv"]')
    )
    study = Study(StudyConfig.load(path), progress=False)
    stage1 = study.stage1()
    kv_trials = [
        t
        for t in stage1.get_trials(states=(TrialState.COMPLETE,))
        if t.params["allocation"] == "kv"
    ]
    assert kv_trials
    greedy, ctx = make_strategy("greedy", start="neighbour_kv"), study.context()
    curves = {kind: error_curves(greedy, ctx, kind) for kind in ("k", "v")}
    for t in kv_trials:
        budget = t.params["budget"]
        expected = allocate_kv_together(
            curves["k"], curves["v"], Budget.from_average(2, budget).total
        )
        assert Budget.of(Grouping.from_json(t.user_attrs["grouping"])) == expected
