"""A fake OpenAI-compatible server: a real HTTP server on 127.0.0.1, scripted per test.

Answers are queued per path (``script``) and served in order; a path with an empty queue
answers 500 ``fake: nothing scripted``, so an unexpected extra call fails loudly. ``respond``
sets a function instead (the benchmark answers every call the same way). Every request is
recorded: path, headers, decoded JSON body, and whether its answer was delivered. Example::

    with FakeOpenAI() as fake:
        fake.script(text("hello"))
        fake.script(tool_calls(("lookup", {"city": "Oslo"})), text("done"))
        fake.script(error(429, "slow down", retry_after="1"), text("ok"))
        fake.script(text("late", hold=True))   # answered after fake.release()
        fake.base_url  -> "http://127.0.0.1:<port>/v1"
        fake.requests()[0].json["messages"]
"""

from __future__ import annotations

import json as jsonlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

__all__ = ["FakeOpenAI", "Answer", "Request", "text", "tool_calls", "error", "embedding",
           "CHAT", "EMBEDDINGS"]

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"


@dataclass
class Answer:
    """One scripted answer. ``body`` (raw bytes) wins over ``json``. ``delay`` waits before
    answering (cut short by ``close``); ``hold`` waits until ``FakeOpenAI.release``, which may
    drop the connection instead of answering."""

    status: int = 200
    json: Any = None
    body: bytes | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    delay: float = 0.0
    hold: bool = False
    gate: threading.Event = field(default_factory=threading.Event)
    drop: bool = False


@dataclass
class Request:
    """One request as the fake saw it; ``answered`` once its answer was written in full."""

    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    received_at: float  # time.monotonic()
    answered: bool = False

    @property
    def json(self) -> Any:
        return jsonlib.loads(self.body)


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def text(content: str | None, *, usage: tuple[int, int] = (10, 5), model: str = "fake-model",
         finish_reason: str = "stop", **options) -> Answer:
    """A chat completion whose message is ``content``."""
    return Answer(json={
        "id": "chatcmpl-fake", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "finish_reason": finish_reason,
                     "message": {"role": "assistant", "content": content}}],
        "usage": _usage(*usage)}, **options)


def tool_calls(*calls: tuple, usage: tuple[int, int] = (20, 8), model: str = "fake-model",
               **options) -> Answer:
    """A chat completion asking for tool calls, each ``(name, arguments[, id])``; arguments
    given as a map are sent JSON-encoded, as OpenAI does, a string as it is."""
    encoded = []
    for number, call in enumerate(calls):
        name, arguments = call[0], call[1]
        call_id = call[2] if len(call) > 2 else f"call-{name}-{number}"
        if not isinstance(arguments, str):
            arguments = jsonlib.dumps(arguments)
        encoded.append({"id": call_id, "type": "function",
                        "function": {"name": name, "arguments": arguments}})
    return Answer(json={
        "id": "chatcmpl-fake", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "finish_reason": "tool_calls",
                     "message": {"role": "assistant", "content": None,
                                 "tool_calls": encoded}}],
        "usage": _usage(*usage)}, **options)


def error(status: int, message: str, *, retry_after: str | None = None, **options) -> Answer:
    """An OpenAI-style error answer."""
    headers = [("Retry-After", retry_after)] if retry_after is not None else []
    return Answer(status=status, headers=headers,
                  json={"error": {"message": message, "type": "fake_error"}}, **options)


def embedding(*vectors: list[float], usage: int = 7, model: str = "fake-embed",
              **options) -> Answer:
    return Answer(json={
        "object": "list", "model": model,
        "data": [{"object": "embedding", "index": index, "embedding": vector}
                 for index, vector in enumerate(vectors)],
        "usage": {"prompt_tokens": usage, "total_tokens": usage}}, **options)


class FakeOpenAI:
    """The server; a context manager that closes it (dropping held requests)."""

    def __init__(self):
        self._lock = threading.Condition()
        self._scripts: dict[str, deque[Answer]] = {}
        self._responders: dict[str, Callable[[Request], Answer]] = {}
        self._held: list[Answer] = []
        self._requests: list[Request] = []
        self._closed = threading.Event()
        handler = type("Handler", (_Handler,), {"owner": self})
        server_class = type("Server", (ThreadingHTTPServer,), {"request_queue_size": 1024})
        self._server = server_class(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True,
                                        name=f"fake-openai-{self.port}")
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *answers: Answer, path: str = CHAT) -> None:
        """Queue answers for ``path``, served in order."""
        with self._lock:
            self._scripts.setdefault(path, deque()).extend(answers)

    def respond(self, function: Callable[[Request], Answer], path: str = CHAT) -> None:
        """Answer every request on ``path`` with ``function(request)`` (scripts go first)."""
        self._responders[path] = function

    def release(self, drop: bool = False) -> None:
        """Let held answers go, or with ``drop`` close their connections unanswered."""
        with self._lock:
            held, self._held = self._held, []
        for answer in held:
            answer.drop = drop
            answer.gate.set()

    def requests(self, path: str | None = CHAT) -> list[Request]:
        with self._lock:
            return [r for r in self._requests if path is None or r.path == path]

    def wait_for_requests(self, count: int, path: str | None = CHAT, timeout: float = 10.0,
                          held: bool = False) -> list[Request]:
        """Block until ``count`` requests reached ``path`` (and, with ``held``, one answer is
        held); AssertionError at the deadline."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while (len([r for r in self._requests if path is None or r.path == path]) < count
                   or (held and not self._held)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{path}: {count} request(s) not seen in {timeout}s "
                                         f"(seen {len(self._requests)})")
                self._lock.wait(left)
            return [r for r in self._requests if path is None or r.path == path]

    def close(self) -> None:
        self._closed.set()
        self.release(drop=True)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> FakeOpenAI:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- handler threads ---

    def _answer_for(self, request: Request) -> Answer:
        with self._lock:
            self._requests.append(request)
            queue = self._scripts.get(request.path)
            if queue:
                answer = queue.popleft()
            elif request.path in self._responders:
                answer = None
            else:
                answer = error(500, "fake: nothing scripted")
            if answer is not None and answer.hold:
                self._held.append(answer)
            self._lock.notify_all()
        return answer if answer is not None else self._responders[request.path](request)

    def _answered(self, request: Request) -> None:
        with self._lock:
            request.answered = True
            self._lock.notify_all()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FakeOpenAI

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                          time.monotonic())
        answer = self.owner._answer_for(request)
        if answer.hold:
            answer.gate.wait()
        elif answer.delay:
            self.owner._closed.wait(answer.delay)
        if answer.drop:
            self.close_connection = True
            return
        data = answer.body if answer.body is not None else jsonlib.dumps(answer.json).encode()
        try:
            self.send_response(answer.status)
            for name, value in answer.headers:
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        self.owner._answered(request)

    do_GET = do_POST

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass
