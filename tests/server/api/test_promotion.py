"""The promotion policy: evaluation floors, the canary's split, promotion and automatic
rollback, decisions in `/v1/models`, the admin listing and the metrics (engine held by
`ScriptedEngine`; the versions are real registry folders with manifest scores)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from smolora.server.api.access_log import AccessRecord
from smolora.server.metrics import Metrics
from smolora.server.promotion import Promoter, outcome
from smolora.server.promotion_policy import PromotionPolicy, eval_problems, eval_scores
from smolora.server.registry_watch import RegistryWatcher
from smolora.server.settings import ServerSettings
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


def _publish(reg: Path, task: str, scores: dict[str, float] | None) -> int:
    entry = publish_version(reg, task, instruction_types(HashingEmbedder()), scores=scores)
    return entry.version


def test_eval_floors() -> None:
    strict = PromotionPolicy(max_task_drop=5.0, min_task_score=20.0, require_eval=True)
    before = {"vqa": 60.0, "gqa": 40.0}
    assert eval_problems(strict, {"vqa": 56.0, "gqa": 41.0, "new": 30.0}, before) == []
    problems = eval_problems(strict, {"vqa": 50.0, "new": 10.0}, before)
    assert problems == [
        "new scores 10.00, under the floor 20.00",
        "gqa (scored by the active version) has no score",
        "vqa drops 10.00 points (60.00 -> 50.00), more than 5.00",
    ]
    assert eval_problems(strict, {}, before)[0].startswith("its manifest has no evaluation")
    lax = PromotionPolicy(max_task_drop=5.0)
    assert eval_problems(lax, {}, before) == []  # nothing scored, nothing required
    # the trainer's row format; entries without a numeric score are left out
    row = {"row": {"vqa": {"score": 61.5}, "bad": {"score": "x"}, "nan": {"score": float("nan")}}}
    assert eval_scores(row) == {"vqa": 61.5} and eval_scores({"accuracy": 0.5}) == {}


def test_policy_and_settings_validation(tmp_path: Path) -> None:
    for bad in (
        PromotionPolicy(canary_share=1.0),
        PromotionPolicy(canary_requests=0),
        PromotionPolicy(max_task_drop=-1.0),
        PromotionPolicy(canary_max_latency_ratio=0.0),
    ):
        assert bad.problems()
    assert not PromotionPolicy().gated and PromotionPolicy(canary_share=0.1).gated
    with pytest.raises(ValueError, match="promotion canary_share"):
        ServerSettings(tmp_path, tmp_path, promotion=PromotionPolicy(canary_share=2.0))
    with pytest.raises(ValueError, match="registry watched"):
        ServerSettings(
            tmp_path, tmp_path, watch_registry=False, promotion=PromotionPolicy(max_task_drop=1)
        )


def test_outcome_of_access_records() -> None:
    ok = AccessRecord("r", "POST", "/v1/chat/completions", status=200, completion_tokens=4)
    ok.e2e_s = 0.2
    assert outcome(ok) == (True, pytest.approx(0.05))
    failed_stream = AccessRecord("r", "POST", "/x", status=200, error="internal_error")
    assert outcome(failed_stream) == (False, None)
    assert outcome(AccessRecord("r", "POST", "/x", status=500)) == (False, None)
    assert outcome(AccessRecord("r", "POST", "/x", status=400)) is None  # the client's fault
    assert outcome(AccessRecord("r", "POST", "/x", status=429)) is None  # never ran


def test_watcher_rejects_a_version_below_the_floors_and_promotes_the_next(
    tmp_path: Path,
) -> None:
    reg = tmp_path / "reg"
    _publish(reg, "vqa", {"vqa": 60.0})

    async def go() -> None:
        metrics = Metrics()
        manager = VersionManager(ScriptedEngine(), reg, metrics, max_resident=4)
        await manager.load_initial(None)
        promoter = Promoter(PromotionPolicy(max_task_drop=5.0, require_eval=True), manager, metrics)
        watcher = RegistryWatcher(manager, 1.0, activate=True, promoter=promoter)
        await watcher.prime()
        _publish(reg, "gqa", {"vqa": 50.0, "gqa": 70.0})  # forgets vqa
        assert await watcher.poll_once() == [2]
        assert manager.active() == 1 and manager.get(2) is None  # refused and unloaded
        d = promoter.latest(2)
        assert d is not None and d["decision"] == "rejected" and "vqa drops 10.00" in d["reason"]
        _publish(reg, "noeval", None)  # no scores at all
        await watcher.poll_once()
        assert promoter.latest(3)["decision"] == "rejected" and manager.active() == 1  # type: ignore[index]
        _publish(reg, "gqa", {"vqa": 58.0, "gqa": 70.0})
        await watcher.poll_once()
        assert manager.active() == 4 and promoter.latest(4)["decision"] == "promoted"  # type: ignore[index]
        assert [d.decision for d in promoter.decisions] == ["rejected", "rejected", "promoted"]
        assert watcher.failed == set()  # a refusal is a decision, not a load failure
        text = metrics.render().decode()
        assert 'smolora_promotion_decisions_total{decision="rejected"} 2.0' in text
        assert 'smolora_promotion_decisions_total{decision="promoted"} 1.0' in text

    asyncio.run(go())


def _chat(client: TestClient) -> dict[str, Any]:
    r = client.post(
        "/v1/chat/completions",
        json={"model": "tiny-llava", "messages": [user_message("What is it?")], "max_tokens": 4},
    )
    return {"status": r.status_code, "model": r.json().get("model")}


def _canary_app(model_dir: Path, reg: Path, engine: ScriptedEngine, **policy: Any) -> Any:
    return running_app(
        model_dir,
        reg,
        engine=engine,
        admin_api_key="adm",
        watch_registry=True,
        watch_interval_s=0.05,
        promotion=PromotionPolicy(canary_share=0.5, canary_requests=12, **policy),
    )


def test_canary_serves_its_share_then_is_promoted(tiny_model_dir: Path, tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    _publish(reg, "vqa", {"vqa": 60.0})
    engine = ScriptedEngine()
    with _canary_app(tiny_model_dir, reg, engine, max_task_drop=5.0) as (client, _, _):
        state = client.app.state.smolora  # type: ignore[attr-defined]
        state.promoter.rng = random.Random(7)
        _publish(reg, "gqa", {"vqa": 59.0, "gqa": 55.0})
        wait_until(lambda: state.promoter.canary is not None, what="the canary to start")
        root = client.get("/v1/models").json()["data"][0]["smolora"]
        assert root["active_version"] == 1 and root["canary"] == {"version": 2, "share": 0.5}

        served = Counter()
        while state.promoter.canary is not None or state.promoter._concluding is not None:
            answer = _chat(client)
            assert answer["status"] == 200
            served[answer["model"]] += 1
            assert sum(served.values()) < 200, served
        # both versions answered requests naming none; the canary's share was counted
        assert served["tiny-llava@2"] >= 12 and served["tiny-llava@1"] >= 1, served
        assert _chat(client)["model"] == "tiny-llava@2"  # promoted: now the active version
        cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
        assert cards["tiny-llava"]["smolora"]["canary"] is None
        promo = cards["tiny-llava@2"]["smolora"]["promotion"]
        assert promo["decision"] == "promoted" and "12 requests, 0 errors" in promo["reason"]
        listing = client.get("/admin/checkpoints", headers=ADMIN).json()
        assert [d["decision"] for d in listing["promotion"]["decisions"]] == ["canary", "promoted"]
        assert listing["promotion"]["policy"]["canary_share"] == 0.5
        console = client.get("/console/api/versions").json()["promotion"]  # the console's view
        assert [d["decision"] for d in console["decisions"]] == ["canary", "promoted"]
        metrics = client.get("/metrics").text
        assert 'smolora_canary_requests_total{arm="canary",result="ok"} 12.0' in metrics
        assert "smolora_canary_version 0.0" in metrics
        # requests naming a version are never split
        r = client.post(
            "/v1/chat/completions",
            json={"model": "tiny-llava@1", "messages": [user_message("Hi")], "max_tokens": 2},
        )
        assert r.json()["model"] == "tiny-llava@1"


def test_canary_that_fails_is_rolled_back(tiny_model_dir: Path, tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    _publish(reg, "vqa", {"vqa": 60.0})
    engine = ScriptedEngine()
    engine.fail_versions = {2}
    with _canary_app(tiny_model_dir, reg, engine) as (client, _, _):
        state = client.app.state.smolora  # type: ignore[attr-defined]
        _publish(reg, "gqa", {"vqa": 60.0, "gqa": 50.0})
        wait_until(lambda: state.promoter.canary is not None, what="the canary to start")
        statuses = Counter()
        while state.promoter.canary is not None or state.promoter._concluding is not None:
            statuses[_chat(client)["status"]] += 1
            assert sum(statuses.values()) < 200, statuses
        assert statuses[500] == 12  # the canary's requests, and no more once it was rolled back
        assert all(_chat(client)["model"] == "tiny-llava@1" for _ in range(10))
        wait_until(lambda: state.versions.get(2) is None, what="the canary to be unloaded")
        decision = state.promoter.latest(2)
        assert decision["decision"] == "rolled_back" and "error rate 1.000" in decision["reason"]
        assert 'smolora_promotion_decisions_total{decision="rolled_back"} 1.0' in (
            client.get("/metrics").text
        )


def test_a_newer_version_supersedes_a_running_canary_and_an_admin_cancels_one(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    reg = tmp_path / "reg"
    _publish(reg, "vqa", {"vqa": 60.0})
    with _canary_app(tiny_model_dir, reg, ScriptedEngine()) as (client, _, _):
        promoter = client.app.state.smolora.promoter  # type: ignore[attr-defined]
        _publish(reg, "gqa", {"vqa": 60.0})
        wait_until(lambda: promoter.canary is not None, what="the first canary")
        _publish(reg, "ok", {"vqa": 61.0})
        wait_until(
            lambda: promoter.canary is not None and promoter.canary.version == 3,
            what="the newer canary",
        )
        assert promoter.latest(2)["decision"] == "superseded"
        # an admin's explicit activation is not gated, and ends the canary
        r = client.post("/admin/checkpoints/activate", json={"version": 3}, headers=ADMIN)
        assert r.status_code == 200
        assert _chat(client)["model"] == "tiny-llava@3"
        assert promoter.canary is None and promoter.latest(3)["decision"] == "cancelled"
