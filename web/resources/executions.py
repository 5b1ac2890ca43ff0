"""``GET /api/v1/executions`` (paged), ``GET /api/v1/executions/{id}`` and
``GET /api/v1/executions/{id}/steps/{step}/output`` (SPEC 7.4, 13.8)."""

from __future__ import annotations


import falcon

from mantle import queries
from mantle.durations import since_filter
from mantle.text import whole_number
from web.errors import ApiError
from web.parsing import query_params

__all__ = ["ExecutionCollection", "ExecutionItem", "StepOutput", "list_filters"]

_STATUSES = ("pending", "running", "completed", "failed", "cancelled")


def list_filters(params: dict[str, str]) -> dict:
    """The list filters of 7.4 from query parameters, or the 400 for the first bad one."""
    status = params.get("status")
    if status is not None and status not in _STATUSES:
        raise ApiError(400, "invalid status: must be one of pending, running, completed, "
                            "failed, cancelled")
    try:
        since = since_filter(params.get("since"))
    except ValueError:
        raise ApiError(400, "invalid since parameter: must be a positive duration such as "
                            "90s, 30m, 1h30m or 7d") from None
    limit = whole_number(params.get("limit", "20"), 1, 1000, digits=7)
    if limit is None:
        raise ApiError(400, "invalid limit parameter: must be an integer from 1 to 1000")
    return {"workflow": params.get("workflow"), "status": status, "since": since,
            "limit": limit}


class ExecutionCollection:
    def on_get(self, req, resp) -> None:
        params = query_params(req)
        filters = list_filters(params)
        rows, cursor = queries.list_page(**filters, cursor=params.get("cursor"))
        resp.media = {"executions": rows, "next_cursor": cursor}


class ExecutionItem:
    def on_get(self, req, resp, id: str) -> None:  # noqa: A002 - the route's field name
        resp.media = queries.execution_detail(id)


class StepOutput:
    """The whole stored output of one step, which the detail shows truncated above 64 KiB."""

    def on_get(self, req, resp, id: str, step: str) -> None:  # noqa: A002
        output = queries.step_output(id, step)
        if output is None:  # falcon sends no body at all for ``media = None``
            resp.text = "null"
            resp.content_type = falcon.MEDIA_JSON
        else:
            resp.media = output
