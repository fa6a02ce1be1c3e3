"""Remote image fetching against a real HTTP server on 127.0.0.1: addresses are checked after DNS
resolution (loopback/private refused unless their network is allow-listed), proxy variables are
ignored, compressed bodies are refused and the byte cap holds on the wire; through the app, a
refused URL is a typed 400."""

from __future__ import annotations

import asyncio
import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from smolora.server.images import (
    ImageError,
    ImageLimits,
    ImageLoader,
    RemoteImageFetcher,
    address_allowed,
    resolve_host,
)
from tests.server.api.conftest import running_app
from tests.server.api.helpers import image_bytes, user_message

PNG = image_bytes("PNG", (16, 16))
LIMITS = ImageLimits(max_bytes=50_000, max_pixels=256 * 256, formats=("PNG",), max_count=1)


class _Handler(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).hits.append(self.path)
        if self.path == "/gzip.png":
            body = gzip.compress(b"\0" * 10_000_000)  # ~10 KB on the wire, 10 MB inflated
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/endless.png":  # no Content-Length: the cap must hold mid-transfer
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"\x89" * 10_000)
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True
        else:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _fetch(url: str, networks: tuple[str, ...] = (), allow: tuple[str, ...] = ("localhost",)):
    async def go():
        fetcher = RemoteImageFetcher(allow, 5.0, LIMITS.max_bytes, allow_networks=networks)
        try:
            return await ImageLoader(LIMITS, fetcher).load(url)
        finally:
            await fetcher.aclose()

    return asyncio.run(go())


def test_localhost_resolves_to_loopback_and_is_refused(image_host: int) -> None:
    addresses = asyncio.run(resolve_host("localhost", image_host))
    assert addresses and not any(address_allowed(a) for a in addresses)
    before = len(_Handler.hits)
    with pytest.raises(ImageError) as e:
        _fetch(f"http://localhost:{image_host}/a.png")
    assert e.value.code == "image_host_not_allowed" and "loopback" in str(e.value)
    assert len(_Handler.hits) == before  # never connected


def test_an_allow_listed_network_may_be_reached(image_host: int) -> None:
    img = _fetch(f"http://localhost:{image_host}/a.png", networks=("127.0.0.0/8", "::1/128"))
    assert img.size == (16, 16)


@pytest.mark.parametrize(
    "address,public",
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:8.8.8.8", True),
    ],
)
def test_only_public_addresses_are_allowed(address: str, public: bool) -> None:
    assert address_allowed(address) is public


def test_proxy_variables_are_ignored(image_host: int, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    img = _fetch(f"http://localhost:{image_host}/a.png", networks=("127.0.0.0/8", "::1/128"))
    assert img.size == (16, 16)  # fetched directly, not through the (dead) proxy


def test_compressed_bodies_are_refused_before_decompression(image_host: int) -> None:
    with pytest.raises(ImageError) as e:
        _fetch(f"http://localhost:{image_host}/gzip.png", networks=("127.0.0.0/8", "::1/128"))
    assert e.value.code == "image_encoding_not_accepted"


def test_the_byte_cap_holds_on_the_wire(image_host: int) -> None:
    with pytest.raises(ImageError) as e:
        _fetch(f"http://localhost:{image_host}/endless.png", networks=("127.0.0.0/8", "::1/128"))
    assert e.value.code == "image_too_large"


def test_the_app_answers_a_refused_image_url_with_a_typed_400(
    tiny_model_dir: Path, registry: Path, image_host: int
) -> None:
    with running_app(tiny_model_dir, registry, image_url_allowlist=("localhost",)) as (c, _, _e):
        body = {
            "model": "tiny-llava",
            "messages": [user_message("what?", [f"http://localhost:{image_host}/a.png"])],
            "max_tokens": 2,
        }
        r = c.post("/v1/chat/completions", json=body)
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "image_host_not_allowed"
        assert err["param"] == "messages[0].content[0].image_url.url"
    assert httpx.__version__  # the fetcher's client library is importable in CI
