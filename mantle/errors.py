"""The exception tree: one root, one subclass per condition.

The message of each exception is the user-facing text from SPEC.md (without the ``Error: ``
prefix the CLI adds), so every front end shows the same words.
"""

from __future__ import annotations

__all__ = [
    "MantleError",
    "GateClosed",
    "InvalidInput",
    "ConfigError",
    "CannotRead",
    "DatabaseUnavailable",
    "SchemaOutdated",
    "ValidationFailed",
    "WorkflowNotFound",
    "VersionNotFound",
    "NothingToRollBack",
    "AlreadyAtVersion",
    "WebhookPathTaken",
    "ExecutionNotFound",
    "ExecutionFinished",
    "LimitReached",
    "ShuttingDown",
    "EngineSaturated",
    "JournalStopped",
    "LeaseLost",
    "ExecutionStopped",
    "AlreadyClaimed",
]


class MantleError(Exception):
    """Root of every error mantle reports to a user."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(MantleError):
    """A value supplied by the user is malformed."""


class ConfigError(MantleError):
    """Configuration could not be loaded or holds a bad value."""


class CannotRead(MantleError):
    """A file named by the user cannot be read."""

    def __init__(self, path: str, reason: str):
        super().__init__(f'cannot read "{path}": {reason}')
        self.path = path
        self.reason = reason


class DatabaseUnavailable(MantleError):
    """The database cannot be reached."""

    def __init__(self, detail: str):
        super().__init__(f"failed to connect to database: {detail}")
        self.detail = detail


class SchemaOutdated(MantleError):
    def __init__(self) -> None:
        super().__init__("database schema is not up to date — run 'mantle init'")


class ValidationFailed(MantleError):
    """A workflow file broke one or more rules; ``errors`` holds them, sorted."""

    def __init__(self, errors: list):
        super().__init__("validation failed")
        self.errors = errors


class WorkflowNotFound(MantleError):
    def __init__(self, name: str):
        super().__init__(f'workflow "{name}" not found')
        self.name = name


class VersionNotFound(MantleError):
    def __init__(self, name: str, version: int | str):
        super().__init__(f'workflow "{name}" version {version} not found')
        self.name = name
        self.version = version


class NothingToRollBack(MantleError):
    def __init__(self, name: str):
        super().__init__(f'workflow "{name}" is at version 1 — nothing to roll back to')


class AlreadyAtVersion(MantleError):
    def __init__(self, name: str, version: int):
        super().__init__(f'workflow "{name}" is already at version {version}')


class WebhookPathTaken(MantleError):
    def __init__(self, path: str, owner: str):
        super().__init__(f'webhook path "{path}" is already registered by workflow "{owner}"')
        self.path = path
        self.owner = owner


class ExecutionNotFound(MantleError):
    def __init__(self, execution_id: str):
        super().__init__(f'execution "{execution_id}" not found')
        self.execution_id = execution_id


class ExecutionFinished(MantleError):
    """A command needs a pending or running execution, but it is final."""

    def __init__(self, execution_id: str, status: str):
        super().__init__(f"execution {execution_id} is already {status}")
        self.execution_id = execution_id
        self.status = status


class ShuttingDown(MantleError):
    """The engine starts nothing new: the process is stopping (SPEC 10.3)."""

    def __init__(self) -> None:
        super().__init__("server is shutting down")


class EngineSaturated(MantleError):
    """The engine's queues are long: new work is refused until they drain (503)."""

    def __init__(self) -> None:
        super().__init__("engine is saturated, retry later")


class JournalStopped(MantleError):
    """The journal stopped before the operation could be written."""


class GateClosed(MantleError):
    """A journal operation was dropped, not written: its gate closed before the commit."""


class LimitReached(MantleError):
    """A run over ``max_parallel_executions`` with ``on_limit: reject`` (SPEC 4.9): 429."""

    def __init__(self, workflow: str, limit: int):
        super().__init__(f'workflow "{workflow}" has reached the maximum of {limit} '
                         "concurrent executions")
        self.workflow = workflow
        self.limit = limit


class AlreadyClaimed(MantleError):
    """A run conditional on a claim (a cron minute) that another process made first."""

    def __init__(self) -> None:
        super().__init__("already started by another process")


class LeaseLost(MantleError):
    """A write for an execution was refused: another node owns it now (SPEC 13.7)."""

    def __init__(self, execution_id: str):
        super().__init__("execution lease lost")
        self.execution_id = execution_id


class ExecutionStopped(MantleError):
    """A write that would start something was refused: the execution is no longer running
    (a cancel committed that its owner had not heard of yet; SPEC 4.6)."""

    def __init__(self, execution_id: str, status: str | None):
        super().__init__(f"execution is {status}")
        self.execution_id = execution_id
        self.status = status
