"""A restarted server serves the version it served before (`server/serving_state.py`): an
admin's return to an older version survives a restart, a version the promotion policy
refused is not activated or offered again, and a version published while the server was
down is picked up (engine held by `ScriptedEngine`; real registry folders; the app
restarted on the same state file)."""

from __future__ import annotations

import json
from pathlib import Path

from smolora.server.promotion_policy import PromotionPolicy
from smolora.server.serving_state import ServingStateStore, default_state_file
from tests.server.api.conftest import running_app
from tests.server.api.helpers import HashingEmbedder, instruction_types, publish_version, wait_until

ADMIN = {"Authorization": "Bearer adm"}


def _publish(reg: Path, task: str, scores: dict[str, float] | None = None) -> int:
    return publish_version(reg, task, instruction_types(HashingEmbedder()), scores=scores).version


def _active(client) -> int | None:  # type: ignore[no-untyped-def]
    return client.get("/v1/models").json()["data"][0]["smolora"]["active_version"]


def test_the_store_survives_bad_files_and_unwritable_places(tmp_path: Path) -> None:
    path = tmp_path / "state" / "m.json"
    store = ServingStateStore(path)
    assert (store.state.active, store.state.newest_seen) == (None, 0)
    store.update(active=3, newest_seen=5)
    store.update(newest_seen=4)  # the watcher never goes back
    assert json.loads(path.read_text()) == {"active": 3, "newest_seen": 5}
    assert ServingStateStore(path).state.active == 3
    path.write_text('{"active": "three"}')
    assert ServingStateStore(path).state.active is None  # unreadable: no state, no crash
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    stuck = ServingStateStore(blocked / "m.json")  # its folder cannot be created
    stuck.update(active=2)  # logged, not raised
    assert stuck.state.active == 2 and not (blocked / "m.json").exists()
    assert default_state_file(tmp_path, "m") == tmp_path / ".serving" / "m.json"


def test_going_back_survives_a_restart_and_versions_published_meanwhile_are_picked_up(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    reg = tmp_path / "reg"
    _publish(reg, "one")
    _publish(reg, "two")
    app = {"keep_state": True, "watch_registry": True, "watch_interval_s": 0.05}
    with running_app(tiny_model_dir, reg, admin_api_key="adm", **app) as (client, _, _):
        assert _active(client) == 2
        r = client.post("/admin/checkpoints/activate", headers=ADMIN, json={"version": 1})
        assert r.status_code == 200 and r.json()["active"] == 1  # back to v1: v2 misbehaves
    with running_app(tiny_model_dir, reg, **app) as (client, _, _):
        assert _active(client) == 1  # not the latest (2): the version served before
    _publish(reg, "three")  # published while the server is down
    with running_app(tiny_model_dir, reg, **app) as (client, _, _):
        wait_until(lambda: _active(client) == 3, what="version 3 picked up after the restart")
    assert json.loads(default_state_file(reg, "tiny-llava").read_text()) == {
        "active": 3,
        "newest_seen": 3,
    }
    with running_app(tiny_model_dir, reg, **{**app, "keep_state": False}) as (client, _, _):
        assert _active(client) == 3  # without state: the latest, as on a first start


def test_a_version_refused_by_the_promotion_policy_stays_refused_after_a_restart(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    reg = tmp_path / "reg"
    _publish(reg, "vqa", {"vqa": 60.0})
    app = {
        "keep_state": True,
        "watch_registry": True,
        "watch_interval_s": 0.05,
        "promotion": PromotionPolicy(max_task_drop=5.0),
    }
    with running_app(tiny_model_dir, reg, **app) as (client, _, _):
        promoter = client.app.state.smolora.promoter  # type: ignore[attr-defined]
        _publish(reg, "forgetful", {"vqa": 40.0})
        wait_until(lambda: promoter.latest(2) is not None, what="the decision about version 2")
        assert promoter.latest(2)["decision"] == "rejected"
    with running_app(tiny_model_dir, reg, **app) as (client, _, _):
        promoter = client.app.state.smolora.promoter  # type: ignore[attr-defined]
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert _active(client) == 1 and ids == ["tiny-llava", "tiny-llava@1"]
        _publish(reg, "better", {"vqa": 61.0})
        wait_until(lambda: _active(client) == 3, what="the next good version")
        assert promoter.latest(2) is None  # never offered again
