"""The REST API's settings from ``mantle.config.Config`` (docs/configuration.md).

Parsed once, at ``mantle serve`` startup, so a bad value stops the daemon with ``Error: ...``
before it touches the database.
"""

from __future__ import annotations

import dataclasses
import threading

from mantle.durations import parse_duration
from mantle.errors import ConfigError
from mantle.text import whole_number

__all__ = ["ApiSettings", "DROPPED_HEADERS"]

# Request headers a webhook never stores nor shows to CEL: they carry credentials (SPEC 3.1
# ``trigger.headers``; issue 15). ``webhooks.drop_headers`` adds to this list.
DROPPED_HEADERS = ("authorization", "proxy-authorization", "cookie", "x-api-key",
                   "x-auth-token", "x-access-token", "x-csrf-token", "x-xsrf-token",
                   "x-amz-security-token", "x-gitlab-token")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0", "")


@dataclasses.dataclass(frozen=True, slots=True)
class ApiSettings:
    """``rate_limit``: requests per second per key (or client address), 0 = off;
    ``rate_burst``: the bucket's size; ``max_event_streams``: open SSE streams at once;
    ``auth_audit_interval``: seconds between ``auth.failed`` rows of one route;
    ``metrics_require_key``: ``/metrics`` behind a key while keys exist;
    ``dropped_headers``: lower-case header names webhooks drop."""

    rate_limit: float = 0.0
    rate_burst: float = 0.0
    max_event_streams: int = 100
    auth_audit_interval: float = 60.0
    metrics_require_key: bool = False
    dropped_headers: frozenset[str] = frozenset(DROPPED_HEADERS)

    @classmethod
    def from_config(cls, config) -> ApiSettings:
        """Parse the ``api.*``, ``metrics.*`` and ``webhooks.*`` settings; ConfigError names
        the first bad one."""
        rate = _number("api.rate_limit", config.api_rate_limit)
        burst = (_number("api.rate_burst", config.api_rate_burst)
                 if config.api_rate_burst.strip() else max(1.0, rate))
        if rate > 0 and burst < 1:
            raise ConfigError(f'invalid api.rate_burst "{config.api_rate_burst}": must be at '
                              "least 1 when api.rate_limit is set")
        streams = config.api_max_event_streams.strip()
        if whole_number(streams, 0, 10000) is None:
            raise ConfigError(f'invalid api.max_event_streams "{streams}": must be an integer '
                              "from 0 to 10000")
        try:
            interval = parse_duration(config.api_auth_audit_interval)
        except ValueError:
            interval = -1.0
        # Longer than a thread can wait (292 years) is refused like any other bad value.
        if not 0 < interval < threading.TIMEOUT_MAX:
            raise ConfigError(f'invalid api.auth_audit_interval '
                              f'"{config.api_auth_audit_interval}": must be a positive duration')
        flag = config.metrics_require_key.strip().lower()
        if flag not in _TRUE + _FALSE:
            raise ConfigError(f'invalid metrics.require_key "{config.metrics_require_key}": '
                              "must be true or false")
        extra = {name.strip().lower() for name in config.webhook_drop_headers.split(",")}
        return cls(rate_limit=rate, rate_burst=burst, max_event_streams=int(streams),
                   auth_audit_interval=interval, metrics_require_key=flag in _TRUE,
                   dropped_headers=frozenset(DROPPED_HEADERS) | (extra - {""}))


def _number(key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e9:
        raise ConfigError(f'invalid {key} "{text}": must be a number >= 0')
    return value
