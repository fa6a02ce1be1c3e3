"""What a server must remember across a restart: the version it served and how far into the
registry it had looked.

Without it a restarted server (a supervisor restarting it after its engine died, a
rolling update) would activate the registry's latest version -- the very version an admin
rolled back or a promotion policy refused -- and would never be offered the versions
published while it was down. `ServingStateStore` keeps two numbers in a small JSON file:

- `active`: the version last activated (written by `VersionManager` on every activation,
  rollback included); start-up activates it again when it is still published and no
  `--initial-version` is given;
- `newest_seen`: the newest version the registry watcher has handled (loaded, refused or
  offered); at start-up the watcher takes it as its starting point, so a version
  published while the server was down is picked up (and goes through the promotion
  policy) like any other.

Writes are atomic (a temporary file renamed over the old one) and never fatal: a server
whose state folder is read-only logs a warning and keeps serving. A missing or unreadable
file means "no state" (the registry's latest version, as on a first start).

It does not choose versions (`server/versions.py` and `server/registry_watch.py` do).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("smolora.server.serving_state")

STATE_DIR = ".serving"  # inside the registry folder by default (hidden: never a version)


def default_state_file(registry_dir: Path, served_model_name: str) -> Path:
    """`<registry>/.serving/<served model name>.json` (replicas of one model share it)."""
    return Path(registry_dir) / STATE_DIR / f"{served_model_name}.json"


@dataclass
class ServingState:
    """The remembered numbers (None / 0: nothing remembered)."""

    active: int | None = None
    newest_seen: int = 0


class ServingStateStore:
    """Reads and writes one server's `ServingState` file.

    Args:
        path: the JSON file (its folder is created on the first write).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.state = self.read()

    def read(self) -> ServingState:
        """The state on disk; an absent or unreadable file is an empty state."""
        try:
            data = json.loads(self.path.read_text())
            active, newest = data.get("active"), data.get("newest_seen", 0)
            if (active is not None and not _is_version(active)) or not _is_count(newest):
                raise ValueError(f"unexpected values {data!r}")
            return ServingState(active, newest)
        except FileNotFoundError:
            return ServingState()
        except (OSError, ValueError, AttributeError) as e:
            log.warning("serving state %s is unreadable (%s); starting without it", self.path, e)
            return ServingState()

    def update(self, active: int | None = None, newest_seen: int | None = None) -> None:
        """Record a newly activated version and/or how far the watcher has looked."""
        changed = False
        if active is not None and active != self.state.active:
            self.state.active, changed = active, True
        if newest_seen is not None and newest_seen > self.state.newest_seen:
            self.state.newest_seen, changed = newest_seen, True
        if changed:
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(asdict(self.state)))
            os.replace(tmp, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):  # e.g. its folder is a file: nothing was made
                tmp.unlink(missing_ok=True)
            log.warning(
                "serving state not saved to %s (%s); a restart starts from the "
                "registry's latest version",
                self.path,
                e,
            )


def _is_version(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0
