"""Stage 2 in rungs: a deliberately bad candidate is pruned on validation perplexity, a good one
completes, baselines always complete, and pruning compares candidates of one budget only."""

import json

import optuna
import pytest
import torch
from optuna.trial import TrialState

from gqa.grouping import Grouping
from search.config import StudyConfig
from search.study import STAGE2_SUFFIX, Study, grouping_key
from tests.search.study_fixtures import save_tiny_model, write_config

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture()
def study(tmp_path, smol_tokenizer, monkeypatch):
    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model(tmp_path / "model", smol_tokenizer)
    config = StudyConfig.load(
        write_config(tmp_path / "s.toml", model, f"sqlite:///{tmp_path}/s.db", trials=4)
    )
    return Study(config, progress=False)


def _item(grouping: Grouping, kind: str, budget, strategy: str) -> dict:
    return {
        "key": grouping_key(grouping),
        "kind": kind,
        "budget": budget,
        "strategy": strategy,
        "grouping": grouping.to_json(),
    }


def test_bad_candidate_is_pruned_and_good_one_completes(study, monkeypatch):
    layers, heads = 2, 6
    source = study.source_grouping
    neighbour = Grouping.neighbour(heads, layers, 2)
    good = source  # deliberately good: merging nothing is exact
    bad = Grouping.neighbour(heads, layers, 1)  # deliberately bad: one K and V head per layer
    items = [
        _item(source, "source", None, "source"),
        _item(neighbour, "baseline", 2.0, "neighbour"),
        {**_item(good, "searched", 2.0, "good"), "key": "good"},
        _item(bad, "searched", 2.0, "bad"),
        # The only one at its budget: nothing to beat (its own key: items are one per grouping).
        {**_item(bad, "searched", 1.5, "alone"), "key": "alone"},
    ]
    monkeypatch.setattr(Study, "candidates", lambda self, stage1: items)
    # A random tiny model's perplexity is near the vocabulary size whatever the grouping, so the
    # validation score here is the distance of the candidate's logits from the source's.
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = study.source(input_ids=ids).logits

    def validation_ppl(self, model):
        with torch.no_grad():
            return 1.0 + float((model(input_ids=ids).logits - reference).pow(2).mean())

    monkeypatch.setattr(Study, "validation_ppl", validation_ppl)
    stage2 = study.stage2(study.stage1())
    trials = {
        json.loads(t.user_attrs["item"])["strategy"]: t
        for t in stage2.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    }
    assert trials["bad"].state == TrialState.PRUNED
    assert trials["bad"].user_attrs["pruned_after"] == "layerwise"
    assert "ppl" not in trials["bad"].user_attrs  # it never read the test data
    for name in ("source", "neighbour", "good", "alone"):
        assert trials[name].state == TrialState.COMPLETE, name
    # The rung values live in the storage: merged, then after layer-wise recovery.
    assert set(trials["bad"].intermediate_values) == {0, 1}
    assert trials["good"].intermediate_values[1] < trials["bad"].intermediate_values[1]
    # Resuming does nothing new: pruned and complete items are both done.
    again = Study(study.config, progress=False).stage2(study.load_stage1())
    assert len(again.get_trials()) == len(stage2.get_trials())
    assert study.config.name + STAGE2_SUFFIX == again.study_name
