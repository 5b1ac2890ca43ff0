"""Configuration: flags > ``MANTLE_*`` environment > ``mantle.yaml`` > defaults (SPEC 10.1)."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mantle.durations import parse_duration
from mantle.errors import ConfigError
from mantle.text import whole_number

__all__ = ["Config", "load_config", "parse_address", "LOG_LEVELS", "DEFAULTS"]

log = logging.getLogger(__name__)

LOG_LEVELS = ("debug", "info", "warn", "error")

# setting -> (dotted key in mantle.yaml, environment variable, default)
_SETTINGS: dict[str, tuple[str, str, str]] = {
    "database_url": ("database.url", "MANTLE_DATABASE_URL", "sqlite:///mantle.db"),
    "api_address": ("api.address", "MANTLE_API_ADDRESS", ":8080"),
    "log_level": ("log.level", "MANTLE_LOG_LEVEL", "info"),
    "shutdown_timeout": ("server.shutdown_timeout", "MANTLE_SHUTDOWN_TIMEOUT", "30s"),
    "plugins_dir": ("plugins.dir", "MANTLE_PLUGINS_DIR", ".mantle/plugins"),
    "workers": ("server.workers", "MANTLE_WORKERS", "1"),
    "lease_ttl": ("engine.lease_ttl", "MANTLE_LEASE_TTL", "15s"),
    "max_workflow_depth": ("engine.max_workflow_depth", "MANTLE_MAX_WORKFLOW_DEPTH", "10"),
    "server": ("", "MANTLE_SERVER", ""),
    "api_key": ("", "MANTLE_API_KEY", ""),
    "encryption_key": ("encryption.key", "MANTLE_ENCRYPTION_KEY", ""),
    "retention_execution_days": ("retention.execution_days", "MANTLE_RETENTION_EXECUTION_DAYS",
                                 ""),
    "retention_audit_days": ("retention.audit_days", "MANTLE_RETENTION_AUDIT_DAYS", ""),
    "retention_interval": ("retention.interval", "MANTLE_RETENTION_INTERVAL", "24h"),
    # The REST API in production (docs/configuration.md; parsed by web.settings).
    "api_rate_limit": ("api.rate_limit", "MANTLE_API_RATE_LIMIT", "0"),
    "api_rate_burst": ("api.rate_burst", "MANTLE_API_RATE_BURST", ""),
    "api_max_event_streams": ("api.max_event_streams", "MANTLE_API_MAX_EVENT_STREAMS", "100"),
    "api_auth_audit_interval": ("api.auth_audit_interval", "MANTLE_API_AUTH_AUDIT_INTERVAL",
                                "60s"),
    "metrics_require_key": ("metrics.require_key", "MANTLE_METRICS_REQUIRE_KEY", "false"),
    "webhook_drop_headers": ("webhooks.drop_headers", "MANTLE_WEBHOOK_DROP_HEADERS", ""),
}
DEFAULTS = {name: default for name, (_, _, default) in _SETTINGS.items()}
_FILE_SECTIONS = {"database": {"url"}, "log": {"level"},
                  "server": {"shutdown_timeout", "workers"}, "plugins": {"dir"},
                  "engine": {"lease_ttl", "max_workflow_depth"}, "env": None,
                  "encryption": {"key"},
                  "retention": {"execution_days", "audit_days", "interval"},
                  "api": {"address", "rate_limit", "rate_burst", "max_event_streams",
                          "auth_audit_interval"},
                  "metrics": {"require_key"}, "webhooks": {"drop_headers"}}
_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]]*):(?P<port>\d{1,5})$")


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """Resolved settings. ``explicit`` names the settings not taken from the defaults."""

    database_url: str
    api_address: str
    log_level: str
    shutdown_timeout: str
    plugins_dir: str
    workers: str
    lease_ttl: str
    max_workflow_depth: str
    server: str
    api_key: str
    encryption_key: str  # 64 hex characters, or "" (checked where it is used: 13.2)
    retention_execution_days: str  # "" = no retention (13.4)
    retention_audit_days: str
    retention_interval: str
    api_rate_limit: str
    api_rate_burst: str
    api_max_event_streams: str
    api_auth_audit_interval: str
    metrics_require_key: str
    webhook_drop_headers: str
    env: Mapping[str, str]
    explicit: frozenset[str]

    @property
    def shutdown_timeout_seconds(self) -> float:
        try:
            seconds = parse_duration(self.shutdown_timeout)
        except ValueError:
            seconds = -1.0
        if seconds < 0:
            raise ConfigError(
                f'invalid shutdown timeout "{self.shutdown_timeout}": '
                "must be a duration such as 30s"
            )
        return seconds

    @property
    def worker_count(self) -> int:
        """``server.workers``: worker processes of ``mantle serve`` (1 to 64)."""
        return _whole_number("workers", self.workers, 1, 64)

    @property
    def lease_ttl_seconds(self) -> float:
        """``engine.lease_ttl``: how long a node's lease lasts unrenewed (SPEC 13.7)."""
        try:
            seconds = parse_duration(self.lease_ttl)
        except ValueError:
            seconds = -1.0
        if seconds < 3:
            raise ConfigError(f'invalid lease ttl "{self.lease_ttl}": '
                              "must be a duration of at least 3s, such as 15s")
        return seconds

    @property
    def max_depth(self) -> int:
        """``engine.max_workflow_depth``: how deep sub-workflows may nest (SPEC 13.3)."""
        return _whole_number("max workflow depth", self.max_workflow_depth, 1, 1000)

    def address(self) -> tuple[str, int]:
        """The API address as ``(host, port)``; raises ConfigError when malformed."""
        return parse_address(self.api_address)


