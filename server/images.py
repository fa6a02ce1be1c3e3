"""Decode and validate the images of a request: data URLs, allow-listed remote URLs, limits.

`ImageLimits` holds the byte, pixel, format and count limits. `parse_data_url` and
`decode_image` are pure functions: base64 data URLs in, an RGB `PIL.Image` out, or an
`ImageError` whose message tells the caller what to fix (bad base64, not an image, a
format we do not take, truncated data, too many bytes or pixels). `RemoteImageFetcher`
fetches `http(s)://` URLs only from allow-listed hosts, and only when every address the
host resolves to is public (private, loopback, link-local, reserved and multicast
addresses are refused unless their network is allow-listed); it connects to the address
it checked (no second lookup to rebind), ignores proxy environment variables, never
follows redirects, refuses compressed transfer encodings (so the byte limit counts what
is decoded) and stops reading past the byte limit or the time limit. `ImageLoader` puts
both together and decodes in a worker thread (its executor), never on the event loop; it
counts the images it started decoding (`decoded`, and an `on_decode` callback for a
metric), so a test can tell that a refused request never paid for one.

It does not resize or normalise images for the model (the engine's processor does) and
does not know about HTTP status codes (the API maps `ImageError` to 400).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import logging
import socket
import threading
import warnings
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

log = logging.getLogger("smolora.server.images")

# Media types a data URL may declare, and the PIL format each one means.
MEDIA_TYPES = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
    "image/bmp": "BMP",
}


class ImageError(ValueError):
    """An image of a request is unusable; the message says what to fix.

    Attributes:
        code: short machine-readable reason (`invalid_base64`, `image_too_large`, ...).
    """

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ImageLimits:
    """Limits applied to every image of a request.

    Attributes:
        max_bytes: most encoded bytes of one image.
        max_pixels: most pixels (width * height) of one image.
        formats: accepted PIL format names.
        max_count: most images in one request.
    """

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
    max_count: int = 4

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_pixels, self.max_count) < 1:
            raise ValueError("image limits must be >= 1")
        if not self.formats:
            raise ValueError("at least one image format must be accepted")

    def media_types(self) -> list[str]:
        return sorted(m for m, f in MEDIA_TYPES.items() if f in self.formats and m != "image/jpg")


def parse_data_url(url: str, limits: ImageLimits) -> bytes:
    """Decode a `data:image/...;base64,...` URL into bytes.

    Args:
        url: the data URL.
        limits: byte limit and accepted formats.

    Returns:
        The decoded bytes (not yet checked to be an image).

    Raises:
        ImageError: not a base64 data URL, a media type we do not accept, bad base64, or
            more bytes than allowed.
    """
    if not url.startswith("data:"):
        raise ImageError(
            "not a data URL: expected data:image/png;base64,<...>", "invalid_image_url"
        )
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise ImageError(
            "malformed data URL: no ',' between the header and the data", "invalid_image_url"
        )
    parts = [p.strip().lower() for p in header.split(";")]
    media = parts[0] or "text/plain"
    if "base64" not in parts[1:]:
        raise ImageError(
            "data URL must be base64-encoded: data:image/png;base64,<...>", "invalid_image_url"
        )
    if not media.startswith("image/"):
        raise ImageError(
            f"data URL has media type {media!r}, which is not an image; accepted: "
            f"{', '.join(limits.media_types())}",
            "unsupported_media_type",
        )
    fmt = MEDIA_TYPES.get(media)
    if fmt is None or fmt not in limits.formats:
        raise ImageError(
            f"image media type {media!r} is not accepted; use one of "
            f"{', '.join(limits.media_types())}",
            "unsupported_image_format",
        )
    compact = "".join(payload.split())
    if len(compact) * 3 // 4 > limits.max_bytes + 3:
        raise ImageError(
            f"image is about {len(compact) * 3 // 4} bytes, over the limit of "
            f"{limits.max_bytes} bytes; send a smaller or more compressed image",
            "image_too_large",
        )
    if not compact:
        raise ImageError("data URL holds no data", "invalid_base64")
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(
            "image data is not valid base64 (standard alphabet A-Z a-z 0-9 + /, '=' padding)",
            "invalid_base64",
        ) from None
    if len(data) > limits.max_bytes:
        raise ImageError(
            f"image is {len(data)} bytes, over the limit of {limits.max_bytes} bytes",
            "image_too_large",
        )
    return data


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode image bytes fully and check format, pixels and integrity.

    Args:
        data: encoded image bytes.
        limits: accepted formats and the pixel limit.

    Returns:
        The image converted to RGB (the first frame of an animated image).

    Raises:
        ImageError: not an image, a format we do not accept, too many pixels, or
            truncated/corrupt data.
    """
    if len(data) > limits.max_bytes:
        raise ImageError(
            f"image is {len(data)} bytes, over the limit of {limits.max_bytes} bytes",
            "image_too_large",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            width, height = img.size
    except UnidentifiedImageError:
        raise ImageError(
            "the data is not a recognisable image; send PNG, JPEG or WebP bytes", "invalid_image"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"image has too many pixels (limit {limits.max_pixels})", "image_too_large"
        ) from None
    except Exception as e:  # PIL raises assorted errors on garbage headers
        raise ImageError(
            f"the data is not a readable image ({type(e).__name__})", "invalid_image"
        ) from None
    if fmt not in limits.formats:
        raise ImageError(
            f"image format {fmt} is not accepted; use one of {', '.join(limits.formats)}",
            "unsupported_image_format",
        )
    if width * height > limits.max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{limits.max_pixels}; downscale it",
            "image_too_large",
        )
    if width < 1 or height < 1:
        raise ImageError("image has zero width or height", "invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            rgb = img.convert("RGB")
    except OSError as e:
        raise ImageError(
            f"image data is truncated or corrupt ({e}); re-encode and resend it", "corrupt_image"
        ) from None
    except Exception as e:
        raise ImageError(
            f"image could not be decoded ({type(e).__name__}: {e})", "corrupt_image"
        ) from None
    return rgb


def host_allowed(host: str, allowlist: tuple[str, ...]) -> bool:
    """Whether a host matches an allow-list entry (`.example.com` matches subdomains too)."""
    host = host.lower().rstrip(".")
    for entry in allowlist:
        if entry.startswith("."):
            if host == entry[1:] or host.endswith(entry):
                return True
        elif host == entry:
            return True
    return False


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (the system resolver, off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[str] = []
    for info in infos:
        addr = str(info[4][0])
        if addr not in out:
            out.append(addr)
    return out


def address_allowed(address: str, networks: tuple[str, ...] = ()) -> bool:
    """Whether an image fetch may connect to `address`: a public (global, non-multicast)
    address, or one inside an allow-listed network. IPv4-mapped IPv6 addresses are judged
    as the IPv4 address they carry."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in ipaddress.ip_network(n, strict=False) for n in networks):
        return True
    return ip.is_global and not ip.is_multicast


class RemoteImageFetcher:
    """Fetches `http(s)://` images from allow-listed hosts at public addresses, with limits.

    Args:
        allowlist: host names (`.example.com` = any subdomain); empty = fetching disabled.
        timeout_s: limit on the whole fetch (name resolution + connect + transfer).
        max_bytes: most bytes read off the wire; a larger body is refused mid-transfer.
        transport: an httpx transport (tests pass a mock one).
        allow_networks: networks (CIDR) whose addresses are allowed although not public.
        resolver: `(host, port) -> addresses` (the system resolver by default).
    """

    def __init__(
        self,
        allowlist: tuple[str, ...],
        timeout_s: float,
        max_bytes: int,
        transport: httpx.AsyncBaseTransport | None = None,
        allow_networks: tuple[str, ...] = (),
        resolver: Resolver = resolve_host,
    ):
        self.allowlist = allowlist
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.allow_networks = tuple(allow_networks)
        self.resolver = resolver
        self._client = (
            httpx.AsyncClient(
                timeout=timeout_s,
                follow_redirects=False,
                transport=transport,
                trust_env=False,  # no HTTP(S)_PROXY / NO_PROXY / .netrc from the environment
                headers={"User-Agent": "smolora-serve", "Accept-Encoding": "identity"},
            )
            if allowlist
            else None
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def fetch(self, url: str) -> bytes:
        """Download an allow-listed image URL.

        Raises:
            ImageError: fetching disabled, host not allowed or not at a public address,
                timeout, HTTP error, a compressed body, too big.
        """
        parts = urlsplit(url)
        if self._client is None:
            raise ImageError(
                "remote image URLs are disabled on this server; send the image inline as a "
                "data URL (data:image/png;base64,...)",
                "remote_images_disabled",
            )
        try:
            hostname, port = parts.hostname, parts.port
        except ValueError:  # a port that is not a number
            hostname, port = None, None
        if parts.scheme not in ("http", "https") or not hostname:
            raise ImageError("image URL must be a data URL or an http(s) URL", "invalid_image_url")
        if not host_allowed(hostname, self.allowlist):
            raise ImageError(
                f"host {hostname!r} is not on this server's image allow-list; "
                "send the image inline as a data URL",
                "image_host_not_allowed",
            )
        try:
            async with asyncio.timeout(self.timeout_s):
                address = await self._checked_address(
                    hostname, port or _DEFAULT_PORTS[parts.scheme]
                )
                return await self._download(parts.scheme, hostname, port, address, parts)
        except TimeoutError:
            raise ImageError(
                f"fetching the image took longer than {self.timeout_s:g}s", "image_fetch_timeout"
            ) from None
        except httpx.HTTPError as e:
            raise ImageError(
                f"fetching the image failed ({type(e).__name__})", "image_fetch_failed"
            ) from None

    async def _checked_address(self, host: str, port: int) -> str:
        """The address to connect to: `host` resolved, every address public (or allowed)."""
        try:
            addresses = await self.resolver(host, port)
        except OSError:
            raise ImageError(
                f"the image host {host!r} could not be resolved", "image_fetch_failed"
            ) from None
        if not addresses:
            raise ImageError(f"the image host {host!r} has no address", "image_fetch_failed")
        for address in addresses:
            if not address_allowed(address, self.allow_networks):
                raise ImageError(
                    f"the image host {host!r} resolves to {address}, a private, loopback, "
                    "link-local or reserved address; remote images are fetched from public "
                    "addresses only (send the image inline as a data URL)",
                    "image_host_not_allowed",
                )
        return addresses[0]

    async def _download(
        self, scheme: str, host: str, port: int | None, address: str, parts: object
    ) -> bytes:
        assert self._client is not None
        literal = f"[{address}]" if ":" in address else address
        netloc = literal if port is None else f"{literal}:{port}"
        pinned = parts._replace(netloc=netloc).geturl()  # type: ignore[attr-defined]
        host_header = host if port is None else f"{host}:{port}"
        extensions = {"sni_hostname": host} if scheme == "https" else {}
        async with self._client.stream(
            "GET", pinned, headers={"Host": host_header}, extensions=extensions
        ) as resp:
            if resp.status_code != 200:
                raise ImageError(
                    f"fetching the image failed: HTTP {resp.status_code}", "image_fetch_failed"
                )
            encoding = resp.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise ImageError(
                    f"the image host sent a {encoding!r}-encoded body; image bytes are taken "
                    "uncompressed only (Content-Encoding: identity)",
                    "image_encoding_not_accepted",
                )
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self.max_bytes:
                raise ImageError(
                    f"remote image is {declared} bytes, over the limit of {self.max_bytes}",
                    "image_too_large",
                )
            buf = bytearray()
            # With the encoding checked to be identity, these are the bytes on the wire.
            async for chunk in resp.aiter_bytes():
                buf += chunk
                if len(buf) > self.max_bytes:
                    raise ImageError(
                        f"remote image is over the limit of {self.max_bytes} bytes",
                        "image_too_large",
                    )
            return bytes(buf)


_DEFAULT_PORTS = {"http": 80, "https": 443}


class ImageLoader:
    """Turns the image URLs of a request into validated RGB images, decoded off the event loop.

    Args:
        limits: byte/pixel/format/count limits.
        fetcher: for http(s) URLs (disabled unless it has an allow-list).
        executor: where base64 and image decoding run (None: the loop's default executor).
        on_decode: called once per image whose decoding starts (e.g. a metric's `inc`).

    Attributes:
        decoded: images whose decoding started (the expensive step a refused request must
            never reach).
    """

    def __init__(
        self,
        limits: ImageLimits,
        fetcher: RemoteImageFetcher,
        executor: Executor | None = None,
        on_decode: Callable[[], None] | None = None,
    ):
        self.limits = limits
        self.fetcher = fetcher
        self.executor = executor
        self.on_decode = on_decode
        self.decoded = 0
        self._lock = threading.Lock()

    async def load(self, url: str) -> Image.Image:
        """Decode one image URL (data or allow-listed http(s)) in the executor.

        Raises:
            ImageError: see `parse_data_url`, `decode_image`, `RemoteImageFetcher.fetch`.
        """
        loop = asyncio.get_running_loop()
        if url.startswith("data:"):
            return await loop.run_in_executor(self.executor, self._decode_data_url, url)
        if url.lower().startswith(("http://", "https://")):
            data = await self.fetcher.fetch(url)
            return await loop.run_in_executor(self.executor, self._decode, data)
        raise ImageError(
            "image_url.url must be a data URL (data:image/png;base64,...) or an http(s) URL",
            "invalid_image_url",
        )

    def _decode_data_url(self, url: str) -> Image.Image:
        return self._decode(parse_data_url(url, self.limits))

    def _decode(self, data: bytes) -> Image.Image:
        with self._lock:
            self.decoded += 1
        if self.on_decode is not None:
            self.on_decode()
        return decode_image(data, self.limits)
