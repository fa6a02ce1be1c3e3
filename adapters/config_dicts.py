"""JSON round-trips of typed dataclass configs, shared by the adapter, checkpoint and engine
configs: tuples become lists on the way out, and unknown keys are refused on the way in
(a key we do not know means a newer format or a typo, never something to drop silently)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def config_to_dict(config: Any) -> dict[str, Any]:
    """`dataclasses.asdict`, with top-level tuple values turned into lists (JSON-ready)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def config_from_dict(cls: type[T], data: dict[str, Any], error: type[Exception], what: str) -> T:
    """`cls(**data)`, raising `error` naming `what` if `data` has keys `cls` does not know."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - known
    if unknown:
        raise error(f"unknown {what} keys {sorted(unknown)}")
    return cls(**data)
