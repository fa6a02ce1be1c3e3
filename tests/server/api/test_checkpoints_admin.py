"""Checkpoint admin endpoints, the registry watcher, /ready and /health (engine held by
`ScriptedEngine`)."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from smolora.server.api.errors import ConflictError
from smolora.server.metrics import Metrics
from smolora.server.registry_watch import RegistryWatcher
from smolora.server.versions import VersionManager
from tests.server.api.conftest import running_app
from tests.server.api.helpers import (
    HashingEmbedder,
    instruction_types,
    publish_version,
    user_message,
    wait_until,
)
from tests.server.api.scripted_engine import ScriptedEngine

ADMIN = {"Authorization": "Bearer adm"}


def _registry(tmp_path: Path, n: int) -> Path:
    emb = HashingEmbedder()
    for i in range(n):
        publish_version(tmp_path / "reg", f"task{i + 1}", instruction_types(emb))
    return tmp_path / "reg"


def test_admin_needs_the_admin_key_and_is_off_without_one(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    reg = _registry(tmp_path, 1)
    with running_app(tiny_model_dir, reg, admin_api_key="adm", api_keys=("inf",)) as (client, _, _):
        assert client.get("/admin/checkpoints").status_code == 401
        assert (
            client.get("/admin/checkpoints", headers={"Authorization": "Bearer inf"}).status_code
            == 401
        )
        assert client.get("/admin/checkpoints", headers=ADMIN).status_code == 200
    with running_app(tiny_model_dir, reg) as (client, _, _):
        r = client.get("/admin/checkpoints", headers=ADMIN)
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"


def test_load_activate_rollback_unload(tiny_model_dir: Path, tmp_path: Path) -> None:
    reg = _registry(tmp_path, 3)
    with running_app(
        tiny_model_dir, reg, admin_api_key="adm", max_resident_versions=2, initial_version=1
    ) as (client, engine, _):
        listing = client.get("/admin/checkpoints", headers=ADMIN).json()
        assert listing["active"] == 1 and listing["latest"] == 3
        assert [(v["version"], v["resident"]) for v in listing["versions"]] == [
            (1, True),
            (2, False),
            (3, False),
        ]
        r = client.post("/admin/checkpoints/load", headers=ADMIN, json={"version": 2})
        assert (
            r.status_code == 200 and r.json()["loaded"]["version"] == 2 and r.json()["active"] == 1
        )
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [
            "tiny-llava",
            "tiny-llava@1",
            "tiny-llava@2",
        ]
        r = client.post("/admin/checkpoints/activate", headers=ADMIN, json={"version": 2})
        assert r.json()["active"] == 2
        chat = client.post(
            "/v1/chat/completions",
            json={"model": "tiny-llava", "messages": [user_message()], "max_tokens": 1},
        )
        assert chat.json()["smolora"]["version"] == 2
        # Activating v3 (not resident) loads it; only 2 may be resident, so the oldest inactive
        # (v1) goes.
        r = client.post("/admin/checkpoints/activate", headers=ADMIN, json={"version": 3})
        assert r.json()["active"] == 3
        assert [v.version for v in engine.list_versions()] == [2, 3]
        r = client.post("/admin/checkpoints/rollback", headers=ADMIN)
        assert r.status_code == 200 and r.json()["active"] == 2
        r = client.post("/admin/checkpoints/rollback", headers=ADMIN)
        assert r.json()["active"] == 1  # v1 is published, so it is loaded again
        r = client.post("/admin/checkpoints/rollback", headers=ADMIN)
        assert r.status_code == 409 and r.json()["error"]["code"] == "no_previous_version"
        r = client.post("/admin/checkpoints/unload", headers=ADMIN, json={"version": 1})
        assert r.status_code == 409 and r.json()["error"]["code"] == "version_active"
        r = client.delete("/admin/checkpoints/2", headers=ADMIN)
        assert r.status_code == 200 and [v.version for v in engine.list_versions()] == [1]
        r = client.post("/admin/checkpoints/load", headers=ADMIN, json={"version": 9})
        assert r.status_code == 404 and r.json()["error"]["code"] == "version_not_found"
        r = client.post("/admin/checkpoints/load", headers=ADMIN, json={"version": "two"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "version"


def test_corrupt_published_version_is_refused_with_422(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    reg = _registry(tmp_path, 2)
    bad = next(reg.glob("v0002-*"))
    (bad / "adapter.safetensors").write_bytes(b"tampered")
    with running_app(tiny_model_dir, reg, admin_api_key="adm", initial_version=1) as (client, _, _):
        r = client.post("/admin/checkpoints/load", headers=ADMIN, json={"version": 2})
        assert r.status_code == 422 and r.json()["error"]["code"] == "checkpoint_rejected"
        assert "sha256" in r.json()["error"]["message"]
        metrics = client.get("/metrics").text
        assert 'smolora_checkpoint_loads_total{result="error"} 1.0' in metrics


def test_not_ready_until_a_version_is_published_then_the_watcher_activates_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    reg = tmp_path / "empty-registry"
    with running_app(
        tiny_model_dir, reg, ready=False, watch_registry=True, watch_interval_s=0.05
    ) as (client, _, _):
        wait_until(lambda: client.app.state.smolora.started, what="start-up")
        assert client.get("/health").status_code == 200
        r = client.get("/ready")
        assert r.status_code == 503 and "no checkpoint version is active" in r.json()["reason"]
        chat = client.post(
            "/v1/chat/completions", json={"model": "tiny-llava", "messages": [user_message()]}
        )
        assert chat.status_code == 503 and chat.headers["Retry-After"] == "1"
        publish_version(reg, "first", instruction_types(HashingEmbedder()))
        wait_until(
            lambda: client.get("/ready").status_code == 200, what="the watcher to pick up v1"
        )
        publish_version(reg, "second", instruction_types(HashingEmbedder()))
        wait_until(
            lambda: client.get("/ready").json().get("active_version") == 2,
            what="v2 to become active",
        )
        assert "smolora_checkpoint_active_version 2.0" in client.get("/metrics").text


def test_health_reports_a_dead_engine_and_a_failed_start(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    reg = _registry(tmp_path, 1)
    with running_app(tiny_model_dir, reg) as (client, engine, _):
        engine.dead = True
        assert client.get("/health").status_code == 503
        assert client.get("/ready").status_code == 503
    with running_app(tmp_path / "no-model-here", reg, ready=False) as (client, _, _):
        wait_until(lambda: client.app.state.smolora.started, what="start-up to fail")
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        chat = client.post(
            "/v1/chat/completions", json={"model": "tiny-llava", "messages": [user_message()]}
        )
        assert chat.status_code == 503 and chat.json()["error"]["code"] == "not_ready"


def test_the_engine_monitor_reports_a_dead_engine_once(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The monitor sees the engine die within its interval: the server is not ready for good
    (with the reason), chat answers 503, and the failure handler (the CLI's: drain, exit 3)
    is called once."""
    reg = _registry(tmp_path, 1)
    failures: list[str] = []
    with running_app(
        tiny_model_dir, reg, on_engine_failure=failures.append, engine_check_interval_s=0.05
    ) as (client, engine, _):
        assert client.get("/health").status_code == 200 and not failures
        engine.dead = True
        wait_until(lambda: bool(failures), what="the monitor to see the dead engine")
        engine.dead = False  # a failed engine stays failed: vLLM's core does not come back
        r = client.get("/ready")
        assert r.status_code == 503 and "the engine failed" in r.json()["reason"]
        assert client.get("/health").status_code == 503
        chat = client.post(
            "/v1/chat/completions", json={"model": "tiny-llava", "messages": [user_message()]}
        )
        assert chat.status_code == 503
        time.sleep(0.3)
        assert failures == ["scripted engine marked dead"]


