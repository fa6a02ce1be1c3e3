"""JSON round-trips of typed dataclass configs, shared by the adapter, checkpoint and engine
configs: tuples become lists on the way out, and unknown keys are refused on the way in
(a key we do not know means a newer format or a typo, never something to drop silently).
`read_json_object` reads a config file as a JSON object, with the caller's error type."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def config_to_dict(config: Any) -> dict[str, Any]:
    """`dataclasses.asdict`, with top-level tuple values turned into lists (JSON-ready)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }


def config_from_dict(cls: type[T], data: dict[str, Any], error: type[Exception], what: str) -> T:
    """`cls(**data)`, raising `error` naming `what` if `data` has keys `cls` does not know."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - known
    if unknown:
        raise error(f"unknown {what} keys {sorted(unknown)}")
    return cls(**data)


def read_json_object(
    path: Path, error: type[Exception], missing: str, what: str = ""
) -> dict[str, Any]:
    """The JSON object in `path`.

    Args:
        path: the file.
        error: the exception type raised for every problem.
        missing: the message when the file does not exist.
        what: the file's role, prefixed to the other messages (e.g. "manifest ").

    Raises:
        error: the file is missing, is not valid JSON, or holds something else than an object.
    """
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(missing) from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: {what}is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: {what}must be a JSON object")
    return data
