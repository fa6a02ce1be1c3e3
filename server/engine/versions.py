"""What is installed in the engine's version slots: `VersionTable`.

The engine keeps `num_slots` versions resident as slots of stacked adapter tensors. This
table records the facts of those slots: which version each slot holds (and its path, tasks,
instruction table and default VU routing, from its checkpoint; `resolve_vu_routing` picks a
request's mode), how many in-flight requests pin each slot, and the default slot of requests
that name no version (`activate`). From those facts it answers which slot a new request
uses, which slot a newly loaded version may overwrite (never the default one, never one with
in-flight requests) and whether a version may be unloaded (same rule). It is the single
authority on slot occupancy: the worker only copies where it is told.

It holds no serving policy: which version should be active, the activation history
(rollback), how many versions stay resident and which to evict, and the link to the
registry folder belong to `smolora.server.versions.VersionManager`, which drives the engine
through `EngineClient` and keeps no copy of these facts.

It does no I/O and knows nothing about vLLM; it is not thread-safe (use it from the event
loop thread only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolora.server.engine.protocol import (
    NoFreeSlotError,
    VersionInfo,
    VersionInUseError,
    VersionNotResidentError,
    VuRouting,
)


@dataclass
class _Slot:
    version: int | None = None
    path: Path | None = None
    tasks: tuple[str, ...] = ()
    instruction_types: tuple[dict[str, Any], ...] = ()
    in_flight: int = 0
    loading: bool = False
    loaded_seq: int = 0
    loaded_at: float = 0.0
    load_seconds: float = 0.0
    vu_routing: VuRouting = "pinned"


def resolve_vu_routing(
    requested: VuRouting | None, server_default: VuRouting | None, version_default: VuRouting
) -> VuRouting:
    """The VU routing a request runs with: its own choice, else the server's
    (`EngineConfig.vu_routing`), else its version's (the checkpoint's
    `adapter_config.vu_routing`: "pinned" for versions this project trains, "per_step" for
    imported reference checkpoints)."""
    return requested or server_default or version_default


class VersionTable:
    """Slots -> resident versions, the active version, and per-slot in-flight counts.

    Args:
        num_slots: resident versions the engine holds.
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        self._slots = [_Slot() for _ in range(num_slots)]
        self._displaced: dict[int, _Slot] = {}  # slot -> the version a pending load evicted
        self._active: int | None = None  # slot index
        self._seq = 0

    # -- queries --------------------------------------------------------------------------
    def slot_of(self, version: int) -> int | None:
        """The slot holding `version`, or None."""
        for i, s in enumerate(self._slots):
            if s.version == version and not s.loading:
                return i
        return None

    @property
    def active_version(self) -> int | None:
        return None if self._active is None else self._slots[self._active].version

    def info(self, slot: int) -> VersionInfo:
        s = self._slots[slot]
        if s.version is None or s.path is None:
            raise VersionNotResidentError(f"slot {slot} holds no version")
        return VersionInfo(
            version=s.version,
            path=s.path,
            tasks=list(s.tasks),
            slot=slot,
            active=slot == self._active,
            in_flight=s.in_flight,
            instruction_types=list(s.instruction_types),
            loaded_at=s.loaded_at,
            load_seconds=s.load_seconds,
        )

    def resident(self) -> list[VersionInfo]:
        """Resident versions, by slot."""
        return [
            self.info(i)
            for i, s in enumerate(self._slots)
            if s.version is not None and not s.loading
        ]

    def in_flight(self) -> int:
        return sum(s.in_flight for s in self._slots)

    # -- requests ---------------------------------------------------------------------------
    def acquire(self, version: int | None) -> tuple[int, int]:
        """Pin a slot for a new request: the named version's, or the active one.

        Returns:
            (slot, version).

        Raises:
            VersionNotResidentError: the version is not loaded, or none is active.
        """
        if version is None:
            if self._active is None:
                raise VersionNotResidentError("no checkpoint version is active; load one first")
            slot = self._active
        else:
            found = self.slot_of(version)
            if found is None:
                resident = [v.version for v in self.resident()]
                raise VersionNotResidentError(
                    f"version {version} is not loaded (resident: {resident}); load it first"
                )
            slot = found
        s = self._slots[slot]
        s.in_flight += 1
        assert s.version is not None
        return slot, s.version

    def release(self, slot: int) -> None:
        """A request on `slot` finished (or failed)."""
        s = self._slots[slot]
        if s.in_flight <= 0:
            raise RuntimeError(f"slot {slot} released more often than acquired")
        s.in_flight -= 1

    # -- loading ------------------------------------------------------------------------------
    def reserve_for_load(self) -> int:
        """Pick and reserve the slot a new version will be copied into.

        Prefers an empty slot, then the least recently loaded inactive slot with no
        in-flight requests. The slot's old version is evicted now.

        Raises:
            NoFreeSlotError: every slot is active, in flight or loading.
        """
        candidates = [
            (s.version is not None, s.loaded_seq, i)
            for i, s in enumerate(self._slots)
            if i != self._active and s.in_flight == 0 and not s.loading
        ]
        if not candidates:
            busy = {i: (s.version, s.in_flight) for i, s in enumerate(self._slots)}
            raise NoFreeSlotError(
                f"all {len(self._slots)} version slots are active or serving requests "
                f"(slot: (version, in_flight) = {busy}); retry when in-flight requests finish"
            )
        _, _, slot = min(candidates)
        self._displaced[slot] = self._slots[slot]
        self._slots[slot] = _Slot(loading=True)
        return slot

    def install(
        self,
        slot: int,
        version: int,
        path: Path,
        tasks: list[str],
        instruction_types: list[dict[str, Any]],
        load_seconds: float = 0.0,
        vu_routing: VuRouting = "pinned",
    ) -> None:
        """The reserved slot now holds `version` (resident from now; loading took `load_seconds`),
        served with `vu_routing` unless a request or the server chooses (`resolve_vu_routing`)."""
        self._seq += 1
        self._displaced.pop(slot, None)
        self._slots[slot] = _Slot(
            version,
            Path(path),
            tuple(tasks),
            tuple(instruction_types),
            0,
            False,
            self._seq,
            time.time(),
            load_seconds,
            vu_routing,
        )

    def vu_routing(self, slot: int) -> VuRouting:
        """The default VU routing of the version in `slot` (from its checkpoint)."""
        return self._slots[slot].vu_routing

    def abandon(self, slot: int, copied: bool = True) -> None:
        """A load into `slot` failed.

        Args:
            slot: the reserved slot.
            copied: False when the worker refused the checkpoint before copying anything:
                the version the reservation evicted is resident again. True (the default,
                e.g. the RPC itself failed): the slot may hold part of a copy and is empty.
        """
        previous = self._displaced.pop(slot, None)
        self._slots[slot] = previous if previous is not None and not copied else _Slot()

    def activate(self, version: int) -> int:
        """Make `version` the default for new requests; returns its slot."""
        slot = self.slot_of(version)
        if slot is None:
            raise VersionNotResidentError(
                f"version {version} is not loaded; load it before activating it"
            )
        self._active = slot
        return slot

    def unload(self, version: int) -> int:
        """Free the slot of `version`; new requests can no longer get it. Returns the slot.

        Raises:
            VersionNotResidentError: the version is not resident.
            VersionInUseError: it is the active version, or in-flight requests are pinned to it.
        """
        slot = self.slot_of(version)
        if slot is None:
            resident = [v.version for v in self.resident()]
            raise VersionNotResidentError(f"version {version} is not loaded (resident: {resident})")
        if slot == self._active:
            raise VersionInUseError(
                f"version {version} is the active version; activate another version before "
                "unloading it"
            )
        s = self._slots[slot]
        if s.in_flight:
            raise VersionInUseError(
                f"version {version} is serving {s.in_flight} in-flight request(s); "
                "retry once they finish"
            )
        self._slots[slot] = _Slot()
        return slot
