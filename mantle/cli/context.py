"""What every command needs: its configuration and, on demand, the database."""

from __future__ import annotations

import argparse
from functools import cached_property
from pathlib import Path

from mantle.config import Config, load_config
from mantle.errors import CannotRead, SchemaOutdated
from mantle.logs import setup_logging

__all__ = ["Context", "read_workflow_file", "is_utf8", "MAX_WORKFLOW_BYTES"]

MAX_WORKFLOW_BYTES = 1024 * 1024
_FLAGS = ("database_url", "log_level", "api_address", "shutdown_timeout", "plugins_dir",
          "workers", "server", "api_key")


class Context:
    """Lazily loads config (and sets up logging) and opens the database for a command."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._database = None

    @cached_property
    def config(self) -> Config:
        flags = {name: getattr(self.args, name, None) for name in _FLAGS}
        config = load_config(flags, config_path=getattr(self.args, "config", None))
        # Commands other than serve log to stderr at warn unless a level was asked for.
        setup_logging(config.log_level if "log_level" in config.explicit else "warn")
        return config

    def database(self, require_head: bool = True):
        """Connect and bind the models; refuse a schema behind head when ``require_head``."""
        from mantle import credentials, db
        from mantle.db import migrations

        if self._database is None:
            self._database = db.connect(self.config.database_url)
            db.bind(self._database)
            # The engine resolves stored credentials far from any config object (13.2).
            credentials.configure_key(self.config.encryption_key)
        if require_head and not migrations.is_at_head(self._database):
            raise SchemaOutdated()
        return self._database

    def close(self) -> None:
        if self._database is not None:
            from mantle import db

            db.close_all(self._database)
            self._database = None


def read_workflow_file(path: str) -> bytes:
    """Read a workflow file, refusing directories and files over MAX_WORKFLOW_BYTES."""
    file = Path(path)
    try:
        with file.open("rb") as handle:
            raw = handle.read(MAX_WORKFLOW_BYTES + 1)
    except OSError as exc:
        raise CannotRead(path, exc.strerror or str(exc)) from exc
    if len(raw) > MAX_WORKFLOW_BYTES:
        raise CannotRead(path, f"file is larger than {MAX_WORKFLOW_BYTES} bytes")
    return raw


def is_utf8(text: str) -> bool:
    """False for an argument holding bytes that are not UTF-8 (Python keeps them as lone
    surrogates, which no database column, JSON document or HTTP body can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
