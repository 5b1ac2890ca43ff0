"""The first schema: every table of SPEC 4.11.

Frozen: these classes are this migration's own copy of the tables, built from plain peewee
fields, so later changes to ``mantle.db.models`` never change what 001 creates. Index names are
spelled out so a later migration can drop or replace one by name.
"""

from __future__ import annotations

import peewee

__all__ = ["NAME", "up", "down"]

NAME = "001_initial_schema"


def _tables(database: peewee.Database) -> list[type[peewee.Model]]:
    """Fresh model classes bound to ``database`` (fresh, so concurrent runs never share them)."""

    class Base(peewee.Model):
        class Meta:
            legacy_table_names = False

    Base._meta.set_database(database)

    class Workflow(Base):
        name = peewee.CharField(max_length=255, primary_key=True)
        current_version = peewee.IntegerField()
        created_at = peewee.DateTimeField()
        updated_at = peewee.DateTimeField()

        class Meta:
            table_name = "workflows"

    class WorkflowDefinition(Base):
        id = peewee.AutoField()
        workflow_name = peewee.CharField(max_length=255)
        version = peewee.IntegerField()
        raw_yaml = peewee.TextField()
        definition = peewee.TextField()
        content_hash = peewee.CharField(max_length=64)
        created_at = peewee.DateTimeField()

        class Meta:
            table_name = "workflow_definitions"

    class WorkflowTrigger(Base):
        id = peewee.AutoField()
        workflow_name = peewee.CharField(max_length=255)
        version = peewee.IntegerField()
        type = peewee.CharField(max_length=16)
        schedule = peewee.CharField(max_length=255, null=True)
        path = peewee.CharField(max_length=255, null=True)
        secret = peewee.TextField(null=True)
        last_fired_at = peewee.DateTimeField(null=True)
        created_at = peewee.DateTimeField()

        class Meta:
            table_name = "workflow_triggers"

    class WorkflowExecution(Base):
        id = peewee.CharField(max_length=36, primary_key=True)
        workflow_name = peewee.CharField(max_length=255)
        version = peewee.IntegerField()
        status = peewee.CharField(max_length=16)
        inputs = peewee.TextField()
        trigger = peewee.TextField()
        error = peewee.TextField(null=True)
        started_at = peewee.DateTimeField()
        completed_at = peewee.DateTimeField(null=True)
        runner = peewee.CharField(max_length=255, null=True)
        idempotency_key = peewee.CharField(max_length=255, null=True)
        retry_of = peewee.CharField(max_length=36, null=True)

        class Meta:
            table_name = "workflow_executions"

    class StepExecution(Base):
        id = peewee.BigAutoField()
        execution = peewee.ForeignKeyField(WorkflowExecution, column_name="execution_id",
                                           on_delete="CASCADE", index=False)
        step_name = peewee.CharField(max_length=255)
        attempt = peewee.IntegerField()
        status = peewee.CharField(max_length=16)
        is_hook = peewee.BooleanField(default=False)
        hook_block = peewee.CharField(max_length=16, null=True)
        output = peewee.TextField(null=True)
        error = peewee.TextField(null=True)
        started_at = peewee.DateTimeField(null=True)
        completed_at = peewee.DateTimeField(null=True)

        class Meta:
            table_name = "step_executions"

    class AuditEvent(Base):
        id = peewee.BigAutoField()
        timestamp = peewee.DateTimeField()
        actor = peewee.CharField(max_length=255)
        action = peewee.CharField(max_length=64)
        resource_type = peewee.CharField(max_length=64)
        resource_id = peewee.CharField(max_length=255)
        metadata = peewee.TextField()

        class Meta:
            table_name = "audit_events"

    class ApiKey(Base):
        id = peewee.AutoField()
        name = peewee.CharField(max_length=64)
        prefix = peewee.CharField(max_length=16)
        key_hash = peewee.CharField(max_length=64)
        created_at = peewee.DateTimeField()
        last_used_at = peewee.DateTimeField(null=True)
        revoked_at = peewee.DateTimeField(null=True)

        class Meta:
            table_name = "api_keys"

    class Runner(Base):
        id = peewee.CharField(max_length=255, primary_key=True)
        hostname = peewee.CharField(max_length=255)
        pid = peewee.IntegerField()
        started_at = peewee.DateTimeField()
        heartbeat_at = peewee.DateTimeField()

        class Meta:
            table_name = "runners"

    def index(model, name, *fields, unique=False):
        model.add_index(model.index(*fields, unique=unique, name=name))

    index(WorkflowDefinition, "workflow_definitions_workflow_name",
          WorkflowDefinition.workflow_name)
    index(WorkflowDefinition, "workflow_definitions_workflow_name_version",
          WorkflowDefinition.workflow_name, WorkflowDefinition.version, unique=True)
    index(WorkflowTrigger, "workflow_triggers_workflow_name", WorkflowTrigger.workflow_name)
    index(WorkflowTrigger, "workflow_triggers_path", WorkflowTrigger.path, unique=True)
    index(WorkflowExecution, "workflow_executions_started_at_id",
          WorkflowExecution.started_at, WorkflowExecution.id)
    index(WorkflowExecution, "workflow_executions_workflow_name_status",
          WorkflowExecution.workflow_name, WorkflowExecution.status)
    index(WorkflowExecution, "workflow_executions_status", WorkflowExecution.status)
    index(WorkflowExecution, "workflow_executions_runner_status",
          WorkflowExecution.runner, WorkflowExecution.status)
    index(WorkflowExecution, "workflow_executions_workflow_name_idempotency_key",
          WorkflowExecution.workflow_name, WorkflowExecution.idempotency_key, unique=True)
    index(StepExecution, "step_executions_execution_id", StepExecution.execution)
    index(StepExecution, "step_executions_execution_id_is_hook_step_name_attempt",
          StepExecution.execution, StepExecution.is_hook, StepExecution.step_name,
          StepExecution.attempt, unique=True)
    index(AuditEvent, "audit_events_timestamp", AuditEvent.timestamp)
    index(ApiKey, "api_keys_name", ApiKey.name, unique=True)
    index(ApiKey, "api_keys_key_hash", ApiKey.key_hash, unique=True)

    return [Workflow, WorkflowDefinition, WorkflowTrigger, WorkflowExecution, StepExecution,
            AuditEvent, ApiKey, Runner]


def up(database: peewee.Database) -> None:
    for model in _tables(database):
        model.create_table(safe=False)


def down(database: peewee.Database) -> None:
    for model in reversed(_tables(database)):
        model.drop_table(safe=True)
