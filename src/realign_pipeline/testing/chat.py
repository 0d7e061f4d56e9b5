"""A loopback OpenAI-compatible chat server for tests: ``POST /v1/chat/completions`` answered from a script.

:class:`ChatServer` listens on ``127.0.0.1`` (an ephemeral port by default) and answers each POST (whatever
its path: an OpenAI client posts to ``<url>/chat/completions``) with the next reply of its script, so a test
drives the real ``openai`` client -- and the code around it, e.g. :class:`realign_pipeline.captioner.OpenAIChat`
-- through good answers, garbage, HTTP errors and timeouts, offline. It records every request (its JSON body
and headers)::

    from realign_pipeline.testing import ChatServer

    with ChatServer(['{"objects": []}']) as server:
        llm = OpenAIChat(model="test-model", base_url=server.url, api_key="sk-test")
        ...
    assert server.requests[0]["model"] == "test-model"

A reply is one of:

- a string, or ``("ok", text)``: a chat completion whose message content is ``text``;
- ``("status", code)``: an HTTP error ``code`` with an OpenAI-style error body;
- ``("stall", seconds)``: no answer; the connection closes after ``seconds`` (or when the server is reset or
  closed), so the client times out first;
- ``("empty-choices", None)``: a chat completion whose ``choices`` list is empty;
- ``("json", payload)``: ``payload`` as the JSON body, status 200 (any object, list, or malformed completion);
- ``("raw", (content_type, text))``: ``text`` as the body with that ``Content-Type``, status 200.

When the script runs out, ``then`` answers (a reply as above); if ``then`` is None, the last reply repeats; an
empty script with ``then`` None answers ``"{}"``. A ``handler`` callable, given the request's JSON body, returns
the reply instead of the script (``None`` from it falls back to the script).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["ChatServer"]

Reply = Any  # a str or a (kind, value) tuple, see the module docstring
_KINDS = ("ok", "status", "stall", "empty-choices", "json", "raw")


def _normalize(reply: Reply) -> tuple[str, Any]:
    if isinstance(reply, str):
        return "ok", reply
    if isinstance(reply, tuple) and len(reply) == 2 and reply[0] in _KINDS:
        return reply
    raise ValueError(f"a reply is a string or a (kind, value) pair with kind in {_KINDS}, not {reply!r}")


class ChatServer:
    """A loopback ``/v1/chat/completions`` that replays scripted replies, one per request (thread-safe).

    Args:
        replies: the script (see the module docstring for the kinds of reply).
        then: the reply once the script has run out; None repeats the last one.
        handler: ``handler(body) -> reply or None``, called for every request before the script.
        host, port: where to listen; port 0 (the default) takes a free port. The socket is bound at
            construction (``url`` is known), requests are served after :meth:`start` or ``with``.

    Attributes:
        url: the base URL for an OpenAI client, ``http://127.0.0.1:<port>/v1``.
        requests: the JSON body of every request so far (the raw text where it is not JSON), in order.
        headers: the headers of every request, in the same order (``email.message.Message``: a lookup such as
            ``headers[0]["Authorization"]`` ignores case; None when absent).
    """

    def __init__(
        self,
        replies: Iterable[Reply] = (),
        *,
        then: Reply | None = None,
        handler: Callable[[Any], Reply | None] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.requests: list[Any] = []
        self.headers: list[Message] = []
        self.handler = handler
        self._script: list[tuple[str, Any]] = []
        self._then: tuple[str, Any] | None = None
        self._last: tuple[str, Any] = ("ok", "{}")
        self.reply(*replies, then=then)
        self.httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self.httpd.daemon_threads = True  # a stalled reply must not hold up close()
        self.httpd.block_on_close = False
        self.url = f"http://{host}:{self.httpd.server_address[1]}/v1"

    # --- the script ----------------------------------------------------------------------------------------------
    def reply(self, *replies: Reply, then: Reply | None = None) -> ChatServer:
        """Replace the script with ``replies`` (and ``then``); returns the server."""
        script = [_normalize(r) for r in replies]
        following = None if then is None else _normalize(then)
        with self._lock:
            self._script, self._then = script, following
            self._last = ("ok", "{}")
        return self

    def reset(self) -> ChatServer:
        """Forget the script, the handler and the recorded requests, and end stalled replies; returns the server."""
        if self._closed:
            raise RuntimeError("the chat server is closed")
        self._end_stalls()
        with self._lock:
            self.requests.clear()
            self.headers.clear()
            self.handler = None
        return self.reply()

    def _next(self, body: Any) -> tuple[str, Any]:
        handler = self.handler
        if handler is not None:
            answer = handler(body)
            if answer is not None:
                return _normalize(answer)
        with self._lock:
            if self._script:
                self._last = self._script.pop(0)
                return self._last
            return self._then if self._then is not None else self._last

    # --- serving -------------------------------------------------------------------------------------------------
    def start(self) -> ChatServer:
        """Serve requests in a daemon thread (once); returns the server."""
        if self._closed:
            raise RuntimeError("the chat server is closed")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
            )
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port (idempotent); later connections are refused."""
        if self._closed:
            return
        self._closed = True
        self._end_stalls()
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=5)
        self.httpd.server_close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _end_stalls(self) -> None:
        wake, self._wake = self._wake, threading.Event()
        wake.set()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode("utf-8", "replace")
                try:
                    body = json.loads(raw) if raw else {}
                except json.JSONDecodeError:
                    body = raw
                with server._lock:
                    server.requests.append(body)
                    server.headers.append(self.headers)
                kind, value = server._next(body)
                try:
                    self._answer(kind, value, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a stalled reply): as the test intends

            def do_GET(self) -> None:
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

            def _answer(self, kind: str, value: Any, body: Any) -> None:
                if kind == "stall":  # no answer: the connection closes after `value` s, or at reset() / close()
                    server._wake.wait(float(value))
                    return
                if kind == "status":
                    self._send(int(value), {"error": {"message": "scripted failure", "type": "server_error"}})
                elif kind == "json":
                    self._send(200, value)
                elif kind == "raw":
                    content_type, text = value
                    self._send(200, text.encode(), content_type=content_type)
                else:
                    choices = [] if kind == "empty-choices" else [
                        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": value}}]
                    model = body.get("model") if isinstance(body, dict) else None
                    self._send(200, {
                        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model,
                        "choices": choices,
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    })

            def _send(self, code: int, payload: Any, content_type: str = "application/json") -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
