"""experiments.benchmarks.common: what the benchmark scripts share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.benchmarks import common
from experiments.benchmarks.common import CsvRows, saved_grouping, throwaway_study
from gqa.grouping import Grouping
from tests.search.study_fixtures import save_tiny_model, write_config


def test_csv_rows_resume_from_the_file(tmp_path):
    path = tmp_path / "out" / "rows.csv"
    table = CsvRows(path)
    assert table.rows == []
    table.append({"model": "a", "ppl": 1.5})
    table.append({"model": "b", "ppl": 2.0})
    resumed = CsvRows(path)
    assert resumed.rows == [{"model": "a", "ppl": 1.5}, {"model": "b", "ppl": 2.0}]
    assert list(resumed.frame()["model"]) == ["a", "b"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["rows.csv"]  # no temporary left


def test_saved_grouping_needs_exactly_one_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("g").mkdir()
    grouping = Grouping.neighbour(4, 2, 2)
    grouping.save(Path("g/2kv_a_1.json"))
    assert saved_grouping("g/2kv_a_*.json") == grouping
    with pytest.raises(SystemExit, match="found 0"):
        saved_grouping("g/3kv_*.json")
    grouping.save(Path("g/2kv_a_2.json"))
    with pytest.raises(SystemExit, match="found 2"):
        saved_grouping("g/2kv_a_*.json")


def test_throwaway_study_leaves_the_configured_storage_alone(tmp_path, smol_tokenizer, monkeypatch):
    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model(tmp_path / "model", smol_tokenizer)
    storage = f"sqlite:///{tmp_path}/study.db"
    config = write_config(tmp_path / "tiny.toml", model, storage)
    with throwaway_study(config, seed=3) as study:
        assert study.config.storage != storage and study.config.name == "tiny"
        assert study.config.seed == 3  # fields replaced as asked
        assert study.source_grouping.num_layers == study.adapter.num_layers
    assert not (tmp_path / "study.db").exists()


def test_long_task_fields_keep_per_document_losses(smol_tokenizer):
    """The fields the long-context benchmarks record: the score, and JSON per-document losses
    (long_ppl) or per-prompt outcomes (passkey) for paired intervals; the model is left as it was
    (the precision plan is applied for the run only)."""
    from gqa.precision import PrecisionPlan, model_precision
    from objectives.long_context import LongContextConfig
    from tests.tiny import tiny_model

    model = tiny_model(num_kv_heads=3, vocab_size=49152)
    config = LongContextConfig(seq_len=64, ppl_windows=2, buckets=(32,), lengths=(64,), trials=1)
    plan = PrecisionPlan.uniform(2, 4, 4, group_size=8)
    ppl = common.long_task_fields(model, plan, smol_tokenizer, "long_ppl", config)
    losses = json.loads(ppl["outcomes"])
    assert len(losses) == 2 and ppl["loss"] == pytest.approx(sum(losses) / 2)
    assert list(json.loads(ppl["detail"])["buckets"]) == ["0-31", "32-63"]
    keys = common.long_task_fields(model, None, smol_tokenizer, "passkey", config)
    assert len(json.loads(keys["outcomes"])) == len(config.depths)
    assert model_precision(model) is None
