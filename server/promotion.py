"""Promotion policy: whether a version the trainer publishes goes live, and how.

Without a policy the registry watcher activates every version it loads. With one
(`PromotionPolicy.gated`), the watcher loads a new version without activating it and hands
it to `Promoter.offer`, which decides:

1. **Evaluation floors.** The manifest's evaluation row (`eval.row`: task -> `{"score": ...}`
   on the 0-100 scale the trainer writes) is compared with the active version's: a seen task
   may not drop more than `max_task_drop` points, no task may score under `min_task_score`,
   and with `require_eval` a version without scores (or missing a task the active version
   was scored on) is refused. A refused version is unloaded; the active one keeps serving.
2. **Canary** (`canary_share` > 0): a version past the floors first serves that share of the
   requests that name no version. Each such request's outcome (from its access record:
   error or not, end-to-end seconds per completion token) is counted for the canary and
   for the active version side by side. Once the canary has served `canary_requests`, it is
   promoted (activated) if its error rate is at most `canary_max_error_increase` above the
   active version's and its median seconds per token at most `canary_max_latency_ratio`
   times the active version's; otherwise it is rolled back: its share returns to the active
   version at once and it is unloaded.

Every decision is logged, counted in `smolora_promotion_decisions_total{decision}`, kept
(the last 64) for the admin listing, and the latest one per version is shown in
`/v1/models`. A newer version offered during a canary supersedes it; an admin who activates
or unloads a version by hand during a canary cancels it (an admin's explicit activation is
never gated). With nothing active yet, the first version is activated at once: there is no
baseline to protect.

It does not load versions (the watcher does, through `VersionManager`) and does not time
requests (the access record does).
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from smolora.adapters.checkpoint import CheckpointError, read_manifest
from smolora.server.api.access_log import AccessRecord
from smolora.server.api.errors import APIError
from smolora.server.metrics import Metrics
from smolora.server.promotion_policy import PromotionPolicy, eval_problems, eval_scores
from smolora.server.versions import VersionManager

log = logging.getLogger("smolora.server.promotion")

#: How a request's version was chosen, as its access record says (`version_source`).
SOURCE_NAMED, SOURCE_ACTIVE, SOURCE_CANARY = "named", "active", "canary"


@dataclass
class Decision:
    """One promotion decision.

    Attributes:
        version: the candidate version.
        decision: promoted, rejected, canary (started), rolled_back, superseded, cancelled
            or failed (the activation itself failed).
        reason: why, in words.
        at: unix time.
        baseline: the version active when it was decided.
    """

    version: int
    decision: str
    reason: str
    at: float
    baseline: int | None


@dataclass
class ArmStats:
    """The outcomes of one side of a canary."""

    requests: int = 0
    errors: int = 0
    seconds_per_token: list[float] = field(default_factory=list)

    def add(self, ok: bool, seconds_per_token: float | None) -> None:
        self.requests += 1
        self.errors += 0 if ok else 1
        if ok and seconds_per_token is not None:
            self.seconds_per_token.append(seconds_per_token)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def median_seconds_per_token(self) -> float | None:
        return statistics.median(self.seconds_per_token) if self.seconds_per_token else None

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 6),
            "median_seconds_per_token": self.median_seconds_per_token,
        }


@dataclass
class Canary:
    """A candidate serving a share of the requests that name no version."""

    version: int
    baseline: int
    share: float
    started_at: float
    canary: ArmStats = field(default_factory=ArmStats)
    active: ArmStats = field(default_factory=ArmStats)

    def summary(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "baseline": self.baseline,
            "share": self.share,
            "started_at": self.started_at,
            "canary": self.canary.summary(),
            "active": self.active.summary(),
        }


def canary_problems(policy: PromotionPolicy, canary: Canary) -> list[str]:
    """Why a canary regressed against the active version (empty: it did not)."""
    p = []
    increase = canary.canary.error_rate - canary.active.error_rate
    if increase > policy.canary_max_error_increase:
        p.append(
            f"error rate {canary.canary.error_rate:.3f} vs {canary.active.error_rate:.3f} "
            f"on the active version (more than +{policy.canary_max_error_increase:.3f})"
        )
    mine, theirs = canary.canary.median_seconds_per_token, canary.active.median_seconds_per_token
    if mine is not None and theirs is not None and theirs > 0:
        if mine / theirs > policy.canary_max_latency_ratio:
            p.append(
                f"median {mine * 1000:.1f} ms per token vs {theirs * 1000:.1f} ms on the active "
                f"version ({mine / theirs:.2f}x, more than {policy.canary_max_latency_ratio:.2f}x)"
            )
    return p


def outcome(record: AccessRecord) -> tuple[bool, float | None] | None:
    """(ok, end-to-end seconds per completion token) of a finished chat request, or None when
    the outcome says nothing about the version (a 4xx, or refused before it ran)."""
    if record.status is None:
        return None
    if record.status == 500 or (record.status < 300 and record.error is not None):
        return False, None
    if record.status >= 300:
        return None
    tokens = record.completion_tokens or 0
    if record.e2e_s is None or tokens < 1:
        return True, None
    return True, record.e2e_s / tokens


class Promoter:
    """Decides whether versions the watcher loads go live (see the module docstring).

    Args:
        policy: the floors and the canary settings.
        manager: the version manager (activation, unloading, manifests).
        metrics: where decisions and canary outcomes are counted.
        rng: random source of the canary split (tests pass a seeded one).
    """

    def __init__(
        self,
        policy: PromotionPolicy,
        manager: VersionManager,
        metrics: Metrics,
        rng: random.Random | None = None,
    ):
        problems = policy.problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.policy = policy
        self.manager = manager
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.canary: Canary | None = None
        self.decisions: deque[Decision] = deque(maxlen=64)
        self._latest: dict[int, Decision] = {}
        self._concluding: asyncio.Task[None] | None = None

    # --- routing and outcomes ------------------------------------------------------------
    def route(self) -> tuple[int | None, str]:
        """The version for a request that names none, and how it was chosen."""
        active = self.manager.active()
        canary = self.canary
        if canary is None:
            return active, SOURCE_ACTIVE
        if active != canary.baseline or self.manager.get(canary.version) is None:
            self._end_canary("cancelled", "an admin changed the active or resident versions")
            return active, SOURCE_ACTIVE
        if self.rng.random() < canary.share:
            return canary.version, SOURCE_CANARY
        return active, SOURCE_ACTIVE

    def observe(self, record: AccessRecord) -> None:
        """Count a finished request for the canary (called once per HTTP request)."""
        canary = self.canary
        if canary is None:
            return
        if record.version_source not in (SOURCE_ACTIVE, SOURCE_CANARY):
            return
        result = outcome(record)
        if result is None:
            return
        if record.version_source == SOURCE_CANARY and record.version == canary.version:
            arm, name = canary.canary, SOURCE_CANARY
        elif record.version_source == SOURCE_ACTIVE and record.version == canary.baseline:
            arm, name = canary.active, SOURCE_ACTIVE
        else:
            return
        arm.add(*result)
        self.metrics.canary_requests.labels(arm=name, result="ok" if result[0] else "error").inc()
        if canary.canary.requests >= self.policy.canary_requests:
            self.canary = None  # every request naming no version goes to the active one again
            self._concluding = asyncio.get_running_loop().create_task(
                self._conclude(canary), name=f"canary-v{canary.version}"
            )

    async def _conclude(self, canary: Canary) -> None:
        """Promote a canary that has served its requests, or roll it back."""
        try:
            stats = (
                f"canary {canary.canary.requests} requests, {canary.canary.errors} errors; "
                f"active {canary.active.requests} requests, {canary.active.errors} errors"
            )
            problems = canary_problems(self.policy, canary)
            if problems:
                self._record(canary.version, "rolled_back", "; ".join(problems) + f" ({stats})")
                await self._unload(canary.version)
            else:
                await self._activate(canary.version, f"the canary held up ({stats})")
        except Exception:  # noqa: BLE001 - a background task: log, never lose it silently
            log.exception("promotion: deciding the canary of version %d failed", canary.version)
        finally:
            self._concluding = None

    # --- offers --------------------------------------------------------------------------
    async def supersede(self, version: int) -> None:
        """End a running canary of another version: `version` is about to be loaded and
        offered (the registry watcher calls this first; the canary's slot is needed)."""
        if self._concluding is not None:  # a canary being decided is decided first
            await asyncio.gather(asyncio.shield(self._concluding), return_exceptions=True)
        if self.canary is not None and self.canary.version != version:
            old = self.canary.version
            self._end_canary("superseded", f"version {version} was published")
            await self._unload(old)

    async def offer(self, version: int) -> Decision:
        """Decide what happens to a loaded, inactive version (see the module docstring)."""
        await self.supersede(version)
        baseline = self.manager.active()
        if baseline is None or baseline == version:
            return await self._activate(version, "nothing else was active")
        candidate = eval_scores(await self._manifest_eval(version))
        before = eval_scores(await self._manifest_eval(baseline))
        problems = eval_problems(self.policy, candidate, before)
        if problems:
            decision = self._record(version, "rejected", "; ".join(problems))
            await self._unload(version)
            return decision
        if self.policy.canary_share > 0:
            self.manager.hold(version)
            self.canary = Canary(version, baseline, self.policy.canary_share, time.time())
            self.metrics.canary_version.set(version)
            return self._record(
                version,
                "canary",
                f"its scores pass the floors; serving {self.policy.canary_share:.0%} of the "
                f"requests that name no version until {self.policy.canary_requests} have ended",
            )
        return await self._activate(version, "its scores pass the floors")

    async def _activate(self, version: int, why: str) -> Decision:
        try:
            await self.manager.activate(version)
        except APIError as e:
            await self._unload(version)
            return self._record(version, "failed", f"activation failed: {e.message}")
        finally:
            self.manager.release(version)
        return self._record(version, "promoted", why)

    async def _manifest_eval(self, version: int) -> dict[str, Any]:
        info = self.manager.get(version)
        if info is None:
            return {}
        try:
            manifest = await asyncio.to_thread(read_manifest, info.path)
        except (CheckpointError, OSError) as e:
            log.warning("version %d: manifest not readable for promotion (%s)", version, e)
            return {}
        return manifest.eval

    async def _unload(self, version: int) -> None:
        self.manager.release(version)
        if self.manager.get(version) is None or self.manager.active() == version:
            return
        try:
            await self.manager.unload(version)
        except APIError as e:  # e.g. requests still pinned to it: the resident cap evicts it later
            log.warning("version %d stays resident after promotion refused it: %s", version, e)

    def _end_canary(self, decision: str, reason: str) -> None:
        canary, self.canary = self.canary, None
        if canary is not None:
            self.manager.release(canary.version)  # not active: the next trim may unload it
            self._record(canary.version, decision, reason)

    def _record(self, version: int, decision: str, reason: str) -> Decision:
        d = Decision(version, decision, reason, time.time(), self.manager.active())
        self.decisions.append(d)
        self._latest[version] = d
        self.metrics.promotion_decisions.labels(decision=decision).inc()
        if self.canary is None:
            self.metrics.canary_version.set(0)
        level = logging.INFO if decision in ("promoted", "canary") else logging.WARNING
        log.log(level, "promotion: version %d %s: %s", version, decision, reason)
        return d

    # --- reports -------------------------------------------------------------------------
    def latest(self, version: int) -> dict[str, Any] | None:
        """The latest decision about `version` (None: never offered)."""
        d = self._latest.get(version)
        return None if d is None else asdict(d)

    def describe(self) -> dict[str, Any]:
        """The policy, the running canary and the recent decisions (newest last)."""
        return {
            "policy": asdict(self.policy),
            "canary": None if self.canary is None else self.canary.summary(),
            "decisions": [asdict(d) for d in self.decisions],
        }