def test_watcher_skips_a_bad_version_once_and_keeps_going(tmp_path: Path) -> None:
    reg = _registry(tmp_path, 1)

    async def go() -> None:
        engine = ScriptedEngine()
        manager = VersionManager(engine, reg, Metrics(), max_resident=4)
        await manager.load_initial(None)
        watcher = RegistryWatcher(manager, interval_s=1.0, activate=False)
        await watcher.prime()
        assert await watcher.poll_once() == []
        emb = HashingEmbedder()
        bad = publish_version(reg, "bad", instruction_types(emb))
        (bad.path / "adapter.safetensors").write_bytes(b"x")
        publish_version(reg, "good", instruction_types(emb))
        assert await watcher.poll_once() == [3]
        assert watcher.failed == {2} and manager.active() == 1  # activate=False keeps v1 active
        assert await watcher.poll_once() == []
        shutil.rmtree(reg)
        assert await watcher.poll_once() == []  # a vanished folder is not an error

    asyncio.run(go())


class FakeClock:
    """Monotonic seconds the test advances by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_watcher_retries_a_version_once_its_folder_is_complete(tmp_path: Path) -> None:
    """A version copied into the registry without the atomic rename is listed (its manifest
    is there) before its tensors are complete: the first load fails, and the watcher loads
    it as soon as its files change, without waiting for the backoff."""
    reg = _registry(tmp_path, 1)

    async def go() -> None:
        manager = VersionManager(ScriptedEngine(), reg, Metrics(), max_resident=4)
        await manager.load_initial(None)
        clock = FakeClock()
        watcher = RegistryWatcher(manager, interval_s=1.0, activate=True, clock=clock)
        await watcher.prime()
        v2 = publish_version(reg, "copied", instruction_types(HashingEmbedder()))
        tensors = v2.path / "adapter.safetensors"
        full = tensors.read_bytes()
        tensors.write_bytes(full[: len(full) // 2])  # the copy is half way
        assert await watcher.poll_once() == [] and watcher.failed == {2}
        assert await watcher.poll_once() == []  # unchanged and not due: not tried again
        assert watcher.failures[2].attempts == 1
        tensors.write_bytes(full)  # the copy finished
        assert await watcher.poll_once() == [2]
        assert manager.active() == 2 and watcher.failed == set()

    asyncio.run(go())


def test_watcher_backs_off_then_stops_retrying_once_a_newer_version_loads(
    tmp_path: Path,
) -> None:
    """An unchanged failed version is retried after a backoff that doubles; once a newer
    version has loaded it is never retried (loading it would roll the server back)."""
    reg = _registry(tmp_path, 1)

    async def go() -> None:
        manager = VersionManager(ScriptedEngine(), reg, Metrics(), max_resident=4)
        await manager.load_initial(None)
        clock = FakeClock()
        watcher = RegistryWatcher(
            manager, interval_s=1.0, activate=True, max_backoff_s=3.0, clock=clock
        )
        await watcher.prime()
        emb = HashingEmbedder()
        bad = publish_version(reg, "bad", instruction_types(emb))
        tensors = bad.path / "adapter.safetensors"
        good_bytes = tensors.read_bytes()
        tensors.write_bytes(b"x")
        attempts = []
        for step in (0.0, 0.5, 0.5, 1.0, 1.0, 3.0, 3.0):  # due at +1, then +2, then +3 (cap)
            clock.now += step
            await watcher.poll_once()
            attempts.append(watcher.failures[2].attempts)
        assert attempts == [1, 1, 2, 2, 3, 4, 5]
        publish_version(reg, "good", instruction_types(emb))
        assert await watcher.poll_once() == [3] and manager.active() == 3
        assert watcher.failures[2].superseded
        tensors.write_bytes(good_bytes)  # repaired, but version 3 is newer
        clock.now += 10.0
        assert await watcher.poll_once() == [] and manager.active() == 3
        assert manager.get(2) is None

    asyncio.run(go())


def test_rollback_works_when_the_engine_started_with_a_version_active(tmp_path: Path) -> None:
    reg = _registry(tmp_path, 2)

    async def go() -> None:
        engine = ScriptedEngine()
        await engine.load_version(next(reg.glob("v0001-*")), activate=False)
        await engine.activate(1)  # like the vLLM engine, which starts on its first checkpoint
        manager = VersionManager(engine, reg, Metrics(), max_resident=2)
        await manager.load_initial(1)
        await manager.activate(2)
        assert (await manager.rollback()).version == 1 and manager.history == [1]

    asyncio.run(go())


def test_watcher_retries_a_version_refused_for_lack_of_a_free_slot(tmp_path: Path) -> None:
    from smolora.server.engine.protocol import NoFreeSlotError as EngineBusyError

    reg = _registry(tmp_path, 1)

    class BusyOnce(ScriptedEngine):
        busy = True

        async def load_version(self, path: Path, activate: bool = True):  # type: ignore[override]
            if self.busy and "v0002" in str(path):
                self.busy = False
                raise EngineBusyError("all slots busy")
            return await super().load_version(path, activate)

    async def go() -> None:
        manager = VersionManager(BusyOnce(), reg, Metrics(), max_resident=4)
        await manager.load_initial(None)
        watcher = RegistryWatcher(manager, interval_s=1.0, activate=True)
        await watcher.prime()
        publish_version(reg, "later", instruction_types(HashingEmbedder()))
        assert await watcher.poll_once() == [] and not watcher.failed
        assert await watcher.poll_once() == [2] and manager.active() == 2

    asyncio.run(go())


def test_unload_refuses_a_version_pinned_by_in_flight_requests_then_frees_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import threading

    reg = _registry(tmp_path, 2)
    with running_app(tiny_model_dir, reg, admin_api_key="adm", initial_version=2) as (
        client,
        engine,
        _,
    ):
        assert (
            client.post("/admin/checkpoints/load", headers=ADMIN, json={"version": 1}).status_code
            == 200
        )
        engine.hold()
        body = {"model": "tiny-llava@1", "messages": [user_message()], "max_tokens": 2}
        results: list[int] = []
        t = threading.Thread(
            target=lambda: results.append(
                client.post("/v1/chat/completions", json=body).status_code
            )
        )
        t.start()
        wait_until(lambda: engine.pinned.get(1) == 1, what="a request pinned to version 1")
        r = client.post("/admin/checkpoints/unload", headers=ADMIN, json={"version": 1})
        assert r.status_code == 409 and r.json()["error"]["code"] == "version_busy"
        engine.release()
        t.join(timeout=30)
        assert results == [200]
        r = client.post("/admin/checkpoints/unload", headers=ADMIN, json={"version": 1})
        assert r.status_code == 200 and r.json() == {"unloaded": 1, "active": 2}
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [
            "tiny-llava",
            "tiny-llava@2",
        ]
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = client.post("/admin/checkpoints/unload", headers=ADMIN, json={"version": 1})
        assert r.status_code == 404 and r.json()["error"]["code"] == "version_not_found"


def test_byte_budget_evicts_the_least_recently_used_inactive_version(tmp_path: Path) -> None:
    """`max_resident_bytes` counts each version's tensor bytes (from its safetensors header)
    and unloads the least recently used inactive version, not the oldest loaded one; a
    version larger than the whole budget is refused with a 409."""
    import pytest
    from safetensors.torch import load_file

    from smolora.server.api.errors import ConflictError
    from smolora.server.versions import checkpoint_tensor_bytes

    reg = _registry(tmp_path, 4)
    first = next(reg.glob("v0001-*"))
    tensors = load_file(str(first / "adapter.safetensors"))
    one = sum(t.numel() * t.element_size() for t in tensors.values())
    assert checkpoint_tensor_bytes(first) == one > 0

    async def go() -> None:
        engine = ScriptedEngine()
        manager = VersionManager(engine, reg, Metrics(), max_resident=8, max_resident_bytes=3 * one)
        await manager.load_initial(1)
        await manager.load(2)
        await manager.load(3)
        await manager.activate(2)
        await manager.activate(1)  # used: v3 (loaded) < v2 (activated) < v1 (active)
        await manager.load(4)
        assert [v.version for v in manager.resident()] == [1, 2, 4]
        small = VersionManager(
            ScriptedEngine(), reg, Metrics(), max_resident=8, max_resident_bytes=one - 1
        )
        with pytest.raises(ConflictError, match="max-resident-bytes"):
            await small.load(1)

    asyncio.run(go())


def test_one_resident_version_swaps_through_the_staging_slot(tmp_path: Path) -> None:
    """With max_resident=1 a new version still goes live: it loads into the staging slot,
    is activated, and the old version is unloaded -- at once, or, while requests are still
    pinned to it, by the first trim after they end. A load that would not be activated
    gets no staging slot (409)."""
    reg = _registry(tmp_path, 1)

    async def go() -> None:
        engine = ScriptedEngine()
        manager = VersionManager(engine, reg, Metrics(), max_resident=1)
        await manager.load_initial(None)
        watcher = RegistryWatcher(manager, interval_s=1.0, activate=True)
        await watcher.prime()
        publish_version(reg, "second", instruction_types(HashingEmbedder()))
        assert await watcher.poll_once() == [2]
        assert [v.version for v in manager.resident()] == [2] and manager.active() == 2

        engine.pinned[2] = 1  # a request still running on version 2
        publish_version(reg, "third", instruction_types(HashingEmbedder()))
        assert await watcher.poll_once() == [3]
        assert manager.active() == 3 and [v.version for v in manager.resident()] == [2, 3]
        assert await manager.trim() == []  # still busy: left for the next trim
        engine.pinned[2] = 0
        assert await watcher.poll_once() == []  # each poll trims first
        assert [v.version for v in manager.resident()] == [3]

        publish_version(reg, "fourth", instruction_types(HashingEmbedder()))
        try:
            await manager.load(4)  # not activated: no staging slot for it
        except ConflictError as e:
            assert e.code == "no_free_slot" and "activate the new version directly" in e.message
        else:
            raise AssertionError("a plain load took the staging slot")
        engine.pinned[3] = 1
        await manager.activate(4)  # the admin's activation swaps, the busy one stays a while
        engine.pinned[3] = 0
        assert await manager.trim() == [3] and manager.active() == 4

    asyncio.run(go())


def test_a_held_canary_is_not_trimmed(tmp_path: Path) -> None:
    reg = _registry(tmp_path, 1)

    async def go() -> None:
        manager = VersionManager(ScriptedEngine(), reg, Metrics(), max_resident=1)
        await manager.load_initial(None)
        publish_version(reg, "canary", instruction_types(HashingEmbedder()))
        await manager.load(2, hold=True)  # a promotion canary: held, in the staging slot
        assert await manager.trim() == [] and {v.version for v in manager.resident()} == {1, 2}
        manager.release(2)
        assert await manager.trim() == [2] and manager.active() == 1

    asyncio.run(go())
