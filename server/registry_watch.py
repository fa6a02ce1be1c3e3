"""Watch the checkpoint registry folder and load each newly published version.

`RegistryWatcher` polls `VersionManager.registry()` (which lists only complete, published
folders: publishing renames a finished folder into place) every `interval_s` seconds.
Each version newer than the newest one seen so far is loaded through the
`VersionManager` and, if `activate` is set (or nothing is active yet), activated. A
version that fails to load (corrupt, another base model) is logged and counted in
`smolora_checkpoint_loads_total{result="error"}` once, and not retried: a published
version never changes. A transient refusal (503: every engine slot busy) is retried at
the next poll. Polling, not inotify: it works on network file systems and
container volumes alike, and a few stat calls per interval cost nothing.

It does not publish, verify or delete checkpoints.
"""

from __future__ import annotations

import asyncio
import logging

from smolora.server.api.errors import ServiceUnavailableError
from smolora.server.versions import VersionManager

log = logging.getLogger("smolora.server.registry_watch")


class RegistryWatcher:
    """Loads versions published after it started.

    Args:
        manager: the version manager to load through.
        interval_s: seconds between polls.
        activate: activate each newly loaded version.
    """

    def __init__(self, manager: VersionManager, interval_s: float, activate: bool):
        self.manager = manager
        self.interval_s = interval_s
        self.activate = activate
        self.newest_seen = 0
        self.failed: set[int] = set()

    async def prime(self) -> None:
        """Mark every version already in the registry as seen (start-up loads its own choice)."""
        entries = await self.manager.registry()
        self.newest_seen = max((e.version for e in entries), default=0)

    async def poll_once(self) -> list[int]:
        """Load the versions published since the last poll.

        Returns:
            The version numbers loaded by this poll.
        """
        entries = await self.manager.registry()
        loaded: list[int] = []
        for e in entries:
            if e.version <= self.newest_seen or e.version in self.failed:
                continue
            activate = self.activate or self.manager.active() is None
            try:
                await self.manager.load(e.version, activate=activate)
            except asyncio.CancelledError:
                raise
            except ServiceUnavailableError as exc:
                # Transient (e.g. every engine slot is busy): try again at the next poll.
                log.warning(
                    "registry watcher: version %d not loaded yet (%s); retrying", e.version, exc
                )
                break
            except Exception as exc:  # noqa: BLE001 - one bad version must not stop the watcher
                self.failed.add(e.version)
                log.error(
                    "registry watcher: version %d (%s) was not loaded: %s", e.version, e.path, exc
                )
            else:
                loaded.append(e.version)
                log.info(
                    "registry watcher: picked up version %d (%s)%s",
                    e.version,
                    e.name,
                    ", now active" if activate else "",
                )
            self.newest_seen = e.version
        return loaded

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
