"""A reverse proxy on 127.0.0.1 that injects faults into chosen requests (stdlib only).

Put it in front of an S3 or GCS test server and point the client at
:attr:`FaultProxy.url`::

    with FaultProxy("http://127.0.0.1:9000", flavor="s3") as proxy:
        proxy.fail("PUT", r"/bucket/key", status=503, times=2)   # two SlowDown answers
        proxy.reset("PUT", r"/bucket/big", times=1, after_bytes=64 * 1024)
        store = S3Store("bucket", endpoint_url=proxy.url)
        ...
        assert proxy.injected == 3

Rules: each matches a method (``"*"`` for any) and a regular expression
searched in the request's path and query; the first rule that matches and
has faults left is used, once per request, and each rule fires at most
``times`` times. A ``fail`` rule answers with ``status`` and an error body
in the store's own format (S3 XML with ``SlowDown``/``InternalError``/
``ServiceUnavailable``, or GCS JSON), after reading the whole request. A
``reset`` rule reads ``after_bytes`` of the request body and then resets
the TCP connection (``SO_LINGER`` 0, so the client sees ECONNRESET) in the
middle of the upload. A ``lose_response`` rule forwards the request and then
resets instead of relaying the answer: the write happened, the client
cannot know it. Everything else is forwarded unchanged, with the
client's ``Host`` header, and the answer relayed; ``Location`` headers that
point at the upstream (GCS resumable-upload sessions) are rewritten to
point at the proxy, so the rest of such an upload goes through it too.

Counters: :attr:`forwarded` (requests relayed upstream), :attr:`injected`
(faults injected), and :attr:`Rule.hits` per rule. Thread-safe; the proxy
serves each connection in its own thread and is stopped by :meth:`stop`
(or leaving the ``with`` block).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit

Flavor = Literal["s3", "gcs"]

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}

_S3_CODES = {500: "InternalError", 503: "SlowDown", 429: "SlowDown"}


def error_body(flavor: Flavor, status: int) -> tuple[bytes, str]:
    """The body and content type a real store sends with ``status``."""
    if flavor == "s3":
        code = _S3_CODES.get(status, "ServiceUnavailable")
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>injected by the fault proxy</Message>"
            "<RequestId>fault</RequestId></Error>"
        )
        return xml.encode(), "application/xml"
    reason = {429: "rateLimitExceeded", 500: "backendError", 503: "backendError"}.get(
        status, "error"
    )
    doc = {
        "error": {
            "code": status,
            "message": "injected by the fault proxy",
            "errors": [{"domain": "global", "reason": reason, "message": "injected"}],
        }
    }
    return json.dumps(doc).encode(), "application/json; charset=UTF-8"


@dataclass
class Rule:
    """One fault: ``"fail"`` (answer ``status``), ``"reset"`` (RST mid-body), ``"lose"``."""

    method: str
    path: re.Pattern[str]
    action: Literal["fail", "reset", "lose"]
    times: int
    status: int = 503
    after_bytes: int = 0
    hits: int = field(default=0)

    def matches(self, method: str, path: str) -> bool:
        return (
            self.hits < self.times
            and self.method in ("*", method.upper())
            and self.path.search(path) is not None
        )


class FaultProxy:
    """A fault-injecting reverse proxy in front of ``upstream`` (``http://127.0.0.1:PORT``)."""

    def __init__(self, upstream: str, *, flavor: Flavor) -> None:
        parts = urlsplit(upstream)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream = f"http://{parts.hostname}:{parts.port}"
        self.flavor: Flavor = flavor
        self._host = parts.hostname
        self._port = parts.port
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._forwarded = 0
        self._injected = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- rules --------------------------------------------------------------

    def fail(self, method: str, path: str, *, status: int = 503, times: int = 1) -> Rule:
        """Answer the next ``times`` requests matching ``method`` and ``path`` with ``status``."""
        rule = Rule(method.upper(), re.compile(path), "fail", times, status=status)
        with self._lock:
            self._rules.append(rule)
        return rule

    def reset(self, method: str, path: str, *, times: int = 1, after_bytes: int = 0) -> Rule:
        """Reset the next ``times`` matching requests' connections after ``after_bytes`` of body."""
        rule = Rule(method.upper(), re.compile(path), "reset", times, after_bytes=after_bytes)
        with self._lock:
            self._rules.append(rule)
        return rule

    def lose_response(self, method: str, path: str, *, times: int = 1) -> Rule:
        """Forward the next ``times`` matching requests, then reset instead of answering.

        The store did the work; the client never hears so and retries (a lost response).
        """
        rule = Rule(method.upper(), re.compile(path), "lose", times)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Forget every rule (the counters stay)."""
        with self._lock:
            self._rules.clear()

    @property
    def forwarded(self) -> int:
        """Requests relayed to the upstream server."""
        with self._lock:
            return self._forwarded

    @property
    def injected(self) -> int:
        """Faults injected (failed answers and resets)."""
        with self._lock:
            return self._injected

    def _take(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, path):
                    rule.hits += 1
                    self._injected += 1
                    return rule
        return None

    def _count_forwarded(self) -> None:
        with self._lock:
            self._forwarded += 1

    # -- life ---------------------------------------------------------------

    @property
    def url(self) -> str:
        """Where clients connect: ``http://127.0.0.1:PORT``."""
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        """Listen on a free port of 127.0.0.1 and serve in a background thread."""
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fault-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients drop kept-alive connections and resets are the point: stay quiet.
        pass


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: pytest shows the tests' own output

    def _body(self, limit: int | None = None) -> bytes:
        """The request body (Content-Length or chunked), or its first ``limit`` bytes."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while limit is None or len(out) < limit:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                out += self.rfile.read(size)
                self.rfile.readline()
            return bytes(out if limit is None else out[:limit])
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length if limit is None else min(length, limit))

    def _handle(self) -> None:
        rule = self.owner._take(self.command, self.path)
        if rule is not None and rule.action == "reset":
            self._body(limit=rule.after_bytes)
            # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        body = self._body()
        if rule is not None and rule.action == "lose":
            self._forward(body, relay=False)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if rule is not None:
            payload, ctype = error_body(self.owner.flavor, rule.status)
            self.send_response(rule.status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        self._forward(body)

    def _forward(self, body: bytes, *, relay: bool = True) -> None:
        owner = self.owner
        conn = http.client.HTTPConnection(owner._host, owner._port, timeout=120)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    conn.putheader(name, value)
            if body or self.command in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            payload = resp.read()
            owner._count_forwarded()
            if not relay:
                return
            self.send_response(resp.status, resp.reason)
            for name, value in resp.getheaders():
                lname = name.lower()
                if lname in _HOP_BY_HOP or lname == "content-length":
                    continue
                if lname == "location" and value.startswith(owner.upstream):
                    value = owner.url + value[len(owner.upstream) :]
                self.send_header(name, value)
            if self.command == "HEAD" or resp.status in (204, 304):
                length = resp.getheader("Content-Length")
                if length is not None:
                    self.send_header("Content-Length", length)
            else:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD" and resp.status not in (204, 304):
                self.wfile.write(payload)
        finally:
            conn.close()

    def finish(self) -> None:
        # After a reset the socket is gone; flushing it would raise.
        with contextlib.suppress(OSError, ValueError):
            super().finish()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle
