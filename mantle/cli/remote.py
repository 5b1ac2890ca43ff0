"""``run``, ``cancel``, ``retry`` and ``logs -f`` through a running ``mantle serve``
(``--server`` / MANTLE_SERVER)."""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING

from mantle.cli.output import print_json, wants_json
from mantle.cli.progress import LiveLines
from mantle.config import Config
from mantle.errors import MantleError

if TYPE_CHECKING:
    from mantle.cli.executions import _Signals

__all__ = ["run", "cancel", "retry", "follow", "ApiClient", "ServerUnreachable"]

_FINAL = ("completed", "failed", "cancelled")
# How long ``logs -f --server`` keeps reconnecting to a server that went away (a restart).
_RECONNECT_FOR = 60.0

# After the server shows a final status, how long step rows may take to settle (as in-process).
_SETTLE_GRACE = 5.0


class ServerUnreachable(MantleError):
    def __init__(self, url: str, reason: str):
        super().__init__(f"cannot reach server at {url}: {reason}")


class ApiClient:
    """A tiny JSON client over urllib; API errors become MantleError with the body's text."""

    def __init__(self, base: str, api_key: str | None):
        self.base = base.rstrip("/")
        self.api_key = api_key

    def request(self, method: str, path: str, body=None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        try:
            req = urllib.request.Request(self.base + path, data=data, method=method)
        except ValueError as exc:  # a malformed --server URL ("unknown url type")
            raise ServerUnreachable(self.base, str(exc)) from exc
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                payload = json.loads(exc.read() or b"{}")
            except ValueError:
                payload = {}
            return exc.code, payload
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerUnreachable(self.base, str(reason)) from exc


def _client(args, config: Config) -> ApiClient:
    return ApiClient(args.server or config.server, args.api_key or config.api_key or None)


def _check(status: int, payload: dict) -> dict:
    if status >= 400:
        raise MantleError(payload.get("error") or f"server answered {status}")
    return payload


def run(args, config: Config) -> int:
    from mantle.cli.executions import _Signals, _typed

    client = _client(args, config)
    name = urllib.parse.quote(args.workflow, safe="")
    status, definition = client.request("GET", f"/api/v1/workflows/{name}")
    if status == 404:
        from mantle.cli.executions import NotApplied
        raise NotApplied(args.workflow)
    declared = _check(status, definition).get("definition", {}).get("inputs") or {}
    inputs = {}
    for pair in args.input:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise MantleError(f'invalid input format "{pair}" — expected key=value')
        if key not in declared:
            raise MantleError(f'unknown input "{key}"')
        kind = (declared[key] or {}).get("type") if isinstance(declared[key], dict) else None
        inputs[key] = _typed(key, text, kind)
    as_json = wants_json(args)
    with _Signals() as signals:  # from before the POST: an early Ctrl-C cancels what it creates
        accepted = _check(*client.request("POST", f"/api/v1/run/{name}", {"inputs": inputs}))
        execution_id = accepted["execution_id"]
        if not as_json:
            print(f"Running {accepted['workflow']} (version {accepted['version']})...",
                  flush=True)
        detail, interrupted = _follow(client, execution_id, None if as_json else LiveLines(),
                                      signals)
    if as_json:
        print_json(detail)
    else:
        print(f"Execution {execution_id}: {detail['status']}")
    from mantle.cli.executions import _exit_for
    return 130 if interrupted else _exit_for(detail)


def _follow(client: ApiClient, execution_id: str, live: LiveLines | None,
            signals: _Signals) -> tuple[dict, bool]:
    """Poll the detail until the execution is final and its step rows have settled, printing
    live step lines (13.1.2) when ``live`` is given; the first SIGINT/SIGTERM (since
    ``signals`` was entered) cancels it. The final detail, and whether a signal came."""
    interrupted = False
    final_since = None
    while True:
        detail = _check(*client.request("GET", f"/api/v1/executions/{execution_id}"))
        if detail["status"] in _FINAL:
            final_since = final_since or time.monotonic()
        # A cancel is committed before the running steps are interrupted: give their rows
        # a moment to settle, so the lines show how each step ended.
        settled = final_since is not None and (
            not _busy(detail) or time.monotonic() - final_since > _SETTLE_GRACE)
        for line in live.new_lines(detail, last=settled) if live else ():
            print(line, flush=True)
        if settled:
            return detail, interrupted
        if signals.caught.is_set() and not interrupted:
            interrupted = True
            client.request("POST", f"/api/v1/cancel/{execution_id}")
        time.sleep(0.2)


def _busy(detail: dict) -> bool:
    return any(step["status"] in ("pending", "running")
               for step in detail["steps"] + detail.get("hooks", []))


def cancel(args, config: Config) -> int:
    client = _client(args, config)
    # Quoted, so any text reaches the server as the id (and gets its "not found").
    execution = urllib.parse.quote(args.execution_id, safe="")
    status, payload = client.request("POST", f"/api/v1/cancel/{execution}")
    if status == 409:
        print(f"Execution {args.execution_id} is already {payload.get('status')}")
        return 0
    _check(status, payload)
    print(f"Cancelled execution {args.execution_id}")
    return 0


def _seconds(step: dict) -> float | None:
    if step["started_at"] is None or step["completed_at"] is None:
        return None
    started, completed = (dt.datetime.fromisoformat(step[key].replace("Z", "+00:00"))
                          for key in ("started_at", "completed_at"))
    return (completed - started).total_seconds()


def retry(args, config: Config) -> int:
    """``mantle retry --server``: ``POST /api/v1/retry/{execution}``, then wait as ``run``."""
    from mantle.cli.executions import _exit_for, _Signals
    from mantle.cli.retry import step_lines
    from mantle.retries import NotFailed

    client = _client(args, config)
    execution = urllib.parse.quote(args.execution_id, safe="")
    body = {} if args.from_step is None else {"from_step": args.from_step}
    with _Signals() as signals:  # from before the POST, as ``run``
        status, payload = client.request("POST", f"/api/v1/retry/{execution}", body)
        if status == 409 and "status" in payload:  # the CLI words every status alike (6.2)
            raise NotFailed(args.execution_id, payload["status"])
        accepted = _check(status, payload)
        print(f'Retrying execution {args.execution_id} from step "{accepted["from_step"]}"...',
              flush=True)
        detail, interrupted = _follow(client, accepted["execution_id"], None, signals)
    print(f"Execution {accepted['execution_id']}: {detail['status']}")
    for line in step_lines(set(accepted.get("reused", ())), _seconds)(detail):
        print(line)
    return 130 if interrupted else _exit_for(detail)


def _events(client: ApiClient, path: str, last_id: str | None):
    """(event, data, id) of a Server-Sent Events stream until it ends (urllib)."""
    req = urllib.request.Request(client.base + path, headers={"Accept": "text/event-stream"})
    if client.api_key:
        req.add_header("Authorization", f"Bearer {client.api_key}")
    if last_id:
        req.add_header("Last-Event-ID", last_id)
    try:
        response = urllib.request.urlopen(req, timeout=60)  # keep-alives come every 15 s
    except urllib.error.HTTPError as exc:
        try:
            payload = json.loads(exc.read() or b"{}")
        except ValueError:
            payload = {}
        _check(exc.code, payload)
        raise
    except (urllib.error.URLError, OSError) as exc:
        raise ServerUnreachable(client.base, str(getattr(exc, "reason", exc))) from exc
    with response:
        fields: dict[str, str] = {}
        for raw in response:
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line:
                if "event" in fields:
                    yield fields["event"], json.loads(fields.get("data") or "{}"), fields.get("id")
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value


def follow(args, config: Config) -> int:
    """``mantle logs -f --server``: the execution's event stream, as step lines (13.1.2);
    reconnects with ``Last-Event-ID`` when the connection drops."""
    from mantle.cli.executions import _exit_for, print_followed

    client = _client(args, config)
    execution = urllib.parse.quote(args.execution_id, safe="")
    printed: set[str] = set()
    last_id = None
    hooks_seen = False
    connected = time.monotonic()
    while True:
        try:
            for kind, data, event_id in _events(client, f"/api/v1/executions/{execution}/events",
                                                last_id):
                last_id, connected = event_id or last_id, time.monotonic()
                if kind == "step.finished":
                    if data.get("block") is not None and not hooks_seen:
                        # Hooks run once every main step is final; the stream has no event
                        # for one that never started: its line comes first, as in ``run``.
                        hooks_seen = True
                        _main_steps(client, execution, printed)
                    print_followed(data, printed)
                elif kind == "execution.finished":
                    detail = _check(*client.request("GET", f"/api/v1/executions/{execution}"))
                    return _exit_for(_ended(detail, printed))
            connected = time.monotonic()  # ended without the finish: the server is stopping
        except ServerUnreachable:
            if last_id is None or time.monotonic() - connected > _RECONNECT_FOR:
                raise
        time.sleep(1.0)


def _main_steps(client: ApiClient, execution: str, printed: set[str]) -> None:
    """The lines of main steps not printed yet, once hooks have started (all are final)."""
    from mantle.cli.executions import print_followed
    from mantle.cli.progress import finish_key

    detail = _check(*client.request("GET", f"/api/v1/executions/{execution}"))
    for step in sorted(detail["steps"], key=finish_key):
        print_followed({"step": step["name"], "status": step["status"]}, printed)


def _ended(detail: dict, printed: set[str]) -> dict:
    from mantle.cli.executions import print_followed

    for step in detail["steps"]:  # steps that never ran print nothing on the stream
        print_followed({"step": step["name"], "status": step["status"]}, printed)
    print(f"Execution {detail['id']}: {detail['status']}")
    return detail
