"""Image decoding and validation: formats, limits, bad base64, truncation, remote fetch rules."""

from __future__ import annotations

import asyncio
import base64
import threading

import httpx
import pytest

from smolora.server.images import (
    ImageError,
    ImageLimits,
    ImageLoader,
    RemoteImageFetcher,
    decode_image,
    host_allowed,
    parse_data_url,
)
from tests.server.api.helpers import data_url, image_bytes

LIMITS = ImageLimits(
    max_bytes=50_000, max_pixels=128 * 128, formats=("PNG", "JPEG", "WEBP"), max_count=2
)


@pytest.mark.parametrize(
    "fmt,media", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_accepted_formats_decode_to_rgb(fmt: str, media: str) -> None:
    img = decode_image(parse_data_url(data_url(image_bytes(fmt, (40, 30)), media), LIMITS), LIMITS)
    assert img.mode == "RGB" and img.size == (40, 30)


def test_jpg_alias_and_whitespace_in_base64_are_accepted() -> None:
    url = data_url(image_bytes("JPEG"), "image/jpg")
    head, payload = url.split(",", 1)
    wrapped = head + "," + "\n".join(payload[i : i + 60] for i in range(0, len(payload), 60))
    assert decode_image(parse_data_url(wrapped, LIMITS), LIMITS).size == (32, 32)


@pytest.mark.parametrize(
    "url,code",
    [
        ("data:image/png;base64,%%%notbase64", "invalid_base64"),
        ("data:image/png;base64,", "invalid_base64"),
        ("data:image/png,rawbytes", "invalid_image_url"),
        ("data:image/png;base64", "invalid_image_url"),
        ("data:text/plain;base64,aGVsbG8=", "unsupported_media_type"),
        ("data:image/gif;base64,R0lGODlh", "unsupported_image_format"),
        ("image/png;base64,AAAA", "invalid_image_url"),
    ],
)
def test_bad_data_urls_say_what_is_wrong(url: str, code: str) -> None:
    with pytest.raises(ImageError) as e:
        parse_data_url(url, LIMITS)
    assert e.value.code == code and str(e.value)


def test_not_an_image_is_refused() -> None:
    with pytest.raises(ImageError) as e:
        decode_image(b"this is text, not pixels", LIMITS)
    assert e.value.code == "invalid_image"


def test_truncated_png_and_jpeg_are_refused() -> None:
    for fmt in ("PNG", "JPEG"):
        data = image_bytes(fmt, (64, 64))
        with pytest.raises(ImageError) as e:
            decode_image(data[: len(data) // 2], LIMITS)
        assert e.value.code in ("corrupt_image", "invalid_image"), fmt


def test_format_disguised_under_another_media_type_is_checked_by_content() -> None:
    gif = image_bytes("GIF")
    with pytest.raises(ImageError) as e:
        decode_image(parse_data_url(data_url(gif, "image/png"), LIMITS), LIMITS)
    assert e.value.code == "unsupported_image_format"


def test_byte_and_pixel_limits() -> None:
    big = ImageLimits(max_bytes=10_000_000, max_pixels=128 * 128)
    with pytest.raises(ImageError) as e:
        decode_image(image_bytes("PNG", (200, 200)), big)
    assert e.value.code == "image_too_large" and "200x200" in str(e.value)
    noisy = bytes(range(256)) * 400
    with pytest.raises(ImageError) as e:
        parse_data_url("data:image/png;base64," + base64.b64encode(noisy).decode(), LIMITS)
    assert e.value.code == "image_too_large"


def test_host_allowlist_matching() -> None:
    allow = ("images.example.com", ".cdn.example.org")
    assert host_allowed("images.example.com", allow)
    assert host_allowed("a.cdn.example.org", allow) and host_allowed("cdn.example.org", allow)
    assert not host_allowed("evil.com", allow) and not host_allowed(
        "images.example.com.evil.com", allow
    )


def _mock_transport(body: bytes, status: int = 200, delay: float = 0.0) -> httpx.MockTransport:
    async def handler(request: httpx.Request) -> httpx.Response:
        if delay:
            await asyncio.sleep(delay)  # simulates a slow remote host
        return httpx.Response(status, content=body, headers={"content-type": "image/png"})

    return httpx.MockTransport(handler)


async def _public_resolver(host: str, port: int) -> list[str]:
    return ["93.184.215.14"]  # a public address: these tests use a mock transport, no network


def _load(url: str, allow: tuple[str, ...], transport: httpx.MockTransport, timeout: float = 5.0):
    async def go():
        fetcher = RemoteImageFetcher(
            allow, timeout, LIMITS.max_bytes, transport=transport, resolver=_public_resolver
        )
        try:
            return await ImageLoader(LIMITS, fetcher).load(url)
        finally:
            await fetcher.aclose()

    return asyncio.run(go())


def test_remote_fetch_only_from_allowlisted_hosts() -> None:
    png = image_bytes()
    assert _load(
        "https://images.example.com/a.png", ("images.example.com",), _mock_transport(png)
    ).size == (32, 32)
    with pytest.raises(ImageError) as e:
        _load("https://other.example.com/a.png", ("images.example.com",), _mock_transport(png))
    assert e.value.code == "image_host_not_allowed"
    with pytest.raises(ImageError) as e:
        _load("https://images.example.com/a.png", (), _mock_transport(png))
    assert e.value.code == "remote_images_disabled"


def test_remote_fetch_limits_status_size_and_time() -> None:
    allow = ("images.example.com",)
    with pytest.raises(ImageError) as e:
        _load("https://images.example.com/a.png", allow, _mock_transport(b"", status=404))
    assert e.value.code == "image_fetch_failed"
    with pytest.raises(ImageError) as e:
        _load(
            "https://images.example.com/a.png",
            allow,
            _mock_transport(b"x" * (LIMITS.max_bytes + 1)),
        )
    assert e.value.code == "image_too_large"
    with pytest.raises(ImageError) as e:
        _load(
            "https://images.example.com/a.png",
            allow,
            _mock_transport(image_bytes(), delay=1.0),
            timeout=0.05,
        )
    assert e.value.code == "image_fetch_timeout"
    with pytest.raises(ImageError) as e:
        _load("ftp://images.example.com/a.png", allow, _mock_transport(b""))
    assert e.value.code == "invalid_image_url"


def test_images_decode_in_the_loaders_executor_and_are_counted() -> None:
    from concurrent.futures import ThreadPoolExecutor

    limits = ImageLimits(max_bytes=5_000_000, max_pixels=1024 * 1024, formats=("PNG",), max_count=1)
    threads: list[str] = []
    ticks: list[int] = []

    async def load(loader: ImageLoader, data: bytes) -> object:
        return await loader.load(data_url(data))

    with ThreadPoolExecutor(1, thread_name_prefix="decode-test") as pool:
        loader = ImageLoader(
            limits,
            RemoteImageFetcher((), 1.0, limits.max_bytes),
            pool,
            on_decode=lambda: (ticks.append(1), threads.append(threading.current_thread().name)),
        )
        assert asyncio.run(load(loader, image_bytes("PNG", (64, 64)))).size == (64, 64)
        with pytest.raises(ImageError) as e:  # garbage is still reported by decode_image
            asyncio.run(load(loader, b"not an image"))
        assert e.value.code == "invalid_image"
        with pytest.raises(ImageError) as e:  # refused before decoding: not counted
            asyncio.run(loader.load("data:image/png;base64,###"))
        assert e.value.code == "invalid_base64"
    assert loader.decoded == 2 and len(ticks) == 2
    assert all(name.startswith("decode-test") for name in threads)
