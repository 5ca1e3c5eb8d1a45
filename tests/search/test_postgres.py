"""The study on a real PostgreSQL server: three workers share it; a SIGKILLed worker is replaced."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState

from search.study import STAGE2_SUFFIX
from tests.search.pg_server import bindir, postgres_server
from tests.search.study_fixtures import save_tiny_model, write_config
from tests.search.test_study import _check_complete_study, _run_cli, _trials

pytestmark = pytest.mark.skipif(
    bindir() is None,
    reason="PostgreSQL server binaries (initdb, pg_ctl) not found via pg_config --bindir or PATH",
)


@pytest.fixture()
def tiny(tmp_path, smol_tokenizer, monkeypatch):
    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path / "cache"))
    return save_tiny_model(tmp_path / "model", smol_tokenizer)


@pytest.fixture(scope="module")
def postgres():
    with postgres_server() as server:
        yield server


def test_three_workers_share_one_postgres_study(postgres, tiny, tmp_path):
    storage = postgres.create_database("three_workers")
    config = write_config(tmp_path / "s.toml", tiny, storage, trials=16)
    workers = [_run_cli(config) for _ in range(3)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-2000:]
    stage1, _ = _check_complete_study(storage, trials=16)
    # every worker did some of stage 1 (the work was shared, not done three times by one)
    assert len({t.user_attrs["worker"] for t in stage1}) >= 2


def test_sigkilled_worker_is_replaced_on_postgres(postgres, tiny, tmp_path):
    storage = postgres.create_database("sigkill")
    config = write_config(tmp_path / "s.toml", tiny, storage)
    killed = _run_cli(config, {"HEADGROUP_FAULT": "stage2:1"})
    killed.communicate(timeout=300)
    assert killed.returncode == -9
    stage2 = "tiny" + STAGE2_SUFFIX
    assert _trials(storage, stage2, states=(TrialState.RUNNING,)), "no trial was in flight"
    resumed = _run_cli(config)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    _check_complete_study(storage, trials=12)
    failed = _trials(storage, stage2, states=(TrialState.FAIL,))
    assert len(failed) == 1  # the killed trial; its item was retried and completed
    item = failed[0].user_attrs["item_key"]
    assert [t.user_attrs["item_key"] for t in _trials(storage, stage2)].count(item) == 1
