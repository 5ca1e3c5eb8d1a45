"""`headgroup dashboard` serves optuna-dashboard: the study and its user attributes are there."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest

from search.storage import make_storage

pytest.importorskip("optuna_dashboard", reason="needs the dashboard extra (optuna-dashboard)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_dashboard_serves_the_study_with_its_user_attrs(tmp_path):
    storage = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(study_name="shown", storage=make_storage(storage))
    study.set_user_attr("config", '{"model": "tiny"}')
    study.enqueue_trial({"x": 1.0}, user_attrs={"grouping": "{}"})
    study.optimize(lambda t: t.suggest_float("x", 0, 2), n_trials=1)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "experiments.cli", "dashboard", "--storage", storage]
        + ["--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline, studies = time.monotonic() + 60, None
        while studies is None and time.monotonic() < deadline:
            assert server.poll() is None, server.communicate()[1][-2000:]
            try:
                studies = _get(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
            except OSError:
                time.sleep(0.3)
        assert studies is not None, "the dashboard did not answer within 60 s"
        (summary,) = [s for s in studies if s["study_name"] == "shown"]
        assert {"key": "config", "value": '{"model": "tiny"}'} in summary["user_attrs"]
        detail = _get(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}")
        assert {"key": "grouping", "value": "{}"} in detail["trials"][0]["user_attrs"]
    finally:
        server.terminate()
        server.wait(timeout=30)
