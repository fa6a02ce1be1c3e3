"""Typed configuration of the HTTP server (`ServerSettings`), validated on construction.

One frozen dataclass groups everything the HTTP layer decides: where the model and the
checkpoint registry live (or that adapters are off: base-only serving), listening
address, auth keys, request limits (images, tokens, queue), instruction snapping and the
registry watcher. `server/cli.py` builds it from
command-line arguments; tests build it directly. It does not read environment variables
(the CLI may, at start-up) and it does not configure the engine's internals beyond the
few knobs the engine factory receives through it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from smolora.server.promotion_policy import PromotionPolicy

#: Most stop strings per request (OpenAI's limit; the engine enforces the same).
MAX_STOP_STRINGS = 4


@dataclass(frozen=True)
class ServerSettings:
    """Everything the HTTP server needs to know, validated in `__post_init__`.

    Attributes:
        model_dir: the base-model folder (LLaVA layout: config.json, tokenizer, weights).
        registry_dir: the checkpoint registry folder (`v0001-<task>/`, ..., `latest`);
            None (required) when `adapters` is False.
        adapters: True serves SMoLoRA checkpoint versions from the registry (instruction
            embedding, routing, versions, admin routes). False serves the base model with
            adapters disabled: no registry, no instruction encoder, no checkpoint admin
            routes; a request naming a version or an instruction gets a 4xx.
        served_model_name: the `model` name clients use; default: the model folder's name.
        host: listening address.
        port: listening port (0 = let the OS pick; the CLI logs the bound port).
        api_keys: keys accepted for inference endpoints (`Authorization: Bearer KEY`);
            empty = inference is open.
        admin_api_key: key for the checkpoint admin endpoints; None = admin endpoints are
            disabled (they answer 403).
        initial_version: version to load and activate at start-up; None = the registry's
            `latest`. The server starts without an active version when the registry is
            empty, and becomes ready once one is published and picked up.
        watch_registry: poll the registry and load each newly published version.
        watch_interval_s: seconds between registry polls.
        watch_activate: activate a newly picked-up version (otherwise only load it).
        promotion: when a newly picked-up version may go live (evaluation floors, canary);
            the default checks nothing and activates it at once.
        keep_state: remember the active version and the newest version handled across
            restarts (`server/serving_state.py`), so that a restarted server serves the
            version it served before.
        state_file: where (None: `<registry>/.serving/<served_model_name>.json`, shared by
            the replicas of one model that share the registry).
        max_resident_versions: most checkpoint versions kept loaded; loading one more
            unloads the oldest inactive one first. The engine has one slot more: a swap
            (or a promotion canary) loads into that staging slot when no inactive version can
            be unloaded, and the surplus is unloaded once its requests have ended.
        max_resident_bytes: most tensor bytes the resident versions may hold together
            (each counted from its checkpoint's safetensors header); loading one more
            unloads the least recently used inactive versions until it fits. None: no limit.
        max_images_per_request: most image parts in one request.
        max_image_bytes: most encoded bytes of one image (after base64 decoding).
        max_image_pixels: most pixels (width * height) of one decoded image.
        image_formats: accepted image formats (PIL names).
        image_url_allowlist: hosts from which `http(s)://` image URLs may be fetched; an
            entry `.example.com` allows every subdomain. Empty = only data URLs.
        image_fetch_timeout_s: total time limit of one remote image fetch.
        image_url_allow_networks: networks (CIDR, e.g. `10.1.2.0/24`) a remote image host
            may resolve into although they are private, loopback, link-local or reserved
            (refused otherwise). Empty = only public addresses.
        max_request_bytes: most bytes of one HTTP request body.
        max_prompt_chars: most characters of text (all messages together) in one chat
            request, checked before anything is tokenized (a longer one gets 400
            `text_too_long`).
        preparation_threads: worker threads for a request's CPU work off the event loop
            (image decoding, prompt rendering and tokenization, instruction embedding).
        default_max_tokens: completion length when a request names none (capped by the
            context left after the prompt).
        max_n: most choices (`n`) per request.
        max_stop_sequences: most `stop` strings per request (1..4, OpenAI's limit).
        max_concurrent_requests: engine requests in flight at once (each choice counts).
        max_waiting_requests: requests waiting for a slot; beyond this a request gets 429.
        queue_timeout_s: a waiting request gets 503 after this long.
        retry_after_s: the Retry-After value sent with 429/503.
        shutdown_grace_s: on SIGTERM, how long in-flight requests may run on while `/ready`
            answers 503 and new chat requests are refused; streams still running then end
            with an error event and `[DONE]`.
        rate_limit_requests_per_min: per API key (per client address when the server has no
            keys), chat requests allowed per minute (a token bucket holding one minute's
            worth); None = no limit.
        rate_limit_tokens_per_min: per API key, prompt + completion tokens per minute; a
            request's tokens are charged when it ends and a key in debt is refused until
            the bucket refills; None = no limit.
        snap_threshold: cosine similarity at or above which an extracted instruction is
            snapped to the nearest known instruction type of the checkpoint.
        default_instruction: the instruction used when the user's text is empty (an
            image-only request).
        trace_default: include the routing trace when a request does not say.
        record_expert_metrics: ask the engine for every request's routes so that
            `smolora_expert_selections_total` counts all requests, not only traced ones.
        engine_check_interval_s: how often the server checks that the engine is alive.
        exit_on_engine_failure: when the engine has died, drain and exit with status 3
            so that the supervisor (compose `restart:`, Kubernetes) starts a fresh server;
            False keeps the process up, answering 503 `engine_unavailable`.
        engine_options: free-form options handed to the engine factory unchanged.
        log_level: Python logging level name for the server's loggers.
    """

    model_dir: Path
    registry_dir: Path | None
    adapters: bool = True
    served_model_name: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    admin_api_key: str | None = None
    initial_version: int | None = None
    watch_registry: bool = True
    watch_interval_s: float = 2.0
    watch_activate: bool = True
    promotion: PromotionPolicy = field(default_factory=PromotionPolicy)
    keep_state: bool = True
    state_file: Path | None = None
    max_resident_versions: int = 2
    max_resident_bytes: int | None = None
    max_images_per_request: int = 4
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
    image_url_allowlist: tuple[str, ...] = ()
    image_fetch_timeout_s: float = 10.0
    image_url_allow_networks: tuple[str, ...] = ()
    max_request_bytes: int = 64 * 1024 * 1024
    max_prompt_chars: int = 100_000
    preparation_threads: int = 4
    default_max_tokens: int = 256
    max_n: int = 8
    max_stop_sequences: int = MAX_STOP_STRINGS
    max_concurrent_requests: int = 64
    max_waiting_requests: int = 256
    queue_timeout_s: float = 60.0
    retry_after_s: int = 1
    shutdown_grace_s: float = 30.0
    rate_limit_requests_per_min: float | None = None
    rate_limit_tokens_per_min: float | None = None
    snap_threshold: float = 0.75
    default_instruction: str = "Provide a one-sentence caption for the provided image."
    trace_default: bool = False
    record_expert_metrics: bool = True
    engine_check_interval_s: float = 2.0
    exit_on_engine_failure: bool = True
    engine_options: dict[str, Any] = field(default_factory=dict)
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        if self.registry_dir is not None:
            object.__setattr__(self, "registry_dir", Path(self.registry_dir))
        if self.state_file is not None:
            object.__setattr__(self, "state_file", Path(self.state_file))
        if not self.served_model_name:
            object.__setattr__(self, "served_model_name", self.model_dir.name or "model")
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        object.__setattr__(self, "image_formats", tuple(f.upper() for f in self.image_formats))
        object.__setattr__(
            self, "image_url_allowlist", tuple(h.lower() for h in self.image_url_allowlist)
        )
        object.__setattr__(self, "image_url_allow_networks", tuple(self.image_url_allow_networks))
        problems = self._problems()
        if problems:
            raise ValueError("invalid server settings: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        p: list[str] = []
        if self.adapters and self.registry_dir is None:
            p.append(
                "registry_dir is required when adapters are on "
                "(pass --registry, or --no-adapters for the base model)"
            )
        if not self.adapters and self.registry_dir is not None:
            p.append(
                "registry_dir must not be set with adapters off "
                "(base-only serving reads no checkpoints)"
            )
        if self.max_stop_sequences > MAX_STOP_STRINGS:
            p.append(
                f"max_stop_sequences must be <= {MAX_STOP_STRINGS} "
                "(OpenAI's limit, enforced by the engine)"
            )
        if "@" in self.served_model_name or any(c.isspace() for c in self.served_model_name):
            p.append(
                f"served_model_name {self.served_model_name!r} must not contain '@' "
                "(it separates the version) or spaces"
            )
        if not 0 <= self.port <= 65535:
            p.append(f"port {self.port} is not in 0..65535")
        if any(not k for k in self.api_keys):
            p.append("api_keys must not contain empty keys")
        if self.admin_api_key is not None and not self.admin_api_key:
            p.append("admin_api_key must not be empty (use None to disable admin endpoints)")
        if self.initial_version is not None and self.initial_version < 1:
            p.append("initial_version must be >= 1")
        if self.watch_interval_s <= 0:
            p.append("watch_interval_s must be > 0")
        if not 1 <= self.max_resident_versions <= 15:
            p.append("max_resident_versions must be in [1, 15] (the engine holds 16 slots)")
        p.extend(self.promotion.problems())
        if self.promotion.gated and not (
            self.adapters and self.watch_registry and self.watch_activate
        ):
            p.append(
                "a promotion policy needs adapters on, the registry watched and new versions "
                "activated (it decides how the watcher's new versions go live)"
            )
        if self.max_resident_bytes is not None and self.max_resident_bytes < 1:
            p.append("max_resident_bytes must be >= 1")
        for name in (
            "max_images_per_request",
            "max_image_bytes",
            "max_image_pixels",
            "max_request_bytes",
            "default_max_tokens",
            "max_n",
            "max_stop_sequences",
            "max_concurrent_requests",
            "max_prompt_chars",
            "preparation_threads",
        ):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1")
        if self.max_waiting_requests < 0:
            p.append("max_waiting_requests must be >= 0")
        if self.queue_timeout_s <= 0 or self.image_fetch_timeout_s <= 0:
            p.append("queue_timeout_s and image_fetch_timeout_s must be > 0")
        if self.retry_after_s < 1:
            p.append("retry_after_s must be >= 1")
        if self.shutdown_grace_s < 0:
            p.append("shutdown_grace_s must be >= 0")
        if self.engine_check_interval_s <= 0:
            p.append("engine_check_interval_s must be > 0")
        for name in ("rate_limit_requests_per_min", "rate_limit_tokens_per_min"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                p.append(f"{name} must be > 0 (or None for no limit)")
        for net in self.image_url_allow_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                p.append(
                    f"image_url_allow_networks entry {net!r} is not a network (e.g. 10.1.2.0/24)"
                )
        if not -1.0 <= self.snap_threshold <= 1.0:
            p.append("snap_threshold is a cosine similarity: it must be in [-1, 1]")
        known = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}
        if not self.image_formats or set(self.image_formats) - known:
            p.append(f"image_formats must be a non-empty subset of {sorted(known)}")
        for host in self.image_url_allowlist:
            if not host or "/" in host or (":" in host and not _is_ip(host.strip("[]"))):
                p.append(
                    f"image_url_allowlist entry {host!r} must be a host name "
                    "(e.g. images.example.com or .example.com)"
                )
        if not self.default_instruction.strip():
            p.append("default_instruction must not be empty")
        return p

    def with_overrides(self, **changes: Any) -> ServerSettings:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
