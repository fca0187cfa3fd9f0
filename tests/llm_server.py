"""A scripted OpenAI-compatible chat server on loopback, for testing the ``openai`` agent backend.

A real ``ThreadingHTTPServer`` on 127.0.0.1 (port 0: the OS picks a free one) in a thread, so the
client's whole HTTP path runs: headers, JSON bodies, status codes, Retry-After, read timeouts. Each
test queues the behaviours its requests will meet, one per request, in order; every request is
recorded (path, headers, JSON body) so a test can see what the client sent. Nothing leaves the
machine.

    with LoopbackLLM() as server:
        server.script(malformed(), answer(plan_json))
        client = ChatClient(server.base_url, "test-model", ...)
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Behaviour:
    """What the server does with one request."""

    status: int = 200
    content: str | None = None  # the assistant message's text (for a 200)
    refusal: str | None = None
    finish_reason: str = "stop"
    delay_s: float = 0.0  # sleep before answering (longer than the client's timeout: a timeout)
    headers: dict[str, str] = field(default_factory=dict)
    error: str = ""  # the error message of a non-200 answer


def answer(content: str | dict | Any) -> Behaviour:
    """A valid completion whose message content is ``content`` (dicts and models are dumped)."""
    if hasattr(content, "model_dump_json"):
        content = content.model_dump_json()
    elif not isinstance(content, str):
        content = json.dumps(content)
    return Behaviour(content=content)


def malformed() -> Behaviour:
    return Behaviour(content='{"label": "cognitive effort", "events": [ {"start_s": 0.0,')


def slow(content: str, delay_s: float) -> Behaviour:
    return Behaviour(content=content, delay_s=delay_s)


def rate_limited(retry_after: str | None = "0") -> Behaviour:
    return Behaviour(status=429, headers={} if retry_after is None else {"Retry-After": retry_after},
                     error="Rate limit reached, retry later")


def server_error(status: int = 500) -> Behaviour:
    return Behaviour(status=status, error="the model crashed")


def refusal(text: str = "I'm sorry, I cannot help with that.") -> Behaviour:
    return Behaviour(refusal=text)


def content_filtered() -> Behaviour:
    return Behaviour(content="", finish_reason="content_filter")


def bad_request(error: str = "invalid request") -> Behaviour:
    return Behaviour(status=400, error=error)


@dataclass(frozen=True)
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages", [])

    @property
    def response_format(self) -> dict[str, Any] | None:
        return self.body.get("response_format")


class LoopbackLLM:
    """The server, its script and what it heard.

    ``json_schema_supported=False`` plays a server without structured outputs: any request whose
    ``response_format`` is ``json_schema`` gets a 400 without consuming the script.
    """

    def __init__(self, json_schema_supported: bool = True) -> None:
        self.json_schema_supported = json_schema_supported
        self.requests: list[Recorded] = []
        self._script: deque[Behaviour] = deque()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        # a short poll so that shutdown() at the end of each test returns at once
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="loopback-llm", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def script(self, *behaviours: Behaviour) -> None:
        with self._lock:
            self._script.extend(behaviours)

    @property
    def remaining(self) -> int:
        with self._lock:
            return len(self._script)

    def __enter__(self) -> LoopbackLLM:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------------------------------
    def _next(self, body: dict[str, Any]) -> Behaviour:
        fmt = body.get("response_format") or {}
        if not self.json_schema_supported and fmt.get("type") == "json_schema":
            return bad_request("response_format type 'json_schema' is not supported")
        with self._lock:
            if not self._script:
                return Behaviour(status=500, error="the test's script is exhausted")
            return self._script.popleft()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    self._send(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
                    return
                with server._lock:
                    server.requests.append(Recorded(self.path, dict(self.headers.items()), body))
                if self.path != CHAT_PATH:
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                b = server._next(body)
                if b.delay_s:
                    time.sleep(b.delay_s)
                if b.status != 200:
                    self._send(b.status, {"error": {"message": b.error, "type": "server_error", "code": b.status}}, b.headers)
                    return
                message: dict[str, Any] = {"role": "assistant", "content": None if b.refusal else b.content}
                if b.refusal:
                    message["refusal"] = b.refusal
                self._send(200, {
                    "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", ""),
                    "choices": [{"index": 0, "message": message, "finish_reason": b.finish_reason}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
                }, b.headers)

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout): nothing to answer

        return Handler
