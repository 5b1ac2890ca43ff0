"""What every actor of one engine shares: the journal, timers, metrics and settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import pykka

from actors.journal import Journal
from actors.timers import Timers
from mantle.metrics import Metrics

__all__ = ["EngineContext", "tell"]


def tell(ref: pykka.ActorRef, message) -> None:
    """``ref.tell`` for callbacks that may outlive the actor (journal, timers): a message to
    an actor that already stopped is dropped, not an error."""
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        pass


@dataclasses.dataclass(frozen=True, slots=True)
class EngineContext:
    journal: Journal
    timers: Timers
    metrics: Metrics
    runner: str             # "<hostname>:<pid>"
    hostname: str
    plugins_dir: str
    env: Mapping[str, str]
    secrets: Mapping[str, str]  # where MANTLE_SECRET_* are read (os.environ in production)
