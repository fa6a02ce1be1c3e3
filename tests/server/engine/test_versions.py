"""Version-slot bookkeeping: requests pin the slot they started on; loads never overwrite the
active slot or a slot with in-flight requests."""

from __future__ import annotations

from pathlib import Path

import pytest

from smolora.server.engine.protocol import NoFreeSlotError, VersionNotResidentError
from smolora.server.engine.versions import VersionTable


def _load(table: VersionTable, version: int, activate: bool = True) -> int:
    slot = table.reserve_for_load()
    table.install(slot, version, Path(f"/ckpt/v{version}"), [f"task{version}"], [])
    if activate:
        table.activate(version)
    return slot


def test_requests_keep_their_version_across_activation() -> None:
    table = VersionTable(2)
    s1 = _load(table, 1)
    slot, version = table.acquire(None)
    assert (slot, version) == (s1, 1)
    s2 = _load(table, 2)
    assert s2 != s1 and table.active_version == 2
    assert table.acquire(None) == (s2, 2)
    assert table.info(s1).in_flight == 1  # the first request still pins version 1
    with pytest.raises(NoFreeSlotError):  # v1 in flight, v2 active: nowhere to load v3
        table.reserve_for_load()
    table.release(s1)
    s3 = _load(table, 3, activate=False)
    assert s3 == s1 and table.slot_of(1) is None and table.active_version == 2
    with pytest.raises(VersionNotResidentError):
        table.acquire(1)


def test_failed_load_leaves_the_slot_empty_and_the_active_version_serving() -> None:
    table = VersionTable(2)
    _load(table, 1)
    slot = table.reserve_for_load()
    table.abandon(slot)
    assert [v.version for v in table.resident()] == [1]
    assert table.acquire(None)[1] == 1


def test_refused_load_keeps_the_evicted_version_resident() -> None:
    """A checkpoint the worker refuses before copying leaves the reserved slot as it was: the
    inactive version the reservation evicted is servable again, with its in-flight count."""
    table = VersionTable(2)
    s1 = _load(table, 1)
    s2 = _load(table, 2)
    table.activate(2)
    slot = table.reserve_for_load()
    assert slot == s1 and table.slot_of(1) is None  # not servable while the load runs
    table.abandon(slot, copied=False)
    assert table.slot_of(1) == s1 and table.info(s1).path == Path("/ckpt/v1")
    assert table.acquire(1) == (s1, 1) and table.active_version == 2 and s2 != s1
    table.release(s1)
    # A failure after copying began (the default) empties the slot instead.
    slot = table.reserve_for_load()
    table.abandon(slot)
    assert table.slot_of(1) is None and [v.version for v in table.resident()] == [2]


def test_nothing_active_is_an_error() -> None:
    with pytest.raises(VersionNotResidentError):
        VersionTable(1).acquire(None)


def test_unload_frees_the_slot_unless_active_or_pinned() -> None:
    from smolora.server.engine.protocol import VersionInUseError

    table = VersionTable(2)
    s1 = _load(table, 1)
    s2 = _load(table, 2, activate=False)
    with pytest.raises(VersionInUseError, match="active"):
        table.unload(1)
    slot, _ = table.acquire(2)
    with pytest.raises(VersionInUseError, match="in-flight"):
        table.unload(2)
    table.release(slot)
    assert table.unload(2) == s2
    assert [v.version for v in table.resident()] == [1] and table.active_version == 1
    with pytest.raises(VersionNotResidentError):
        table.acquire(2)
    with pytest.raises(VersionNotResidentError):
        table.unload(2)
    assert table.reserve_for_load() == s2 != s1  # the freed slot is the one a load takes
