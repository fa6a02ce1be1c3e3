"""The serving policy for checkpoint versions: `VersionManager`, the one owner everybody asks.

Who owns what:
- this module decides *which* versions are served: it is the only caller, on a server, of
  the engine's `load_version` / `activate` / `unload_version`; it keeps the activation
  history (`rollback` returns to the version active before the current one), the resident
  caps (`max_resident`: the least recently loaded inactive version is unloaded first;
  `max_resident_bytes`, optional: the tensor bytes of the resident versions, counted from
  each checkpoint's safetensors header, and the least recently used -- loaded or activated
  -- inactive versions are unloaded until the new one fits), the
  link to the registry folder (only complete, published versions are loaded) and the
  version metrics (load times into `smolora_checkpoint_load_duration_seconds`, the active
  version, the resident count). Chat, the admin endpoints, the registry watcher, health,
  `/v1/models` and readiness all ask it (`active`, `resident`, `get`, `require`,
  `registry`, `describe`); none of them reads the engine's version state directly.
- the engine (`server/engine/versions.py`) records what is *installed* in its worker
  slots: which version each slot holds, the in-flight requests pinned to each slot, and
  the default slot of requests that name no version (set only through `activate`, which
  this manager calls). The manager reads those facts through `EngineClient.list_versions`
  / `active_version` and keeps no copy of them.

An asyncio lock serialises the changes of the admin endpoints and the registry watcher.
Engine refusals become typed HTTP errors here (`CheckpointRejected`, 404, 409, 503).

It does not verify or parse tensors itself (the engine's worker loads through
`smolora.adapters.checkpoint`, which refuses corrupt or foreign checkpoints) and does not
watch the folder (`server/registry_watch.py` does).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import struct
import time
from pathlib import Path
from typing import Any

from smolora.adapters.checkpoint import (
    TENSORS,
    CheckpointError,
    RegistryEntry,
    latest_version,
    list_versions,
)
from smolora.server.api.errors import (
    APIError,
    ConflictError,
    NotFoundError,
    ServiceUnavailableError,
)
from smolora.server.engine.protocol import (
    EngineClient,
    EngineError,
    NoFreeSlotError,
    VersionInfo,
    VersionLoadError,
    VersionNotResidentError,
)
from smolora.server.metrics import Metrics
from smolora.server.serving_state import ServingStateStore

log = logging.getLogger("smolora.server.versions")


class CheckpointRejected(APIError):
    """422: the published checkpoint cannot be served (corrupt, other base model, incompatible)."""

    status_code = 422
    error_type = "invalid_request_error"


def checkpoint_tensor_bytes(path: Path) -> int:
    """Bytes of a checkpoint's tensors, summed from its safetensors header (no tensor is read).

    Raises:
        CheckpointError: the tensor file is missing or its header is not safetensors.
    """
    file = Path(path) / TENSORS
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > 100 * 1024 * 1024:
                raise ValueError(f"header of {header_len} bytes")
            header = json.loads(f.read(header_len))
        return sum(
            int(entry["data_offsets"][1]) - int(entry["data_offsets"][0])
            for name, entry in header.items()
            if name != "__metadata__"
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:
        raise CheckpointError(f"{file}: cannot read the safetensors header ({e})") from None


class VersionManager:
    """Loads, activates, rolls back and unloads checkpoint versions of one registry.

    Args:
        engine: the serving engine.
        registry_dir: the registry folder.
        metrics: where load times and the active version go.
        max_resident: most versions kept loaded.
        retry_after_s: Retry-After of a 503 when the engine has no free slot.
        max_resident_bytes: most tensor bytes the resident versions may hold together
            (`checkpoint_tensor_bytes`); None: no byte budget.
        state: where the active version is remembered across restarts (None: nowhere).
    """

    def __init__(
        self,
        engine: EngineClient,
        registry_dir: Path,
        metrics: Metrics,
        max_resident: int,
        retry_after_s: int = 1,
        max_resident_bytes: int | None = None,
        state: ServingStateStore | None = None,
    ):
        if max_resident < 1:
            raise ValueError(f"max_resident must be >= 1, got {max_resident}")
        if max_resident_bytes is not None and max_resident_bytes < 1:
            raise ValueError(f"max_resident_bytes must be >= 1, got {max_resident_bytes}")
        self._max_resident_bytes = max_resident_bytes
        self._state = state
        self._bytes: dict[int, int] = {}  # version -> tensor bytes (resident or loaded before)
        self._uses = itertools.count(1)
        self._last_used: dict[int, int] = {}  # version -> when it was last loaded or activated
        self._engine = engine
        self._retry_after_s = retry_after_s
        self._registry_dir = Path(registry_dir)
        self._metrics = metrics
        self._max_resident = max_resident
        self._history: list[int] = []
        self._held: set[int] = set()  # inactive versions not to unload (a canary)
        self._lock = asyncio.Lock()
        self._publish_metrics()

    # --- queries -----------------------------------------------------------------------
    @property
    def registry_dir(self) -> Path:
        """The registry folder versions are loaded from."""
        return self._registry_dir

    @property
    def history(self) -> list[int]:
        """Activated versions, oldest first (a copy; `rollback` walks it backwards)."""
        return list(self._history)

    async def registry(self) -> list[RegistryEntry]:
        """Complete versions in the registry folder, oldest first."""
        return await asyncio.to_thread(list_versions, self._registry_dir)

    def resident(self) -> list[VersionInfo]:
        """Resident versions, oldest version number first."""
        return sorted(self._engine.list_versions(), key=lambda v: v.version)

    def active(self) -> int | None:
        info = self._engine.active_version()
        return None if info is None else info.version

    def get(self, version: int) -> VersionInfo | None:
        return next((v for v in self._engine.list_versions() if v.version == version), None)

    def require(self, version: int) -> VersionInfo:
        """A resident version, or a 404 that lists the resident ones."""
        info = self.get(version)
        if info is None:
            resident = ", ".join(str(v.version) for v in self.resident()) or "none"
            raise NotFoundError(
                f"checkpoint version {version} is not loaded (resident: {resident}); "
                "load it through the admin API first",
                param="smolora.version",
                code="version_not_found",
            )
        return info

    async def describe(self) -> dict[str, Any]:
        """Registry and residency, as the admin listing returns it."""
        entries = await self.registry()
        active = self.active()
        resident = {v.version: v for v in self.resident()}
        out = []
        for e in entries:
            v = resident.get(e.version)
            out.append(
                {
                    "version": e.version,
                    "name": e.name,
                    "task": e.task,
                    "path": str(e.path),
                    "resident": v is not None,
                    "active": e.version == active,
                    "loaded_at": v.loaded_at if v else None,
                    "instruction_types": [t.name for t in v.instruction_table.types] if v else None,
                }
            )
        for num, v in resident.items():  # resident but no longer in the registry folder
            if not any(e.version == num for e in entries):
                out.append(
                    {
                        "version": num,
                        "name": v.name,
                        "task": v.tasks[-1] if v.tasks else None,
                        "path": str(v.path),
                        "resident": True,
                        "active": num == active,
                        "loaded_at": v.loaded_at,
                        "instruction_types": [t.name for t in v.instruction_table.types],
                    }
                )
        out.sort(key=lambda d: d["version"])
        latest = await asyncio.to_thread(latest_version, self._registry_dir)
        return {
            "registry": str(self._registry_dir),
            "active": active,
            "latest": latest.version if latest else None,
            "history": self.history,
            "versions": out,
        }

    # --- changes -----------------------------------------------------------------------
    async def load(self, version: int, activate: bool = False, hold: bool = False) -> VersionInfo:
        """Make a published version resident (and optionally active).

        Args:
            version: the registry version.
            activate: make it active (a swap: it may take the staging slot).
            hold: keep it resident although inactive until `release` (a promotion canary;
                it may take the staging slot too).

        Raises:
            NotFoundError: no complete version with this number in the registry.
            CheckpointRejected: the engine or the format check refused it.
            ConflictError: no inactive version to unload, and neither an activation nor a
                hold may use the staging slot.
            ServiceUnavailableError: the versions to unload are busy and the staging slot
                is taken (retry).
        """
        async with self._lock:
            if hold:
                self._held.add(version)
            try:
                info = self.get(version) or await self._load_locked(
                    version, staging=activate or hold
                )
            except BaseException:
                self._held.discard(version)
                raise
            if activate:
                await self._activate_locked(version)
            return info

    async def _load_locked(self, version: int, staging: bool = True) -> VersionInfo:
        entry = next((e for e in await self.registry() if e.version == version), None)
        if entry is None:
            raise NotFoundError(
                f"version {version} is not published in the registry {self._registry_dir}",
                param="version",
                code="version_not_found",
            )
        needed = 0
        if self._max_resident_bytes is not None:
            needed = await self._tensor_bytes(version, entry.path)
        if self._max_resident_bytes is not None and needed > self._max_resident_bytes:
            raise ConflictError(
                f"version {version} holds {needed} tensor bytes, more than the resident budget "
                f"of {self._max_resident_bytes} (--max-resident-bytes); raise the budget",
                code="over_resident_budget",
            )
        await self._evict_for_one_more(needed, staging)
        t0 = time.perf_counter()
        try:
            info = await self._engine.load_version(entry.path, activate=False)
        except (VersionLoadError, CheckpointError) as e:
            self._metrics.observe_checkpoint_load(time.perf_counter() - t0, ok=False)
            log.warning("refused checkpoint %s: %s", entry.path, e)
            raise CheckpointRejected(
                f"checkpoint {entry.name} cannot be served: {e}",
                param="version",
                code="checkpoint_rejected",
            ) from None
        except NoFreeSlotError as e:
            self._metrics.observe_checkpoint_load(time.perf_counter() - t0, ok=False)
            raise ServiceUnavailableError(
                f"no free version slot now ({e})",
                retry_after_s=self._retry_after_s,
                code="no_free_slot",
            ) from None
        except BaseException:
            self._metrics.observe_checkpoint_load(time.perf_counter() - t0, ok=False)
            raise
        seconds = time.perf_counter() - t0
        self._metrics.observe_checkpoint_load(seconds, ok=True)
        log.info("loaded checkpoint %s (version %d) in %.2fs", entry.name, version, seconds)
        self._last_used[version] = next(self._uses)
        self._publish_metrics()
        return info

    async def _tensor_bytes(self, version: int, path: Path) -> int:
        if version not in self._bytes:
            try:
                self._bytes[version] = await asyncio.to_thread(checkpoint_tensor_bytes, path)
            except CheckpointError as e:
                raise CheckpointRejected(
                    f"checkpoint {path.name} cannot be served: {e}",
                    param="version",
                    code="checkpoint_rejected",
                ) from None
        return self._bytes[version]

    def _over_budget(self, resident: list[VersionInfo], needed: int) -> bool:
        if self._max_resident_bytes is None:
            return False
        held = sum(self._bytes.get(v.version, 0) for v in resident)
        return held + needed > self._max_resident_bytes

    async def _count_resident_bytes(self) -> None:
        """Learn the tensor bytes of resident versions not counted yet (e.g. the start-up
        version, loaded before this manager existed)."""
        if self._max_resident_bytes is None:
            return
        for v in self.resident():
            if v.version not in self._bytes:
                try:
                    await self._tensor_bytes(v.version, v.path)
                except CheckpointRejected as e:  # its folder went away since it was loaded
                    log.warning("resident version %d counts as 0 bytes: %s", v.version, e)
                    self._bytes[v.version] = 0

    def _within_limits(self, resident: list[VersionInfo], needed: int = 0, extra: int = 0) -> bool:
        return len(resident) + extra <= self._max_resident and not self._over_budget(
            resident, needed
        )

    def _eviction_order(self, resident: list[VersionInfo], by_use: bool) -> list[VersionInfo]:
        """Inactive versions that may be unloaded (not held by a canary), first victim first:
        the least recently loaded, or with `by_use` the least recently used."""
        active = self.active()
        out = [v for v in resident if v.version != active and v.version not in self._held]
        if by_use:
            out.sort(key=lambda v: (self._last_used.get(v.version, 0), v.loaded_at))
        else:
            out.sort(key=lambda v: (v.loaded_at, v.version))
        return out

    async def _evict_for_one_more(self, needed: int = 0, staging: bool = True) -> None:
        """Make room for one more version of `needed` tensor bytes: unload inactive versions,
        the least recently loaded while the count is at its cap, then the least recently used
        while the byte budget is short.

        A version with requests in flight cannot be unloaded, and neither the active one
        nor a held one (a canary) ever is. When no victim is left, the resident versions are
        within their limits and `staging` is allowed (the new version is about to be
        activated, or held), it goes into the engine's staging slot, one version over the
        limits -- this is how a server keeping one version swaps it -- and `trim` unloads the
        surplus once it is inactive and its requests have ended.

        Raises:
            ConflictError: no inactive version at all, and no staging allowed.
            ServiceUnavailableError: the versions to unload are busy (retry once their
                requests end).
        """
        await self._count_resident_bytes()
        resident = self.resident()
        busy: list[int] = []
        while not self._within_limits(resident, needed, extra=1):
            by_use = len(resident) < self._max_resident  # short of bytes, not of slots
            victims = [v for v in self._eviction_order(resident, by_use) if v.version not in busy]
            if not victims:
                if staging and self._within_limits(resident):
                    log.info("loading into the staging slot (versions busy: %s)", busy or "none")
                    break
                if not busy:
                    raise ConflictError(
                        "no room for another resident version: every resident version is "
                        "active or held; activate the new version directly (a swap may use "
                        "the staging slot) or raise --max-resident-versions",
                        code="no_free_slot",
                    )
                raise ServiceUnavailableError(
                    f"no room for another resident version now: version(s) {busy} still "
                    "serve requests",
                    retry_after_s=self._retry_after_s,
                    code="no_free_slot",
                )
            victim = victims[0]
            try:
                await self._engine.unload_version(victim.version)
            except EngineError as e:  # e.g. in-flight requests are pinned to it
                log.info("version %d cannot be unloaded now (%s)", victim.version, e)
                busy.append(victim.version)
                continue
            log.info(
                "unloaded version %d to make room (max %d resident, %s tensor bytes)",
                victim.version,
                self._max_resident,
                self._max_resident_bytes or "no byte budget",
            )
            resident.remove(victim)
        self._publish_metrics()

    async def trim(self) -> list[int]:
        """Unload inactive versions over the limits (a swap's surplus in the staging slot),
        least recently used first; one whose requests are still running is left for the
        next call. The registry watcher calls it at every poll.

        Returns:
            The versions unloaded.
        """
        async with self._lock:
            return await self._trim_locked()

    async def _trim_locked(self) -> list[int]:
        resident = self.resident()
        if self._within_limits(resident):
            self._publish_metrics()
            return []
        await self._count_resident_bytes()
        unloaded = []
        for victim in self._eviction_order(resident, by_use=True):
            if self._within_limits(resident):
                break
            try:
                await self._engine.unload_version(victim.version)
            except EngineError:  # its requests are still running: the next trim
                continue
            log.info("unloaded version %d (over the resident limits)", victim.version)
            resident.remove(victim)
            unloaded.append(victim.version)
        self._publish_metrics()
        return unloaded

    def hold(self, version: int) -> None:
        """Keep `version` resident although inactive (a promotion canary) until `release`."""
        self._held.add(version)

    def release(self, version: int) -> None:
        self._held.discard(version)

    async def activate(self, version: int) -> VersionInfo:
        """Make a resident version active (a published, non-resident one is loaded first)."""
        async with self._lock:
            if self.get(version) is None:
                await self._load_locked(version)
            await self._activate_locked(version)
            return self.require(version)

    async def _activate_locked(self, version: int) -> None:
        if self.active() == version:
            if not self._history or self._history[-1] != version:
                self._history.append(version)  # e.g. the engine started with this version active
            self._remember(version)
            return
        try:
            await self._engine.activate(version)
        except VersionNotResidentError as e:
            raise NotFoundError(str(e), param="version", code="version_not_found") from None
        self._history.append(version)
        self._last_used[version] = next(self._uses)
        del self._history[:-64]
        log.info("activated version %d", version)
        self._remember(version)
        await self._trim_locked()  # a swap through the staging slot: the old version goes

    async def rollback(self) -> VersionInfo:
        """Activate the version that was active before the current one.

        Raises:
            ConflictError: there is no earlier version still published or resident.
        """
        async with self._lock:
            current = self.active()
            published = {e.version for e in await self.registry()}
            resident = {v.version for v in self.resident()}
            for idx in range(len(self._history) - 2, -1, -1):
                prev = self._history[idx]
                if prev == current or (prev not in resident and prev not in published):
                    continue
                if prev not in resident:
                    await self._load_locked(prev)
                await self._engine.activate(prev)
                self._remember(prev)
                await self._trim_locked()
                self._last_used[prev] = next(self._uses)
                # Roll back is "undo": the history returns to where `prev` was activated.
                self._history = self._history[: idx + 1]
                log.info("rolled back from version %s to %d", current, prev)
                self._publish_metrics()
                return self.require(prev)
            raise ConflictError(
                "there is no earlier active version to roll back to", code="no_previous_version"
            )

    async def unload(self, version: int) -> None:
        """Unload a resident version that is not active (the engine frees its slot).

        Raises:
            NotFoundError: not resident.
            ConflictError: it is the active version (`version_active`), or in-flight requests
                are pinned to it (`version_busy`; retry once they finish).
        """
        async with self._lock:
            self.require(version)
            if self.active() == version:
                raise ConflictError(
                    f"version {version} is active; activate another version before unloading it",
                    code="version_active",
                )
            try:
                await self._engine.unload_version(version)
            except VersionNotResidentError as e:
                raise NotFoundError(str(e), code="version_not_found") from None
            except EngineError as e:
                raise ConflictError(
                    f"version {version} cannot be unloaded now: {e}", code="version_busy"
                ) from None
            log.info("unloaded version %d", version)
            self._publish_metrics()

    def _remember(self, version: int) -> None:
        if self._state is not None:
            self._state.update(active=version)

    async def load_initial(self, initial_version: int | None) -> VersionInfo | None:
        """Load and activate the start-up version: the one named, else the one active before
        a restart (when it is still published), else the registry's latest."""
        remembered = self._state.state.active if self._state is not None else None
        if initial_version is None and remembered is not None:
            if any(e.version == remembered for e in await self.registry()):
                log.info("activating version %d, active before the restart", remembered)
                initial_version = remembered
            else:
                log.warning(
                    "version %d, active before the restart, is no longer published; "
                    "starting on the latest",
                    remembered,
                )
        if initial_version is None:
            latest = await asyncio.to_thread(latest_version, self._registry_dir)
            if latest is None:
                log.warning(
                    "registry %s has no published version yet; waiting for one", self._registry_dir
                )
                return None
            initial_version = latest.version
        return await self.load(initial_version, activate=True)

    def _publish_metrics(self) -> None:
        self._metrics.set_versions(self.active(), len(self.resident()))