def _whole_number(name: str, text: str, low: int, high: int) -> int:
    value = whole_number(str(text), low, high)
    if value is None:
        raise ConfigError(f'invalid {name} "{text}": must be a whole number from {low} to '
                          f"{high}")
    return value


def parse_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:8080``, ``:8080``, port 0 allowed); empty host = all."""
    match = _ADDRESS.match(address or "")
    if not match or int(match.group("port")) > 65535:
        raise ConfigError(f'invalid API address "{address}": expected host:port')
    host = match.group("host").strip("[]")
    return host, int(match.group("port"))


def load_config(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    config_path: str | None = None,
) -> Config:
    """Resolve every setting. ``flags`` holds only the options given on the command line."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    file_values, file_env = _read_file(config_path or environ.get("MANTLE_CONFIG"), cwd)
    values: dict[str, str] = {}
    explicit = set()
    for name, (key, env_name, default) in _SETTINGS.items():
        for source in (flags.get(name), environ.get(env_name) or None, file_values.get(key)):
            if source is not None:
                values[name] = str(source)
                explicit.add(name)
                break
        else:
            values[name] = default
    level = values["log_level"].lower()
    if level not in LOG_LEVELS:
        raise ConfigError(
            f'invalid log level "{values["log_level"]}": must be one of debug, info, warn, error'
        )
    values["log_level"] = level
    env = {str(k).upper(): _env_text(v) for k, v in file_env.items()}
    env.update({k[len("MANTLE_ENV_"):]: v for k, v in environ.items()
                if k.startswith("MANTLE_ENV_") and len(k) > len("MANTLE_ENV_")})
    return Config(**values, env=env, explicit=frozenset(explicit))


def _env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _read_file(named: str | None, cwd) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (dotted key -> value, env mapping) from the config file, if there is one."""
    if named:
        path = Path(named)
    else:
        path = Path(cwd or ".") / "mantle.yaml"
        if not path.is_file():
            return {}, {}
    try:
        document = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f'cannot read config file "{path}": {_reason(exc)}') from exc
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(f'cannot read config file "{path}": top level must be a mapping')
    values: dict[str, Any] = {}
    for section, body in document.items():
        allowed = _FILE_SECTIONS.get(section, set())
        if section == "env":
            continue
        if section not in _FILE_SECTIONS or not isinstance(body, dict):
            log.warning("unknown config key", extra={"key": str(section)})
            continue
        for key, value in body.items():
            if key in allowed:
                # A YAML list (webhooks.drop_headers) is kept as the comma list the
                # environment variable takes.
                values[f"{section}.{key}"] = (",".join(map(str, value))
                                              if isinstance(value, list) else value)
            else:
                log.warning("unknown config key", extra={"key": f"{section}.{key}"})
    env = document.get("env") or {}
    if not isinstance(env, dict):
        raise ConfigError(f'cannot read config file "{path}": env must be a mapping')
    return values, env


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if isinstance(exc, UnicodeDecodeError):
        return "not valid UTF-8"
    if isinstance(exc, yaml.MarkedYAMLError):
        # By line and column only: PyYAML's own text quotes the lines, and the one at fault
        # may hold the encryption key or the database password.
        parts = [f"{text} (line {mark.line + 1}, column {mark.column + 1})" if mark else text
                 for text, mark in ((exc.context, exc.context_mark),
                                    (exc.problem, exc.problem_mark)) if text]
        return ": ".join(parts) or "not valid YAML"
    return " ".join(str(exc).split())
