"""Export: a stage-2 candidate rebuilt, saved self-contained, described and checked."""

import json

import optuna
import pytest
from optuna.trial import TrialState

import gqa
from experiments.cli import main
from gqa.grouping import Grouping
from search.config import StudyConfig
from search.storage import make_storage
from search.study import STAGE2_SUFFIX, Study
from tests.search.study_fixtures import save_tiny_model, write_config

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, smol_tokenizer):
    tmp = tmp_path_factory.mktemp("export")
    mp = pytest.MonkeyPatch()
    mp.setenv("HEADGROUP_CACHE", str(tmp / "cache"))
    model = save_tiny_model(tmp / "model", smol_tokenizer)
    storage = f"sqlite:///{tmp}/study.db"
    # No pruning: on a random tiny model it is arbitrary, and export needs a complete candidate.
    config = write_config(tmp / "s.toml", model, storage, pruner="none")
    Study(StudyConfig.load(config), progress=False).run()
    yield storage
    mp.undo()


def _stage2(storage):
    return optuna.load_study(study_name="tiny" + STAGE2_SUFFIX, storage=make_storage(storage))


def test_export_by_budget_rebuilds_the_recorded_model(finished_study, tmp_path, capsys):
    out = tmp_path / "winner"
    argv = ["export", "--study", "tiny", "--storage", finished_study, "--budget", "1.5"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "matches" in printed and "DOES NOT" not in printed
    complete = _stage2(finished_study).get_trials(states=(TrialState.COMPLETE,))
    searched = [
        t
        for t in complete
        if json.loads(t.user_attrs["item"])["kind"] == "searched"
        and json.loads(t.user_attrs["item"])["budget"] == 1.5
    ]
    best = min(searched, key=lambda t: t.user_attrs.get("valid_ppl", t.user_attrs["ppl"]))
    grouping = Grouping.from_json(json.loads(best.user_attrs["item"])["grouping"])
    assert Grouping.load(out / "grouping.json") == grouping
    assert gqa.model_grouping(gqa.load(out)) == grouping or grouping.is_uniform_shared()
    card = (out / "README.md").read_text()
    assert f"stage-2 trial {best.number}" in card
    assert f"{best.user_attrs['kv_bytes']} bytes/token" in card
    assert "matches" in card and "layerwise" in card
    assert f"{best.user_attrs['ppl']:.4g}" in card  # the study's own numbers


def test_export_refuses_pruned_and_missing_trials(finished_study, tmp_path, capsys):
    study = _stage2(finished_study)
    pruned = study.ask()
    study.tell(pruned, state=TrialState.PRUNED)
    for trial, message in ((pruned.number, "was pruned"), (999, "no stage-2 trial 999")):
        argv = ["export", "--study", "tiny", "--storage", finished_study, "--trial", str(trial)]
        assert main([*argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "x").exists()


def test_convert_with_query_aware_merge_and_recovery(finished_study, tmp_path, capsys):
    model = str(
        json.loads(
            optuna.load_study(study_name="tiny", storage=make_storage(finished_study)).user_attrs[
                "config"
            ]
        )["model"]
    )  # noqa: E501
    out = tmp_path / "qa"
    argv = ["convert", "--model", model, "--kv-heads", "2", "--merge", "query_aware"]
    assert main([*argv, "--recovery", "layerwise", "--out", str(out)]) == 0
    assert "KV heads 12 -> 8" in capsys.readouterr().out
    assert gqa.load(out).config.num_key_value_heads == 2  # uniform: plain HF GQA
