"""A fault-injecting HTTP proxy on 127.0.0.1, in front of a local S3 server (tests only).

    with FaultProxy(upstream="http://127.0.0.1:5000") as proxy:
        proxy.add("GET", r"/bucket/photos/a\\.png", "500", times=2)   # two 500s, then through
        proxy.add("PUT", r"/bucket/out/metrics/", "drop")             # every PUT there dropped
        ... S3 clients use proxy.endpoint ...
        proxy.attempts("GET", r"/bucket/photos/a\\.png")             # requests seen

Every request is logged (method, path, fault). `FaultProxy(upstream, latency_s=0.02)` holds
every request that long before it goes on: the round trip of a remote object store,
which a local one lacks (the scale benchmark, tests/scale_bench.py). Faults:
    500        an S3 InternalError response
    slowdown   503 SlowDown (throttling)
    403        AccessDenied
    drop       the connection is closed after the request is read, before any response
    drop-body  for uploads: the connection is closed halfway through the request body
               (a write that fails in the middle)
Requests without a matching rule are forwarded unchanged.
"""
from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "403": (403, "AccessDenied", "Access Denied"),
}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
              "trailer", "upgrade"}


@dataclass
class Rule:
    method: str
    path: re.Pattern
    fault: str
    times: int | None            # None: every matching request


@dataclass
class FaultProxy:
    upstream: str
    latency_s: float = 0.0       # added to every request
    rules: list[Rule] = field(default_factory=list)
    log: list[tuple[str, str, str | None]] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        target = urlsplit(self.upstream)
        self._upstream = (target.hostname, target.port)
        proxy = self

        class Handler(_Handler):
            owner = proxy
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FaultProxy":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- rules and the log ------------------------------------------------------------------
    def add(self, method: str, path: str, fault: str, times: int | None = None) -> None:
        assert fault in (*ERRORS, "drop", "drop-body"), fault
        with self._lock:
            self.rules.append(Rule(method, re.compile(path), fault, times))

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.log.clear()

    def attempts(self, method: str, path: str, fault: str | None = "any") -> int:
        """Requests seen for this method and path pattern (with this fault, if given)."""
        pattern = re.compile(path)
        with self._lock:
            return sum(1 for m, p, f in self.log if m == method and pattern.search(p)
                       and (fault == "any" or f == fault))

    def _fault_for(self, method: str, path: str) -> str | None:
        with self._lock:
            fault = None
            for rule in self.rules:
                if rule.method == method and rule.path.search(path) and rule.times != 0:
                    if rule.times is not None:
                        rule.times -= 1
                    fault = rule.fault
                    break
            self.log.append((method, path, fault))
            return fault


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, *args) -> None:       # quiet
        pass

    def _body(self, limit: int | None = None) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length if limit is None else min(limit, length))

    def _handle(self) -> None:
        fault = self.owner._fault_for(self.command, self.path)
        if self.owner.latency_s:
            time.sleep(self.owner.latency_s)
        if fault == "drop-body":
            length = int(self.headers.get("Content-Length") or 0)
            self._body(limit=length // 2)
            return self._drop()
        body = self._body()
        if fault == "drop":
            return self._drop()
        if fault in ERRORS:
            return self._error(*ERRORS[fault])
        self._forward(body)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _error(self, status: int, code: str, message: str) -> None:
        xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
               f"<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(xml)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)

    def _forward(self, body: bytes) -> None:
        conn = http.client.HTTPConnection(*self.owner._upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else len(data)
        self.send_header("Content-Length", str(length or 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle
