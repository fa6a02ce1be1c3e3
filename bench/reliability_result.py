"""`bench/results/reliability.json`: the reliability issue's result file, written by several
scripts (`reliability.py`: bad_inputs, fuzz; `soak_mixed.py`: soak; `faults.py`: faults;
`burst.py`: burst). Each section carries the command that produced it; the top-level
`command` lists them all, in the order the sections were first written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULT = Path(__file__).resolve().parent / "results" / "reliability.json"


def write_sections(sections: dict[str, dict[str, Any]], path: Path = RESULT) -> dict[str, Any]:
    """Replace `sections` (each with its `command`) in the result file and recompose the
    top-level `command`; returns the whole result."""
    result: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    result.update(sections)
    result["command"] = " && ".join(
        dict.fromkeys(
            v["command"] for v in result.values() if isinstance(v, dict) and "command" in v
        )
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result
