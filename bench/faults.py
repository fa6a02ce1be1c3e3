"""The fault suite, run and counted: writes the `faults` key of bench/results/reliability.json.

    python bench/faults.py

Each test below injects one fault into the real thing (a server process, its engine core, a
publisher process, a registry folder) and checks that nothing is lost or exposed: `injected`
is the number of such test cases run, `survived` the number that passed. The same tests run
in CI (`scripts/test.sh`); this script runs them alone and records the count with the
command. Run it on an otherwise idle machine (the drain and mid-stream tests need a request
still running when they act).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # bench/ holds scripts, not a package
from reliability_result import write_sections  # noqa: E402

#: (test id, the fault it injects)
FAULT_TESTS = (
    ("tests/reliability/test_engine_death_e2e.py", "the engine-core process is killed"),
    ("tests/reliability/test_sigterm_e2e.py", "SIGTERM with requests running and queued"),
    ("tests/reliability/test_publish_faults.py", "a publisher killed / out of space / racing"),
    (
        "tests/reliability/test_overload_e2e.py",
        "a burst past the queue; clients leaving mid-stream and while queued",
    ),
    (
        "tests/e2e/test_server_e2e.py::"
        "test_a_version_copied_in_without_the_atomic_rename_loads_once_complete",
        "a version folder copied in file by file",
    ),
    ("tests/e2e/test_promotion_e2e.py", "a checkpoint that forgets a task is published"),
    (
        "tests/server/api/test_checkpoints_admin.py::"
        "test_watcher_skips_a_bad_version_once_and_keeps_going",
        "a published version with a corrupt tensor file",
    ),
    ("tests/adapters/test_checkpoint.py::test_flipped_byte_is_refused", "a flipped byte"),
    (
        "tests/adapters/test_checkpoint.py::test_tampered_manifest_hash_and_extra_file_are_refused",
        "a wrong hash and an extra file",
    ),
    ("tests/reliability/test_fuzz_manifest.py", "manifests with wrong field types and garbage"),
)


def main(argv: list[str] | None = None) -> int:
    command = "python bench/faults.py"
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        report = Path(tmp) / "junit.xml"
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                f"--junitxml={report}",
                *(test for test, _ in FAULT_TESTS),
            ],
            cwd=ROOT,
        )
        seconds = time.perf_counter() - t0
        cases = ET.parse(report).getroot().iter("testcase")
        outcomes = []
        for case in cases:
            failed = any(child.tag in ("failure", "error") for child in case)
            skipped = any(child.tag == "skipped" for child in case)
            outcomes.append((f"{case.get('classname')}::{case.get('name')}", failed, skipped))
    ran = [o for o in outcomes if not o[2]]
    faults: dict[str, Any] = {
        "command": command,
        "injected": len(ran),
        "survived": sum(not failed for _, failed, _ in ran),
        "failed": [name for name, failed, _ in ran if failed],
        "skipped": [name for name, _, skipped in outcomes if skipped],
        "suites": {test: fault for test, fault in FAULT_TESTS},
        "seconds": round(seconds, 1),
    }
    write_sections({"faults": faults})
    print(f"faults: {faults['survived']}/{faults['injected']} survived ({seconds:.0f} s)")
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
