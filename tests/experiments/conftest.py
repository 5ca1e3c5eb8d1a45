"""Fixtures for the experiment scripts' tests."""

import sys

import pytest


@pytest.fixture
def usage_error(monkeypatch, capsys):
    """`usage_error(main, *args)` runs a script's `main` with those arguments, checks that it
    exits with status 2, and returns what it wrote to stderr."""

    def run(main, *args: str) -> str:
        monkeypatch.setattr(sys, "argv", ["script.py", *args])
        with pytest.raises(SystemExit) as exc:
            main()
        assert exc.value.code == 2
        return capsys.readouterr().err

    return run
