"""Messages between the actors: frozen values carrying ids and JSON-able data only.

Commands are imperative (``StartExecution``), events past tense (``AttemptFinished``). A
journal write's continuation is an event like any other (``AttemptRowWritten``), matched by
type, never a method name in a string (STYLE habit 13). pykka does not copy messages, so
nothing here may hold a mutable object two threads would share, except the thread-safe reply
slots and cancel tokens named as such.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

__all__ = [
    # Supervisor
    "RunRequest", "Created", "StartExecution", "SnapshotLoaded", "StartFailed",
    "CancelExecution", "CancelCommitted", "CancelNotified", "Tick", "Promoted", "Claimed",
    "OwnedFound", "CancelsFound", "LeaseLapsed", "OwnersChecked", "Ping", "LiveCount",
    "ExecutionEnded", "AcquireStepSlot", "ReleaseStepSlot", "Shutdown", "StopNow", "AwaitChild",
    "ChildResult", "ChildrenCancelled",
    # Execution actor
    "Begin", "Cancel", "LeaseLost", "StepSlotGranted", "Prepared", "PrepareAgain",
    "AttemptRowWritten", "RetryRowsWritten", "StepRecorded", "HooksStarted", "ExecutionClosed",
    "WriteRefused", "WriteFailed", "StartRefused", "StepTimedOut", "BackoffEnded",
    "SleepEnded", "InterruptGraceOver", "WorkflowTimedOut", "HooksTimedOut", "AttemptFinished",
    "ChildCreated", "ChildFinished",
]


# --- Supervisor: commands from outside the actors (Engine, CLI, web) ---

@dataclass(frozen=True, slots=True)
class RunRequest:
    """Create an execution; ``reply`` (actors.context.Reply) receives a RunResult or an error.

    Written by the journal directly (``actors.supervisor.submit_run``); the Supervisor hears
    ``Created`` once the row is committed.
    """

    workflow: str
    inputs: Any
    version: int | None
    trigger: Any
    actor: str
    idempotency_key: str | None
    reply: Any
    retry_of: str | None = None
    from_step: str | None = None
    reuse: tuple = ()  # step rows copied from the original by ``mantle retry``
    deadline: float | None = None  # time.monotonic() when the caller stops waiting
    parent: Any = None  # mantle.store.Parent of a sub-workflow's child
    # A child's parent's (id, epoch): created only while the parent's owner holds it (13.7).
    fence: tuple[str, int] | None = None
    # Called in the creating transaction; False: another process claimed the run first (a
    # cron minute), which is then not created and answered AlreadyClaimed.
    claim: Any = None


@dataclass(frozen=True, slots=True)
class CancelExecution:
    execution_id: str
    actor: str
    reply: Any  # actors.context.Reply receiving the status found before the cancel


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Start nothing more; interrupt what still runs at ``deadline`` (monotonic seconds)."""

    deadline: float


@dataclass(frozen=True, slots=True)
class StopNow:
    """Shutdown deadline reached: interrupt attempts, leave their rows for the next owner."""


@dataclass(frozen=True, slots=True)
class Ping:
    """Answered with True while the Supervisor handles messages (systemd watchdog)."""


@dataclass(frozen=True, slots=True)
class LiveCount:
    """Answered with the number of Execution actors alive."""


# --- Supervisor: events ---

@dataclass(frozen=True, slots=True)
class Created:
    """A RunRequest's execution is committed (``running``, or ``pending`` when queued)."""

    request: RunRequest
    created: Any  # mantle.store.Created


@dataclass(frozen=True, slots=True)
class StartExecution:
    """Run an execution this node owns under ``epoch`` (promoted, or taken over)."""

    execution_id: str
    epoch: int
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class SnapshotLoaded:
    start: StartExecution
    snapshot: Any  # (execution, model, rows) or None


@dataclass(frozen=True, slots=True)
class StartFailed:
    """The snapshot of an execution to start could not be loaded (not an outage); ``error``
    is None when the journal stopped (shutdown) first."""

    execution_id: str
    epoch: int
    error: BaseException | None


@dataclass(frozen=True, slots=True)
class CancelCommitted:
    request: CancelExecution
    cancelled: Any  # mantle.store.Cancelled or None (unknown id)
    channels: Any  # {owner node id: (host_key, channel)}


@dataclass(frozen=True, slots=True)
class CancelNotified:
    """Some node committed ``cancelled`` for this execution (channel, NOTIFY or backstop)."""

    execution_id: str


@dataclass(frozen=True, slots=True)
class Tick:
    """Periodic housekeeping: queue, takeover, cancel backstop."""


@dataclass(frozen=True, slots=True)
class Promoted:
    promoted: tuple  # (execution id, epoch)


@dataclass(frozen=True, slots=True)
class Claimed:
    claimed: tuple  # (execution id, epoch)


@dataclass(frozen=True, slots=True)
class OwnedFound:
    owned: tuple  # (execution id, epoch) of the running executions this node owns


@dataclass(frozen=True, slots=True)
class CancelsFound:
    execution_ids: tuple


@dataclass(frozen=True, slots=True)
class LeaseLapsed:
    """This node's lease ran out before it was renewed: check which executions are still
    ours."""


@dataclass(frozen=True, slots=True)
class OwnersChecked:
    lost: tuple  # ids of live executions whose epoch changed


@dataclass(frozen=True, slots=True)
class ExecutionEnded:
    """An Execution actor is done: final status written, or left for another owner
    (``interrupted`` at shutdown, ``lost`` to another node)."""

    execution_id: str
    workflow: str
    status: str


