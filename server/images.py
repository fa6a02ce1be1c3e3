"""Decode and validate the images of a request: data URLs, allow-listed remote URLs, limits.

`ImageLimits` holds the byte, pixel, format and count limits. `parse_data_url` and
`decode_image` are pure functions: base64 data URLs in, an RGB `PIL.Image` out, or an
`ImageError` whose message tells the caller what to fix (bad base64, not an image, a
format we do not take, truncated data, too many bytes or pixels). `RemoteImageFetcher`
fetches `http(s)://` URLs only from allow-listed hosts, with a time limit and a byte
limit, never following redirects. `ImageLoader` puts both together.

It does not resize or normalise images for the model (the engine's processor does) and
does not know about HTTP status codes (the API maps `ImageError` to 400).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import warnings
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
            f"image media type {media!r} is not accepted; use one of {', '.join(limits.media_types())}",
            "unsupported_image_format",
        )
    compact = "".join(payload.split())
    if len(compact) * 3 // 4 > limits.max_bytes + 3:
        raise ImageError(
            f"image is about {len(compact) * 3 // 4} bytes, over the limit of {limits.max_bytes} bytes; "
            "send a smaller or more compressed image",
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


#: Images up to this many pixels are decoded on the event loop (a 512x512 PNG decodes in ~1 ms).
INLINE_MAX_PIXELS = 512 * 512


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


class RemoteImageFetcher:
    """Fetches `http(s)://` images from allow-listed hosts, with time and byte limits.

    Args:
        allowlist: host names (`.example.com` = any subdomain); empty = fetching disabled.
        timeout_s: limit on the whole fetch (connect + transfer).
        max_bytes: most bytes read; a larger body is refused mid-transfer.
        transport: an httpx transport (tests pass a mock one).
    """

    def __init__(
        self,
        allowlist: tuple[str, ...],
        timeout_s: float,
        max_bytes: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.allowlist = allowlist
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self._client = (
            httpx.AsyncClient(
                timeout=timeout_s,
                follow_redirects=False,
                transport=transport,
                headers={"User-Agent": "smolora-serve"},
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
            ImageError: fetching disabled, host not allowed, timeout, HTTP error, too big.
        """
        parts = urlsplit(url)
        if self._client is None:
            raise ImageError(
                "remote image URLs are disabled on this server; send the image inline as a "
                "data URL (data:image/png;base64,...)",
                "remote_images_disabled",
            )
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageError("image URL must be a data URL or an http(s) URL", "invalid_image_url")
        if not host_allowed(parts.hostname, self.allowlist):
            raise ImageError(
                f"host {parts.hostname!r} is not on this server's image allow-list; "
                "send the image inline as a data URL",
                "image_host_not_allowed",
            )
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._client.stream("GET", url) as resp:
                    if resp.status_code != 200:
                        raise ImageError(
                            f"fetching the image failed: HTTP {resp.status_code}",
                            "image_fetch_failed",
                        )
                    declared = resp.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > self.max_bytes:
                        raise ImageError(
                            f"remote image is {declared} bytes, over the limit of {self.max_bytes}",
                            "image_too_large",
                        )
                    buf = bytearray()
                    async for chunk in resp.aiter_bytes():
                        buf += chunk
                        if len(buf) > self.max_bytes:
                            raise ImageError(
                                f"remote image is over the limit of {self.max_bytes} bytes",
                                "image_too_large",
                            )
                    return bytes(buf)
        except TimeoutError:
            raise ImageError(
                f"fetching the image took longer than {self.timeout_s:g}s", "image_fetch_timeout"
            ) from None
        except httpx.HTTPError as e:
            raise ImageError(
                f"fetching the image failed ({type(e).__name__})", "image_fetch_failed"
            ) from None


class ImageLoader:
    """Turns the image URLs of a request into validated RGB images.

    Args:
        limits: byte/pixel/format/count limits.
        fetcher: for http(s) URLs (disabled unless it has an allow-list).
    """

    def __init__(
        self,
        limits: ImageLimits,
        fetcher: RemoteImageFetcher,
        inline_max_pixels: int = INLINE_MAX_PIXELS,
    ):
        self.limits = limits
        self.fetcher = fetcher
        self.inline_max_pixels = inline_max_pixels

    async def load(self, url: str) -> Image.Image:
        """Decode one image URL (data or allow-listed http(s)).

        Images of at most `inline_max_pixels` (read from the header) are decoded on the event
        loop: that takes well under a millisecond, while a hop to a worker thread can cost
        several milliseconds of time to first token on a busy loop (the thread waits for the
        GIL). Larger images are decoded off the event loop.

        Raises:
            ImageError: see `parse_data_url`, `decode_image`, `RemoteImageFetcher.fetch`.
        """
        if url.startswith("data:"):
            data = parse_data_url(url, self.limits)
        elif url.lower().startswith(("http://", "https://")):
            data = await self.fetcher.fetch(url)
        else:
            raise ImageError(
                "image_url.url must be a data URL (data:image/png;base64,...) or an http(s) URL",
                "invalid_image_url",
            )
        if header_pixels(data) <= self.inline_max_pixels:
            return decode_image(data, self.limits)
        return await asyncio.to_thread(decode_image, data, self.limits)


def header_pixels(data: bytes) -> int:
    """width * height from the image header (no pixel decoding); 0 when the header is unreadable
    (`decode_image` then reports why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except Exception:  # noqa: BLE001 - garbage is decode_image's to report (quickly: it fails on the header too)
        return 0
    return int(width) * int(height)
