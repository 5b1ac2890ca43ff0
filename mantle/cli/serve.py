"""``mantle serve`` (SPEC 6.3, 10): load config, log JSON to stdout, connect, run the daemon."""

from __future__ import annotations

import argparse
import sys

from mantle.cli.context import Context
from mantle.logs import setup_logging
from mantle.text import whole_number

__all__ = ["serve", "threads_argument", "DEFAULT_THREADS"]

DEFAULT_THREADS = 8


def threads_argument(text: str) -> int:
    """argparse type of ``--threads``: HTTP worker threads, 1 to 256."""
    threads = whole_number(text, 1, 256)
    if threads is None:
        raise argparse.ArgumentTypeError(f'invalid thread count "{text}": must be 1 to 256')
    return threads


def serve(args, context: Context) -> int:
    # JSON on stdout before the config is read, so its warnings (unknown keys) are JSON too.
    setup_logging("info", sys.stdout, background=True)
    config = context.config
    setup_logging(config.log_level, sys.stdout, background=True)
    timeout = config.shutdown_timeout_seconds
    config.address()  # a bad address is a configuration error: before touching the database
    config.lease_ttl_seconds, config.max_depth  # the same for these
    from mantle.retention import retention_from
    retention_from(config)  # so is a bad retention setting
    if config.encryption_key:  # and a malformed key (a missing one only matters when used)
        from mantle.credentials import parse_key
        parse_key(config.encryption_key)
    from web.settings import ApiSettings
    ApiSettings.from_config(config)  # the API's settings too
    workers = config.worker_count
    threads = args.threads or DEFAULT_THREADS
    if workers > 1:
        from mantle.daemon.arbiter import Arbiter

        # The parent forks: no logging thread may exist before (each worker starts its own).
        setup_logging(config.log_level, sys.stdout)
        return Arbiter(config, context, workers, threads, timeout).run()
    database = context.database(require_head=False)
    from mantle.daemon import Daemon

    return Daemon(config, database, threads=threads, shutdown_timeout=timeout).run()
