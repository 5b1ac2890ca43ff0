"""``GET /api/v1/workflows`` and its versions (SPEC 7.5, 13.1.1: secrets never served)."""

from __future__ import annotations

import re

from mantle.db.fields import MAX_INTEGER, storable
from mantle.db.models import Workflow, WorkflowDefinition
from mantle.errors import VersionNotFound, WorkflowNotFound
from mantle.timefmt import rfc3339
from web.errors import ApiError

__all__ = ["WorkflowCollection", "WorkflowItem", "VersionCollection", "VersionItem",
           "redacted", "REDACTED"]

REDACTED = "********"


def redacted(definition: dict) -> dict:
    """The definition with every ``triggers[].secret`` replaced by ``********`` (the key is
    kept, so a client sees that a secret is set; an empty one shows as it is, since it
    hides nothing); the stored document is not changed."""
    triggers = definition.get("triggers") if isinstance(definition, dict) else None
    if not isinstance(triggers, list):
        return definition
    shown = [{**trigger, "secret": REDACTED}
             if isinstance(trigger, dict) and trigger.get("secret") not in (None, "")
             else trigger for trigger in triggers]
    return {**definition, "triggers": shown}


def _pointer(name: str) -> Workflow:
    row = Workflow.get_or_none(Workflow.name == name) if storable(name) else None
    if row is None:
        raise WorkflowNotFound(name)
    return row


def _definition(name: str, version: int) -> WorkflowDefinition:
    row = WorkflowDefinition.get_or_none(WorkflowDefinition.workflow_name == name,
                                         WorkflowDefinition.version == version)
    if row is None:
        raise VersionNotFound(name, version)
    return row


class WorkflowCollection:
    def on_get(self, req, resp) -> None:
        resp.media = {"workflows": [
            {"name": row.name, "latest_version": row.current_version,
             "created_at": rfc3339(row.created_at), "updated_at": rfc3339(row.updated_at)}
            for row in Workflow.select().order_by(Workflow.name)]}


class WorkflowItem:
    def on_get(self, req, resp, name: str) -> None:
        pointer = _pointer(name)
        row = _definition(name, pointer.current_version)
        resp.media = {"name": name, "version": row.version,
                      "definition": redacted(row.definition)}


class VersionCollection:
    def on_get(self, req, resp, name: str) -> None:
        pointer = _pointer(name)
        rows = (WorkflowDefinition.select(WorkflowDefinition.version,
                                          WorkflowDefinition.content_hash,
                                          WorkflowDefinition.created_at)
                .where(WorkflowDefinition.workflow_name == name)
                .order_by(WorkflowDefinition.version.desc()))
        resp.media = {"name": name, "current_version": pointer.current_version,
                      "versions": [{"version": row.version, "content_hash": row.content_hash,
                                    "created_at": rfc3339(row.created_at)} for row in rows]}


class VersionItem:
    def on_get(self, req, resp, name: str, version: str) -> None:
        # Digits only, so "+1", " 1" and "1.0" are refused like "x".
        digits = version.lstrip("0")
        if not re.fullmatch(r"[0-9]+", version) or not digits:
            raise ApiError(400, "invalid version number")
        _pointer(name)
        # Beyond the integer column it cannot exist (and the query would overflow it); the
        # digits are compared as text: int() refuses more than 4300 of them.
        if len(digits) > len(str(MAX_INTEGER)) or int(digits) > MAX_INTEGER:
            raise VersionNotFound(name, digits)
        row = _definition(name, int(digits))
        resp.media = {"name": name, "version": row.version,
                      "definition": redacted(row.definition)}
