"""The live models, bound at run time through ``database_proxy`` (STYLE habit 5).

The schema itself is created by the migrations (``mantle.db.migrations``); these classes must
describe the same tables and columns, which ``tests/mantle/test_db_schema.py`` checks against a
migrated database. A change here needs a new migration.
"""

from __future__ import annotations

import uuid

import peewee

from mantle.db.connect import database_proxy
from mantle.db.fields import JSONField, UtcDateTimeField

__all__ = [
    "BaseModel", "Workflow", "WorkflowDefinition", "WorkflowTrigger", "WorkflowExecution",
    "StepExecution", "AuditEvent", "ApiKey", "Node", "Credential", "SchemaMigration",
    "ALL_MODELS",
]


class BaseModel(peewee.Model):
    class Meta:
        database = database_proxy
        legacy_table_names = False


class Workflow(BaseModel):
    """The current-version pointer of one workflow (moved by apply and rollback)."""

    name = peewee.CharField(max_length=255, primary_key=True)
    current_version = peewee.IntegerField()
    created_at = UtcDateTimeField()
    updated_at = UtcDateTimeField()
    # The last minute any cron trigger of the workflow fired: it outlives the trigger rows, so
    # a trigger removed and brought back does not fire that minute again (SPEC 8).
    cron_fired_at = UtcDateTimeField(null=True)

    class Meta:
        table_name = "workflows"


class WorkflowDefinition(BaseModel):
    """One immutable version: the YAML as applied, its parsed form and SHA-256."""

    id = peewee.AutoField()
    workflow_name = peewee.CharField(max_length=255, index=True)
    version = peewee.IntegerField()
    raw_yaml = peewee.TextField()
    definition = JSONField()
    content_hash = peewee.CharField(max_length=64)
    created_at = UtcDateTimeField()

    class Meta:
        table_name = "workflow_definitions"
        indexes = ((("workflow_name", "version"), True),)


class WorkflowTrigger(BaseModel):
    """A cron or webhook trigger of the current version; a webhook path has one owner."""

    id = peewee.AutoField()
    workflow_name = peewee.CharField(max_length=255, index=True)
    version = peewee.IntegerField()
    type = peewee.CharField(max_length=16)
    schedule = peewee.CharField(max_length=255, null=True)
    path = peewee.CharField(max_length=255, null=True, unique=True)
    secret = peewee.TextField(null=True)
    last_fired_at = UtcDateTimeField(null=True)
    created_at = UtcDateTimeField()

    class Meta:
        table_name = "workflow_triggers"


def _new_execution_id() -> str:
    return str(uuid.uuid4())


class WorkflowExecution(BaseModel):
    """One run of one version, owned by the node ``owner`` under fencing ``epoch`` (13.7)."""

    id = peewee.CharField(max_length=36, primary_key=True, default=_new_execution_id)
    workflow_name = peewee.CharField(max_length=255)
    version = peewee.IntegerField()
    status = peewee.CharField(max_length=16)
    inputs = JSONField()
    trigger = JSONField()
    error = peewee.TextField(null=True)
    started_at = UtcDateTimeField()
    completed_at = UtcDateTimeField(null=True)
    idempotency_key = peewee.CharField(max_length=255, null=True)
    retry_of = peewee.CharField(max_length=36, null=True)
    owner = peewee.CharField(max_length=36, null=True)
    epoch = peewee.IntegerField(default=0)
    running_since = UtcDateTimeField(null=True)
    hooks_since = UtcDateTimeField(null=True)
    # {status, error, failed_step}: what the hooks run for, fixed when they begin (4.8)
    outcome = JSONField(null=True)
    parent_execution_id = peewee.CharField(max_length=36, null=True)
    parent_step = peewee.CharField(max_length=255, null=True)
    depth = peewee.IntegerField(default=1)

    class Meta:
        table_name = "workflow_executions"
        indexes = (
            (("started_at", "id"), False),
            (("workflow_name", "status"), False),
            (("status",), False),
            (("workflow_name", "idempotency_key"), True),
            (("owner", "status"), False),
            (("parent_execution_id",), False),
            (("completed_at",), False),
        )


