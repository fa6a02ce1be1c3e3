"""Helpers of the real-server reliability tests: Prometheus samples, raw-socket requests a test
can abandon at a chosen moment (after the first streamed chunk, or while queued), and a local
image host whose images arrive only when the test says (a request holding its admission slot
for as long as the test needs, independent of the engine's speed)."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import httpx
from PIL import Image

CHAT = "/v1/chat/completions"


def metric(base_url: str, name: str, labels: str = "") -> float:
    """The value of one sample of `/metrics` (`name{labels}`), 0.0 when absent."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        key, _, value = line.rpartition(" ")
        if key == name or (key.startswith(name + "{") and labels in key):
            total += float(value)
    return total


def wait_for(predicate: Any, timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(poll_s)


def running_and_waiting(base_url: str) -> str:
    """The server's admission counts, for failure messages."""
    return (
        f"running={metric(base_url, 'smolora_num_requests_running')} "
        f"waiting={metric(base_url, 'smolora_num_requests_waiting')}"
    )


class RawRequest:
    """A POST sent over a plain socket, so the test decides when the client goes away."""

    def __init__(
        self, base_url: str, body: dict[str, Any], path: str = CHAT, rcvbuf: int | None = None
    ):
        url = urlsplit(base_url)
        payload = json.dumps(body).encode()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # a small window: a client that does not read stalls the server
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(60)
        self.sock.connect((url.hostname, url.port))
        self.sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {url.hostname}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        self.received = b""

    def read_until(self, marker: bytes, timeout_s: float = 60.0) -> bytes:
        """Read until `marker` has arrived (e.g. the first content chunk of a stream)."""
        self.sock.settimeout(timeout_s)
        while marker not in self.received:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError(f"connection closed before {marker!r}: {self.received!r}")
            self.received += data
        return self.received

    def read_response(self, timeout_s: float = 60.0) -> bytes:
        """Read one whole non-streamed response: its headers and its Content-Length body."""
        head = self.read_until(b"\r\n\r\n", timeout_s)
        headers, _, _ = head.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", headers)
        assert length is not None, f"no Content-Length: {headers!r}"
        total = len(headers) + 4 + int(length.group(1))
        while len(self.received) < total:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError(f"connection closed mid-body: {self.received!r}")
            self.received += data
        return self.received

    def close(self) -> None:
        self.sock.close()


def big_image_url(size: int = 2048) -> str:
    """A one-colour PNG data URL: small on the wire (35 KB at 2048 px), 12 MiB once decoded
    to RGB at 2048 px."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (30, 120, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    """The JSON `data:` events of a raw (chunk-encoded) SSE response, in order."""
    return [json.loads(m) for m in re.findall(rb"data: (\{[^\n]*\})\n", raw)]


class StallingImageHost:
    """A local image host whose `/held/<key>.png` answers only once `release(key)` is called.

    A chat request naming such an image is admitted (it holds its slot) and then waits in
    its image fetch for as long as the test wants, whatever the engine's speed. Other paths
    answer a small PNG at once.
    """

    def __init__(self, png: bytes):
        self.png = png
        self._gates: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.startswith("/held/"):
                    host._gate(self.path[len("/held/") : -len(".png")]).wait(120)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(host.png)))
                    self.end_headers()
                    self.wfile.write(host.png)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the server gave up the fetch (its client left)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.port = self.server.server_address[1]

    def _gate(self, key: str) -> threading.Event:
        with self._lock:
            return self._gates.setdefault(key, threading.Event())

    def url(self, key: str) -> str:
        """The URL of an image held until `release(key)` (through `localhost`, resolved)."""
        self._gate(key)
        return f"http://localhost:{self.port}/held/{key}.png"

    def release(self, key: str) -> None:
        self._gate(key).set()

    def close(self) -> None:
        for gate in list(self._gates.values()):
            gate.set()
        self.server.shutdown()
        self.server.server_close()


def held_request(base_url: str, image_url: str, stream: bool = False) -> RawRequest:
    """A chat request whose image fetch stalls: it holds an admission slot meanwhile."""
    body = {**long_stream_body(2, image_url), "stream": stream}
    return RawRequest(base_url, body)


def long_stream_body(max_tokens: int, image: str | None = None) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": image}})
    parts.append({"type": "text", "text": "Describe it."})
    return {
        "model": "tiny-llava",
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
