"""Watch the checkpoint registry folder and load each newly published version.

`RegistryWatcher` polls `VersionManager.registry()` (which lists only complete, published
folders: publishing renames a finished folder into place) every `interval_s` seconds.
Each version newer than the newest one seen so far is loaded through the
`VersionManager` and, if `activate` is set (or nothing is active yet), activated -- or,
with a `Promoter` (a promotion policy is configured) and a version already active, loaded
inactive and offered to it, which decides whether and how it goes live.

A version that fails to load (corrupt, another base model, a malformed manifest) is
logged, counted in `smolora_checkpoint_loads_total{result="error"}`, and retried:
immediately when its folder's files change (a folder copied into the registry without the
atomic rename is complete a moment later), otherwise after a backoff that doubles from
`interval_s` up to `max_backoff_s`. Retries stop once a newer version has loaded (loading
an older one then would roll the server back). A transient refusal (503: every engine slot
busy) is retried at the next poll. Polling, not inotify: it works on network file systems
and container volumes alike, and a few stat calls per interval cost nothing.

It does not publish, verify or delete checkpoints.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from smolora.server.api.errors import ServiceUnavailableError
from smolora.server.promotion import Promoter
from smolora.server.serving_state import ServingStateStore
from smolora.server.versions import VersionManager

log = logging.getLogger("smolora.server.registry_watch")

#: A folder's files as (name, size, mtime_ns): a change means the folder was rewritten.
FolderSignature = tuple[tuple[str, int, int], ...]


def folder_signature(path: Path) -> FolderSignature:
    """The names, sizes and modification times of the files in `path` (empty if it is gone)."""
    try:
        stats = [(f.name, f.stat()) for f in path.iterdir() if f.is_file()]
    except OSError:
        return ()
    return tuple(sorted((name, s.st_size, s.st_mtime_ns) for name, s in stats))


@dataclass
class FailedLoad:
    """A version that failed to load: when to try it again (never, once `superseded`)."""

    signature: FolderSignature
    attempts: int
    retry_at: float
    error: str
    superseded: bool = False

    def due(self, signature: FolderSignature, now: float) -> bool:
        """Whether to try again: the backoff has passed or the folder's files changed."""
        return not self.superseded and (now >= self.retry_at or signature != self.signature)


class RegistryWatcher:
    """Loads versions published after it started.

    Args:
        manager: the version manager to load through.
        interval_s: seconds between polls.
        activate: activate each newly loaded version.
        max_backoff_s: the longest wait between two retries of a version whose folder has
            not changed.
        clock: monotonic seconds (tests pass their own).
        promoter: decides whether new versions go live when `activate` is set and a version
            is already active (None: they are activated at once).
        state: where the newest version handled is remembered across restarts (None:
            nowhere; a restart then starts after the registry's newest version).
    """

    def __init__(
        self,
        manager: VersionManager,
        interval_s: float,
        activate: bool,
        max_backoff_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        promoter: Promoter | None = None,
        state: ServingStateStore | None = None,
    ):
        self.manager = manager
        self.promoter = promoter
        self.state = state
        self.interval_s = interval_s
        self.activate = activate
        self.max_backoff_s = max_backoff_s
        self.clock = clock
        self.newest_seen = 0
        self.failures: dict[int, FailedLoad] = {}

    @property
    def failed(self) -> set[int]:
        """Versions in the registry that failed to load (retried or superseded)."""
        return set(self.failures)

    async def prime(self) -> None:
        """Mark every version already in the registry as seen (start-up loads its own choice)
        -- or, after a restart, every version seen before it: those published while the
        server was down are then picked up like new ones."""
        remembered = self.state.state.newest_seen if self.state is not None else 0
        if remembered:
            self.newest_seen = remembered
        else:
            entries = await self.manager.registry()
            self.newest_seen = max((e.version for e in entries), default=0)
        if self.state is not None:
            self.state.update(newest_seen=self.newest_seen)

    async def poll_once(self) -> list[int]:
        """Load the versions published since the last poll, and retry failed ones that are due.

        Returns:
            The version numbers loaded by this poll.
        """
        await self.manager.trim()  # a swap's old version, once its requests have ended
        entries = await self.manager.registry()
        loaded: list[int] = []
        for e in entries:
            failure = self.failures.get(e.version)
            if e.version <= self.newest_seen and (failure is None or failure.superseded):
                continue
            signature = await asyncio.to_thread(folder_signature, e.path)
            if failure is not None and not failure.due(signature, self.clock()):
                continue
            nothing_active = self.manager.active() is None
            offer = self.promoter is not None and self.activate and not nothing_active
            activate = (self.activate or nothing_active) and not offer
            try:
                if offer:
                    assert self.promoter is not None
                    await self.promoter.supersede(e.version)
                await self.manager.load(e.version, activate=activate, hold=offer)
            except asyncio.CancelledError:
                raise
            except ServiceUnavailableError as exc:
                # Transient (e.g. every engine slot is busy): try again at the next poll.
                log.warning(
                    "registry watcher: version %d not loaded yet (%s); retrying", e.version, exc
                )
                break
            except Exception as exc:  # noqa: BLE001 - one bad version must not stop the watcher
                self._record_failure(e.version, signature, exc)
                log.error(
                    "registry watcher: version %d (%s) was not loaded (attempt %d; retried "
                    "when its files change or in %.0f s): %s",
                    e.version,
                    e.path,
                    self.failures[e.version].attempts,
                    self.failures[e.version].retry_at - self.clock(),
                    exc,
                )
            else:
                loaded.append(e.version)
                self.failures.pop(e.version, None)
                for version, failure in self.failures.items():
                    # loading an older version now would roll the server back
                    failure.superseded |= version < e.version
                log.info(
                    "registry watcher: picked up version %d (%s)%s",
                    e.version,
                    e.name,
                    ", now active" if activate else (", offered for promotion" if offer else ""),
                )
                if offer:
                    await self.promoter.offer(e.version)  # type: ignore[union-attr]
            self.newest_seen = max(self.newest_seen, e.version)
        listed = {e.version for e in entries}
        self.failures = {v: f for v, f in self.failures.items() if v in listed}
        if self.state is not None:
            self.state.update(newest_seen=self.newest_seen)
        return loaded

    def _record_failure(self, version: int, signature: FolderSignature, exc: Exception) -> None:
        previous = self.failures.get(version)
        attempts = 1 if previous is None else previous.attempts + 1
        backoff = min(self.interval_s * 2 ** (attempts - 1), self.max_backoff_s)
        self.failures[version] = FailedLoad(
            signature, attempts, self.clock() + backoff, f"{type(exc).__name__}: {exc}"
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set."""
        while not stop.is_set():
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - e.g. the folder vanished for a moment
                log.exception("registry watcher: poll failed; retrying in %.1fs", self.interval_s)
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except TimeoutError:
                pass