class StepExecution(BaseModel):
    """One attempt of one step (or hook step); the unique key makes re-writes idempotent."""

    id = peewee.BigAutoField()
    execution = peewee.ForeignKeyField(WorkflowExecution, column_name="execution_id",
                                       backref="steps", on_delete="CASCADE", index=True)
    step_name = peewee.CharField(max_length=255)
    attempt = peewee.IntegerField()
    status = peewee.CharField(max_length=16)
    is_hook = peewee.BooleanField(default=False)
    hook_block = peewee.CharField(max_length=16, null=True)
    output = JSONField(null=True)
    error = peewee.TextField(null=True)
    started_at = UtcDateTimeField(null=True)
    completed_at = UtcDateTimeField(null=True)
    wait_kind = peewee.CharField(max_length=16, null=True)  # "sleep" | "retry" (13.1.11)
    wait_until = UtcDateTimeField(null=True)
    progress = JSONField(null=True)  # a connector's checkpoint inside the attempt

    class Meta:
        table_name = "step_executions"
        indexes = ((("execution", "is_hook", "step_name", "attempt"), True),)


class AuditEvent(BaseModel):
    """Append-only record of who did what (SPEC 9.3), and the event log of executions
    (``mantle.events``). Migration 005 adds an expression index on the execution id (the
    ``resource_id`` of ``workflow_execution`` rows, the ``execution_id`` of the metadata
    otherwise) and a trigger on ``workflow_executions`` that appends ``execution.finished``
    rows; neither is expressible here, and queries spell the index's expression themselves."""

    id = peewee.BigAutoField()
    timestamp = UtcDateTimeField(index=True)
    actor = peewee.CharField(max_length=255)
    action = peewee.CharField(max_length=64)
    resource_type = peewee.CharField(max_length=64)
    resource_id = peewee.CharField(max_length=255)
    metadata = JSONField()

    class Meta:
        table_name = "audit_events"


class ApiKey(BaseModel):
    """An API key; only its SHA-256 (hex) is stored."""

    id = peewee.AutoField()
    name = peewee.CharField(max_length=64, unique=True)
    prefix = peewee.CharField(max_length=16)
    key_hash = peewee.CharField(max_length=64, unique=True)
    created_at = UtcDateTimeField()
    last_used_at = UtcDateTimeField(null=True)
    revoked_at = UtcDateTimeField(null=True)
    role = peewee.CharField(max_length=16, default="admin")
    expires_at = UtcDateTimeField(null=True)

    class Meta:
        table_name = "api_keys"


class Node(BaseModel):
    """A process that runs executions (13.7): a random ``id`` per process start, never
    ``hostname:pid``. ``lease_expires_at`` is in the database's clock; ``channel`` is where
    the node hears cancels on its host (an abstract Unix socket name), if anywhere."""

    id = peewee.CharField(max_length=36, primary_key=True)
    hostname = peewee.CharField(max_length=255)
    pid = peewee.IntegerField()
    kind = peewee.CharField(max_length=16)  # serve | worker | run
    host_key = peewee.CharField(max_length=64)  # boot id + pid namespace (mantle.services.nodes)
    channel = peewee.CharField(max_length=255, null=True)
    started_at = UtcDateTimeField()
    lease_expires_at = UtcDateTimeField(index=True)

    class Meta:
        table_name = "nodes"


class Credential(BaseModel):
    """An encrypted credential (13.2): AES-256-GCM ciphertext (base64) of its JSON fields,
    the nonce (base64) and the id of the key that encrypted it; never the value itself."""

    name = peewee.CharField(max_length=255, primary_key=True)
    type = peewee.CharField(max_length=16)
    ciphertext = peewee.TextField()
    nonce = peewee.CharField(max_length=32)
    key_id = peewee.CharField(max_length=16)
    created_at = UtcDateTimeField()
    updated_at = UtcDateTimeField()

    class Meta:
        table_name = "credentials"


class SchemaMigration(BaseModel):
    """Applied migrations; written only by ``mantle.db.migrations``."""

    name = peewee.CharField(max_length=255, primary_key=True)
    applied_at = UtcDateTimeField()

    class Meta:
        table_name = "schema_migrations"


ALL_MODELS = (Workflow, WorkflowDefinition, WorkflowTrigger, WorkflowExecution, StepExecution,
              AuditEvent, ApiKey, Node, Credential, SchemaMigration)