@dataclass(frozen=True, slots=True)
class AcquireStepSlot:
    """Ask for one of a step's ``max_parallel`` slots for one attempt (``token``); a hook
    step's (``hook``) are its own, apart from those of a main step of the same name."""

    execution_id: str
    workflow: str
    step: str
    token: int
    limit: int
    hook: bool = False


@dataclass(frozen=True, slots=True)
class ReleaseStepSlot:
    execution_id: str
    workflow: str
    step: str
    token: int
    hook: bool = False


@dataclass(frozen=True, slots=True)
class AwaitChild:
    """Tell ``parent`` (an Execution actor's ref) when ``child_id`` ends (sub-workflows):
    the child of ``attempt`` of the main step, or the hook (``hook``), named ``step``."""

    child_id: str
    parent: Any  # pykka.ActorRef
    step: str
    attempt: int
    hook: bool


@dataclass(frozen=True, slots=True)
class ChildrenCancelled:
    """An Execution actor's write ended a step attempt and cancelled its children with it
    (sub-workflows, 13.3): their owners, here or elsewhere, stop them."""

    cancelled: tuple  # (execution id, workflow, owner node) of each execution cancelled
    channels: Any  # {owner node id: (host_key, channel)} of the owners on other nodes


@dataclass(frozen=True, slots=True)
class ChildResult:
    """An awaited child's state, read from the database: ``detail`` is None while it runs."""

    execution_id: str
    detail: Any


# --- Execution actor ---

@dataclass(frozen=True, slots=True)
class Begin:
    """Everything the Execution actor needs, loaded by the Supervisor. ``rows`` are the step
    rows already stored (resume, retry) as plain dicts."""

    execution: dict
    rows: tuple = ()
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class Cancel:
    """The execution row is already ``cancelled``; stop everything."""


@dataclass(frozen=True, slots=True)
class LeaseLost:
    """Another node owns the execution now: stop at once, write nothing more."""


@dataclass(frozen=True, slots=True)
class StepSlotGranted:
    step: str
    token: int
    hook: bool = False


@dataclass(frozen=True, slots=True)
class Prepared:
    """A step's ``if``, templates and credential, evaluated off the actor's thread.

    ``skip`` (condition false) or ``error`` (the step fails without retry), else ``params``
    and ``credential`` for its attempts."""

    step: str
    hook: bool
    skip: bool = False
    error: str | None = None
    params: Any = None
    credential: Any = None
    retry: bool = False  # the database could not be read: prepare again shortly


@dataclass(frozen=True, slots=True)
class PrepareAgain:
    step: str
    hook: bool


@dataclass(frozen=True, slots=True)
class AttemptRowWritten:
    step: str
    hook: bool
    attempt: int


@dataclass(frozen=True, slots=True)
class StartRefused:
    """The attempt's ``running`` row was refused: the execution is no longer running."""
    written: AttemptRowWritten


@dataclass(frozen=True, slots=True)
class RetryRowsWritten:
    step: str
    hook: bool
    attempt: int  # the next attempt, waiting out its back-off
    error: str | None = None  # the failed attempt's (``step retrying``)
    delay_ms: int = 0


@dataclass(frozen=True, slots=True)
class StepRecorded:
    """A step's final status is committed (with the execution's, when ``closing``)."""

    step: str
    hook: bool
    closing: Any = None  # (status, error) of the execution, or None
    changed: bool = True  # whether the closing status won (a cancel may have come first)


@dataclass(frozen=True, slots=True)
class HooksStarted:
    """``hooks_since`` and the outcome the hooks run for are committed (hooks.timeout counts
    from the first; a node resuming the hooks takes the second)."""

    outcome: Any = None  # {status, error, failed_step}


@dataclass(frozen=True, slots=True)
class ExecutionClosed:
    """The execution's final status is committed, unless a cancel won (``changed``);
    ``closed``: the steps whose open rows it ended ``cancelled`` at ``completed_at``, as
    (step, is_hook) (the internal-error path, 13.1.12)."""

    status: str
    changed: bool
    closed: tuple = ()
    completed_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class WriteRefused:
    """A write was refused by its fence: the execution has another owner."""


@dataclass(frozen=True, slots=True)
class WriteFailed:
    """A write failed for a reason other than an outage (a value or constraint the database
    refuses, a bug): the execution ends ``failed`` (SPEC 13.1.12)."""

    error: str


@dataclass(frozen=True, slots=True)
class StepTimedOut:
    step: str
    hook: bool
    attempt: int


@dataclass(frozen=True, slots=True)
class BackoffEnded:
    step: str
    hook: bool
    attempt: int


@dataclass(frozen=True, slots=True)
class SleepEnded:
    step: str
    hook: bool
    attempt: int


@dataclass(frozen=True, slots=True)
class InterruptGraceOver:
    """An interrupted attempt did not report back in time; it is treated as ended."""

    step: str
    hook: bool
    attempt: int


@dataclass(frozen=True, slots=True)
class WorkflowTimedOut:
    pass


@dataclass(frozen=True, slots=True)
class HooksTimedOut:
    pass


@dataclass(frozen=True, slots=True)
class AttemptFinished:
    """One attempt ended. ``interrupted``: its cancel token was set while it ran."""

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


@dataclass(frozen=True, slots=True)
class ChildCreated:
    """A ``workflow/run`` attempt's child execution exists (or existed already)."""

    step: str
    hook: bool
    attempt: int
    result: Any  # actors.supervisor.RunResult, or the MantleError to fail with


@dataclass(frozen=True, slots=True)
class ChildFinished:
    """A ``workflow/run`` attempt's child execution ended; ``detail`` is its final state."""

    step: str
    hook: bool
    attempt: int
    detail: Any  # {"execution_id", "status", "error", "steps"}
