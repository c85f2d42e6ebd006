"""A local stand-in for the Anthropic Messages API that speaks its wire format.

Point the real SDK at it: `anthropic.Anthropic(api_key=..., base_url=server.url)`. Each
POST /v1/messages is answered by the queued replies first, then by the script:

    with FakeAnthropic(api_key="sk-test", script=lambda r: message(r, [text("hi")])) as server:
        ...

Usage left out of a message reply is estimated from the request, prompt caching included.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

DEFAULT_MODELS = frozenset({"claude-sonnet-4-6", "claude-haiku-4-5", "claude-opus-4-5"})
# The API looks for earlier cache entries this many blocks back from each breakpoint.
CACHE_LOOKBACK_BLOCKS = 20

_ids = itertools.count(1)  # next() on a count is atomic, so script threads may share it


@dataclass
class Reply:
    """One HTTP answer; `delay` seconds pass before it is sent."""

    status: int = 200
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


Script = Callable[[dict[str, Any]], Reply]


@dataclass
class Recorded:
    """A request as it arrived."""

    method: str
    path: str  # without the query string
    headers: dict[str, str]  # lower-case names
    body: Any  # the parsed JSON, or None
    raw: bytes


def text(s: str) -> dict[str, Any]:
    """A text content block."""
    return {"type": "text", "text": s}


def tool_use(name: str, input: dict[str, Any], id: str | None = None) -> dict[str, Any]:
    """A tool_use content block."""
    return {
        "type": "tool_use",
        "id": id if id is not None else f"toolu_{next(_ids)}",
        "name": name,
        "input": input,
    }


def message(
    request: dict[str, Any],
    content: list[dict[str, Any]],
    stop_reason: str = "end_turn",
    usage: dict[str, Any] | None = None,
) -> Reply:
    """A successful Messages reply; usage None means the server estimates it."""
    return Reply(
        body={
            "id": f"msg_{next(_ids)}",
            "type": "message",
            "role": "assistant",
            "model": request["model"],
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }
    )


def error(status: int, type: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    """An error reply in the API's format; the server fills in its request_id."""
    return Reply(
        status=status,
        body={"type": "error", "error": {"type": type, "message": message}},
        headers=dict(headers or {}),
    )


def _tokens(part: Any) -> int:
    return math.ceil(len(json.dumps(part, sort_keys=True)) / 4)


def _as_blocks(content: Any) -> list[Any]:
    # A bare string is the same prompt as one text block.
    return [text(content)] if isinstance(content, str) else list(content)


@dataclass
class _Part:
    key: str  # canonical JSON of the part and where it sits in the prompt
    tokens: int
    ttl: str | None  # "5m" or "1h" where the part carries cache_control


def _prompt_parts(request: dict[str, Any]) -> list[_Part]:
    """The prompt in the API's cache order: tools, then system, then messages."""
    placed: list[tuple[Any, Any]] = [("tool", tool) for tool in request.get("tools") or []]
    if request.get("system"):
        placed += [("system", block) for block in _as_blocks(request["system"])]
    for index, msg in enumerate(request.get("messages") or []):
        where = ["message", index, msg.get("role")]
        placed += [(where, block) for block in _as_blocks(msg.get("content", []))]
    parts = []
    for where, item in placed:
        control = item.get("cache_control") if isinstance(item, dict) else None
        # The marker itself is not prompt: moving a breakpoint keeps the prefix the same.
        bare = {k: v for k, v in item.items() if k != "cache_control"} if control else item
        ttl = None
        if isinstance(control, dict):
            ttl = "1h" if control.get("ttl") == "1h" else "5m"
        key = json.dumps([where, bare], sort_keys=True)
        parts.append(_Part(key=key, tokens=_tokens(bare), ttl=ttl))
    return parts


