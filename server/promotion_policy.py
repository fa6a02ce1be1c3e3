"""The promotion policy's settings and its evaluation floors (pure: no server state).

`PromotionPolicy` is the typed configuration `ServerSettings.promotion` carries;
`eval_problems` compares a candidate's manifest scores with the active version's. The
`Promoter` (`server/promotion.py`) applies both to the versions the registry watcher loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PromotionPolicy:
    """When a newly published version may go live (see the module docstring).

    Attributes:
        max_task_drop: most points (0-100 scale) any task scored by both the active version
            and the candidate may drop; None: not checked.
        min_task_score: least score of every task the candidate was scored on; None: not
            checked.
        require_eval: refuse a candidate without evaluation scores, or without a score for a
            task the active version was scored on.
        canary_share: share of the requests naming no version served by a candidate before
            it is promoted; 0: promote at once once the floors pass.
        canary_requests: canary requests counted before the decision.
        canary_max_error_increase: most the canary's error rate may exceed the active
            version's (0.02 = two percentage points).
        canary_max_latency_ratio: most the canary's median seconds per completion token may
            be, as a multiple of the active version's.
    """

    max_task_drop: float | None = None
    min_task_score: float | None = None
    require_eval: bool = False
    canary_share: float = 0.0
    canary_requests: int = 50
    canary_max_error_increase: float = 0.02
    canary_max_latency_ratio: float = 1.5

    @property
    def gated(self) -> bool:
        """Whether anything is checked before a version goes live."""
        return (
            self.max_task_drop is not None
            or self.min_task_score is not None
            or self.require_eval
            or self.canary_share > 0
        )

    def problems(self) -> list[str]:
        """What is wrong with these values (empty when they are usable)."""
        p = []
        if self.max_task_drop is not None and not self.max_task_drop >= 0:
            p.append("promotion max_task_drop must be >= 0")
        if self.min_task_score is not None and not math.isfinite(self.min_task_score):
            p.append("promotion min_task_score must be a finite number")
        if not 0.0 <= self.canary_share < 1.0:
            p.append("promotion canary_share must be in [0, 1)")
        if self.canary_requests < 1:
            p.append("promotion canary_requests must be >= 1")
        if not self.canary_max_error_increase >= 0:
            p.append("promotion canary_max_error_increase must be >= 0")
        if not self.canary_max_latency_ratio > 0:
            p.append("promotion canary_max_latency_ratio must be > 0")
        return p


def eval_scores(evaluation: dict[str, Any]) -> dict[str, float]:
    """Task -> score of a manifest's `eval` (its `row`); entries without a number are left out."""
    row = evaluation.get("row")
    if not isinstance(row, dict):
        return {}
    scores = {}
    for task, result in row.items():
        score = result.get("score") if isinstance(result, dict) else None
        if isinstance(score, int | float) and not isinstance(score, bool) and math.isfinite(score):
            scores[str(task)] = float(score)
    return scores


def eval_problems(
    policy: PromotionPolicy, candidate: dict[str, float], baseline: dict[str, float] | None
) -> list[str]:
    """Why a candidate's scores fail the policy's floors (empty: they pass).

    Args:
        policy: the floors.
        candidate: the candidate's task -> score.
        baseline: the active version's task -> score (None: nothing active).
    """
    p = []
    if policy.require_eval and not candidate:
        p.append("its manifest has no evaluation scores (eval.row)")
    if policy.min_task_score is not None:
        for task, score in sorted(candidate.items()):
            if score < policy.min_task_score:
                p.append(f"{task} scores {score:.2f}, under the floor {policy.min_task_score:.2f}")
    for task, before in sorted((baseline or {}).items()):
        after = candidate.get(task)
        if after is None:
            if policy.require_eval:
                p.append(f"{task} (scored by the active version) has no score")
            continue
        if policy.max_task_drop is not None and before - after > policy.max_task_drop:
            p.append(
                f"{task} drops {before - after:.2f} points ({before:.2f} -> {after:.2f}), "
                f"more than {policy.max_task_drop:.2f}"
            )
    return p
