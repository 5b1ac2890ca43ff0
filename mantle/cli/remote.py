"""``run`` and ``cancel`` through a running ``mantle serve`` (``--server`` / MANTLE_SERVER)."""

from __future__ import annotations

import json

import time
import urllib.error
import urllib.parse
import urllib.request

from mantle.config import Config
from mantle.errors import MantleError

__all__ = ["run", "cancel", "ApiClient"]


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
    from mantle.cli.executions import _typed

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
    accepted = _check(*client.request("POST", f"/api/v1/run/{name}", {"inputs": inputs}))
    execution_id = accepted["execution_id"]
    print(f"Running {accepted['workflow']} (version {accepted['version']})...", flush=True)
    from mantle.cli.executions import _Signals, _exit_for
    interrupted = False
    with _Signals() as signals:
        while True:
            detail = _check(*client.request("GET", f"/api/v1/executions/{execution_id}"))
            if detail["status"] in ("completed", "failed", "cancelled"):
                break
            if signals.caught.is_set() and not interrupted:
                interrupted = True
                client.request("POST", f"/api/v1/cancel/{execution_id}")
            time.sleep(0.2)
    print(f"Execution {execution_id}: {detail['status']}")
    for step in detail["steps"]:
        print(f"  {step['name']}: {step['status']}")
    return 130 if interrupted else _exit_for(detail)


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