class _PromptCache:
    """Prefixes written by earlier requests, as the API's prompt cache keeps them."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def usage(self, request: dict[str, Any], content: Any) -> dict[str, Any]:
        parts = _prompt_parts(request)
        hasher = hashlib.sha256(json.dumps(request.get("model")).encode())
        keys: list[str] = []
        totals: list[int] = []
        total = 0
        for part in parts:
            hasher.update(part.key.encode() + b"\0")
            keys.append(hasher.hexdigest())
            total += part.tokens
            totals.append(total)
        breakpoints = [i for i, part in enumerate(parts) if part.ttl is not None]

        # The latest cached prefix that ends at or a little before some breakpoint.
        read_at = -1
        for b in breakpoints:
            for i in range(b, max(b - CACHE_LOOKBACK_BLOCKS, -1), -1):
                if keys[i] in self.seen:
                    read_at = max(read_at, i)
                    break
        read = self.seen[keys[read_at]] if read_at >= 0 else 0

        created = {"5m": 0, "1h": 0}
        start = read
        for b in breakpoints:
            if b > read_at:
                created[parts[b].ttl or "5m"] += totals[b] - start
                start = totals[b]
            self.seen[keys[b]] = totals[b]
        cached = totals[breakpoints[-1]] if breakpoints else 0
        return {
            "input_tokens": total - cached,
            "output_tokens": math.ceil(len(json.dumps(content)) / 4),
            "cache_creation_input_tokens": created["5m"] + created["1h"],
            "cache_read_input_tokens": read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": created["5m"],
                "ephemeral_1h_input_tokens": created["1h"],
            },
            "service_tier": "standard",
        }


class FakeAnthropic:
    """The fake API server; a context manager that serves on 127.0.0.1 while open."""

    def __init__(self, api_key: str, script: Script | None = None) -> None:
        self.api_key = api_key
        self.script = script
        self.models: set[str] = set(DEFAULT_MODELS)
        self.forbidden = False
        self.requests: list[Recorded] = []
        self._queue: deque[Reply] = deque()
        self._lock = threading.RLock()  # a script may call queue()
        self._cache = _PromptCache()
        self._request_ids = itertools.count(1)
        self._closing = threading.Event()
        self._script_error: BaseException | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the fake server is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def queue(self, *replies: Reply) -> None:
        """Replies to serve, in order, before the script is asked."""
        with self._lock:
            self._queue.extend(replies)

    def messages_requests(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.method == "POST" and r.path == "/v1/messages"]

    def start(self) -> FakeAnthropic:
        self._closing.clear()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        # A short poll keeps close() quick.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()  # cuts short any reply still waiting out its delay
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> FakeAnthropic:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        # A failing script only showed up as a 500 to the client; fail the test on it too.
        if exc is None and self._script_error is not None:
            raise self._script_error

    def _answer(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> Reply:
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        with self._lock:
            self.requests.append(Recorded(method, path, headers, body, raw))

        bearer = headers.get("authorization", "")
        # The API takes the key as x-api-key; the SDK may send it as a bearer token instead.
        given = headers.get("x-api-key") or bearer.removeprefix("Bearer ").strip()
        if given != self.api_key:
            return error(401, "authentication_error", "invalid x-api-key")
        if self.forbidden:
            return error(
                403, "permission_error", "Your API key does not have permission to use this."
            )

        if method == "GET" and path.startswith("/v1/models/"):
            model_id = unquote(path.removeprefix("/v1/models/"))
            if model_id in self.models:
                return Reply(
                    body={
                        "type": "model",
                        "id": model_id,
                        "display_name": model_id,
                        "created_at": "2025-09-29T00:00:00Z",
                    }
                )
            return error(404, "not_found_error", f"model: {model_id}")
        if path != "/v1/messages":
            return error(404, "not_found_error", "Not Found")
        if method != "POST":
            return error(405, "invalid_request_error", f"{method} is not allowed")
        if not isinstance(body, dict):
            return error(400, "invalid_request_error", "the body must be a JSON object")
        for required in ("model", "max_tokens", "messages"):
            if required not in body:
                return error(400, "invalid_request_error", f"{required}: Field required")
        if body["model"] not in self.models:
            return error(404, "not_found_error", f"model: {body['model']}")
        if body.get("stream"):
            return error(400, "invalid_request_error", "the fake does not stream")
        return self._scripted(body)

    def _scripted(self, request: dict[str, Any]) -> Reply:
        with self._lock:
            if self._queue:
                reply = self._queue.popleft()
            elif self.script is not None:
                try:
                    reply = self.script(request)
                except Exception as exc:
                    self._script_error = self._script_error or exc
                    return error(500, "api_error", f"the fake's script raised {exc!r}")
            else:
                return error(500, "api_error", "the fake's script ran out of replies")
            if reply.body.get("type") == "message" and reply.body.get("usage") is None:
                usage = self._cache.usage(request, reply.body.get("content", []))
                # A copy: the same Reply may be served again.
                reply = Reply(
                    reply.status, {**reply.body, "usage": usage}, reply.headers, reply.delay
                )
        return reply

    def _next_request_id(self) -> str:
        with self._lock:
            return f"req_{next(self._request_ids):024d}"


def _handler_for(server: FakeAnthropic) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects

        def do_GET(self) -> None:
            self._handle()

        def do_POST(self) -> None:
            self._handle()

        def do_DELETE(self) -> None:
            self._handle()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet test output

        def _handle(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            headers = {name.lower(): value for name, value in self.headers.items()}
            path = urlsplit(self.path).path
            reply = server._answer(self.command, path, headers, raw)
            if reply.delay > 0 and server._closing.wait(reply.delay):
                self.close_connection = True
                return
            request_id = server._next_request_id()
            body = reply.body
            if body.get("type") == "error" and body.get("request_id") is None:
                body = {**body, "request_id": request_id}
            payload = json.dumps(body).encode()
            out = {"content-type": "application/json", "request-id": request_id, **reply.headers}
            try:
                self.send_response(reply.status)
                for name, value in out.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting, as a timeout test wants

    return Handler
