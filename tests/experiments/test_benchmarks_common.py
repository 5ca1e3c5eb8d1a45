"""experiments.benchmarks.common: what the benchmark scripts share."""

from __future__ import annotations

from pathlib import Path

import pytest

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
