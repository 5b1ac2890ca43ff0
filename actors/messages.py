"""Messages between the actors: frozen values carrying ids and JSON-able data only.

Commands are imperative (``StartExecution``), events past tense (``AttemptFinished``).
pykka does not copy messages, so nothing here may hold a mutable object that two threads
would share, except the explicitly thread-safe ``threading.Event`` and pykka futures used as
reply slots.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RunRequest",
    "Created",
    "StartExecution",
    "CancelExecution",
    "Shutdown",
    "Tick",
    "ResumeOrphans",
    "Ping",
    "LiveCount",
    "ExecutionEnded",
    "AcquireStepSlot",
    "ReleaseStepSlot",
    "StepSlotGranted",
    "Begin",
    "Cancel",
    "Written",
    "WriteFailed",
    "TimerFired",
    "RunAttempt",
    "Interrupt",
    "SleepElapsed",
    "AttemptFinished",
    "StopNow",
]


# --- Supervisor commands (from outside the actor system or from Execution actors) ---

@dataclass(frozen=True, slots=True)
class RunRequest:
    """Create an execution; ``reply`` receives a RunResult or an exception.

    Written by the journal directly (``actors.supervisor.create``); the Supervisor hears
    ``Created`` once the row is committed.
    """

    workflow: str
    inputs: Any
    version: int | None
    trigger: Any
    actor: str
    idempotency_key: str | None
    reply: Any  # actors.context.Reply
    retry_of: str | None = None
    from_step: str | None = None
    reuse: tuple = ()  # step rows copied from the original by ``mantle retry``
    deadline: float | None = None  # time.monotonic() when the caller stops waiting


@dataclass(frozen=True, slots=True)
class Created:
    """A RunRequest's execution is committed (``running``, or ``pending`` when queued)."""

    request: RunRequest
    created: Any  # mantle.store.Created


@dataclass(frozen=True, slots=True)
class StartExecution:
    """Start (or resume) an execution whose row exists and belongs to this runner."""

    execution_id: str
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class CancelExecution:
    execution_id: str
    actor: str
    reply: Any  # actors.context.Reply receiving the status string before the cancel


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Start no more work; interrupt what still runs at ``deadline`` (monotonic seconds)."""

    deadline: float


@dataclass(frozen=True, slots=True)
class Tick:
    """Periodic housekeeping: heartbeat, cross-process cancels, queue, orphans."""


@dataclass(frozen=True, slots=True)
class ResumeOrphans:
    """Scan for orphaned executions now (daemon startup)."""


@dataclass(frozen=True, slots=True)
class Ping:
    """Answered with True while the Supervisor processes messages (systemd watchdog)."""


@dataclass(frozen=True, slots=True)
class LiveCount:
    """Answered with the number of Execution actors alive."""


@dataclass(frozen=True, slots=True)
class ExecutionEnded:
    """An Execution actor is done (final status written, or left for resume)."""

    execution_id: str
    workflow: str
    status: str


@dataclass(frozen=True, slots=True)
class AcquireStepSlot:
    """Ask for one of a step's ``max_parallel`` slots; granted with StepSlotGranted."""

    execution_id: str
    workflow: str
    step: str
    limit: int


@dataclass(frozen=True, slots=True)
class ReleaseStepSlot:
    execution_id: str
    workflow: str
    step: str


# --- Execution actor ---

@dataclass(frozen=True, slots=True)
class StepSlotGranted:
    step: str


@dataclass(frozen=True, slots=True)
class Begin:
    """Everything the Execution actor needs to run, loaded by the Supervisor.

    ``rows`` are the step rows already stored (resume, retry), as plain dicts.
    """

    execution: dict
    rows: tuple = ()
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class Cancel:
    """The execution row is already ``cancelled``; stop everything."""


@dataclass(frozen=True, slots=True)
class Written:
    """A journal write committed; ``then`` names the continuation, ``data`` its argument."""

    then: str
    data: Any = None


@dataclass(frozen=True, slots=True)
class WriteFailed:
    then: str
    error: str


@dataclass(frozen=True, slots=True)
class TimerFired:
    """``kind``: ``step_timeout``, ``retry``, ``workflow_timeout``, ``hooks_timeout``."""

    kind: str
    step: str = ""
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class StopNow:
    """Shutdown deadline reached: interrupt attempts, leave rows for the next runner."""


# --- Step actor ---

@dataclass(frozen=True, slots=True)
class RunAttempt:
    invocation: Any  # mantle.connectors.Invocation (frozen)
    attempt: int
    hook: bool = False


@dataclass(frozen=True, slots=True)
class Interrupt:
    """Stop the attempt now (its ``cancel`` event is already set)."""


@dataclass(frozen=True, slots=True)
class SleepElapsed:
    """A ``core/sleep`` attempt's timer fired."""


@dataclass(frozen=True, slots=True)
class AttemptFinished:
    """One attempt ended. ``interrupted``: its cancel event was set while it ran."""

    step: str
    attempt: int
    hook: bool
    ok: bool
    output: Any = None
    error: str | None = None
    retryable: bool = True
    interrupted: bool = False
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None

