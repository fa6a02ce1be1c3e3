"""Publishing faults, injected into real publisher processes: a trainer killed mid-publish
(SIGKILL at the worst moments), a publish that runs out of file space (the kernel's
RLIMIT_FSIZE makes its writes fail as a full disk does), and publishers racing. The
registry never lists a partial version, `latest` never points at one, nothing is left
behind, and the next publish works; a registry watcher next to it loads nothing and keeps
serving the active version."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

from smolora.adapters import checkpoint as ck
from smolora.server.metrics import Metrics
from smolora.server.registry_watch import RegistryWatcher
from smolora.server.versions import VersionManager
from tests.server.api.helpers import HashingEmbedder, instruction_types, publish_version
from tests.server.api.scripted_engine import ScriptedEngine

# A publisher: publishes `count` versions of a tensor of `floats` float32 values; `fault`
# runs first (it patches the moment to die at).
PUBLISHER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from smolora.adapters import checkpoint as ck

    registry, floats, count, fault = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if fault == "before-rename":  # every file written and fsynced, not yet renamed into place
        ck.os.rename = die
    elif fault == "mid-write":  # the tensors on disk, the manifest not yet written
        ck._fsync_file = die
    elif fault == "before-latest":  # the version renamed into place, `latest` not yet moved
        ck.os.symlink = die
    elif fault == "file-size":  # writes past 64 KiB fail with EFBIG, as a full disk's do
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    for i in range(count):
        manifest = ck.CheckpointManifest(
            adapter_kind="smolora",
            adapter_config={"num_experts": 8, "rank": 8},
            base_model={"fingerprint": "f" * 64, "name": "tiny"},
            layers=["layers.0.mlp.up_proj"],
            tasks=[f"p{os.getpid()}-{i}"],
        )
        tensors = {"layers.0.mlp.up_proj.A": torch.full((floats,), float(i))}
        ck.publish_checkpoint(registry, tensors, manifest)
    """
)


def _publisher(registry: Path, floats: int, count: int, fault: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(registry), str(floats), str(count), fault],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _hidden(registry: Path) -> list[str]:
    return sorted(p.name for p in registry.iterdir() if p.name.startswith((".tmp-", ".latest-")))


def test_a_publisher_killed_mid_publish_leaves_no_version_and_the_next_publish_works(
    tmp_path: Path,
) -> None:
    reg = tmp_path / "reg"
    publish_version(reg, "first", instruction_types(HashingEmbedder()))

    async def go() -> None:
        manager = VersionManager(ScriptedEngine(), reg, Metrics(), max_resident=2)
        await manager.load_initial(None)
        watcher = RegistryWatcher(manager, interval_s=1.0, activate=True)
        await watcher.prime()
        for fault in ("mid-write", "before-rename"):
            proc = _publisher(reg, 200_000, 1, fault)
            assert proc.wait(timeout=120) == -9, proc.stderr.read()  # type: ignore[union-attr]
            assert [e.version for e in ck.list_versions(reg)] == [1]  # nothing half-published
            assert ck.latest_version(reg).version == 1  # type: ignore[union-attr]
            assert _hidden(reg)  # the dead publisher's temporary folder, unlisted
            assert await watcher.poll_once() == [] and not watcher.failed
            assert manager.active() == 1
        # killed after the rename: the version is complete, only `latest` lags
        proc = _publisher(reg, 1000, 1, "before-latest")
        assert proc.wait(timeout=120) == -9
        assert [e.version for e in ck.list_versions(reg)] == [1, 2]
        ck.verify_checkpoint(ck.list_versions(reg)[-1].path)
        assert await watcher.poll_once() == [2] and manager.active() == 2
        # the next publish takes the lock the dead ones held, clears their leftovers, goes on
        nxt = publish_version(reg, "after", instruction_types(HashingEmbedder()))
        assert nxt.version == 3 and ck.latest_version(reg) == nxt and _hidden(reg) == []
        assert await watcher.poll_once() == [3] and manager.active() == 3

    asyncio.run(go())


def test_a_publish_out_of_file_space_fails_cleanly(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    first = publish_version(reg, "first", instruction_types(HashingEmbedder()))
    proc = _publisher(reg, 100_000, 1, "file-size")  # 400 KB of tensors past a 64 KiB limit
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "File too large" in err, err
    assert ck.list_versions(reg) == [first] and ck.latest_version(reg) == first
    assert _hidden(reg) == []  # the failed publish removed its own temporary folder


def test_racing_publishers_get_distinct_complete_versions(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    procs = [_publisher(reg, 20_000, 4, "none") for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    entries = ck.list_versions(reg)
    assert [e.version for e in entries] == list(range(1, 13))
    for e in entries:
        ck.verify_checkpoint(e.path)
        assert ck.read_manifest(e.path).version == e.version
    assert ck.latest_version(reg).version == 12  # type: ignore[union-attr]
    assert _hidden(reg) == []
