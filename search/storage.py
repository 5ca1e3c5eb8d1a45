"""Optuna storage from a URL: check the URL, open (or create) the storage, fail in one line.

sqlite:///f.db (one process), journal:f.log (processes on one machine), postgresql://... or
mysql://... (several machines). A malformed or unsupported URL, a missing database driver or an
unreachable server raise `StorageError` (a ValueError, so the CLI prints it and exits 2).
"""

from __future__ import annotations

import random
import time
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import optuna

JOURNAL = "journal:"
SQLITE = "sqlite:///"
# Database URL schemes (SQLAlchemy dialects, optionally "+driver") and the extra that installs
# a driver for each.
SERVER_SCHEMES = {"postgresql": "headgroup[postgres]", "mysql": "a MySQL driver (pymysql)"}
HEARTBEAT_S = 30  # a worker on another machine that stays silent this long ...
GRACE_S = 120  # ... and then this long has its RUNNING trial failed (and retried) by the others
CREATE_ATTEMPTS = 5
USAGE = "use sqlite:///FILE.db, journal:FILE.log, postgresql://USER@HOST:PORT/DB or mysql://..."


class StorageError(ValueError):
    """The storage URL is malformed or unsupported, or its server cannot be used."""


def check_url(url: str) -> str:
    """The URL's kind ("journal", "sqlite" or a server scheme such as "postgresql"), or raise."""
    if url.startswith(JOURNAL):
        if not url.removeprefix(JOURNAL):
            raise StorageError(f"storage {url!r}: no journal file path; {USAGE}")
        return "journal"
    if url.startswith("sqlite:"):
        if not url.startswith(SQLITE) or url == SQLITE:
            raise StorageError(f"storage {url!r}: malformed sqlite URL; {USAGE}")
        return "sqlite"
    scheme = url.split("://", 1)[0] if "://" in url else ""
    dialect = scheme.split("+", 1)[0]
    if dialect not in SERVER_SCHEMES:
        what = f"unsupported scheme {scheme!r}" if scheme else "not a storage URL"
        raise StorageError(f"storage {url!r}: {what}; {USAGE}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError as exc:
        raise StorageError(f"storage {url!r}: malformed URL ({exc})") from None
    if not parts.hostname and "host=" not in parts.query:
        raise StorageError(f"storage {url!r}: no server host; {USAGE}")
    return dialect


def _describe(exc: BaseException) -> str:
    """The first line of a database error, without SQLAlchemy's background-link footer."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """Open the storage at `url`, creating files and tables on first use."""
    kind = check_url(url)
    if kind == "journal":
        path = Path(url.removeprefix(JOURNAL))
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path)))
    if kind == "sqlite":  # one process: dead workers are found by pid instead
        Path(url.removeprefix(SQLITE)).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url)
    # Several machines: Optuna's heartbeat fails trials of workers that stopped answering.
    try:
        return _server_storage(url)
    except ImportError as exc:  # the dialect's driver is not installed
        raise StorageError(
            f"storage {_redact(url)}: no database driver ({exc.name or exc}); "
            f"install {SERVER_SCHEMES[kind]}"
        ) from None
    except Exception as exc:  # SQLAlchemy's OperationalError & co.: refused, auth, no database
        raise StorageError(f"storage {_redact(url)}: cannot connect: {_describe(exc)}") from None


def _server_storage(url: str) -> optuna.storages.RDBStorage:
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(CREATE_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 4-5
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
                )
        except (IntegrityError, ProgrammingError):
            # Workers started together race to create Optuna's tables on an empty database, and
            # PostgreSQL's CREATE TABLE is not idempotent under that race; the winner's tables
            # are there when we retry.
            if attempt == CREATE_ATTEMPTS - 1:
                raise
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


def _redact(url: str) -> str:
    """The URL without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
