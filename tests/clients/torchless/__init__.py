"""`run_torchless`: run Python in a subprocess where torch and the serving stack cannot be
imported (this folder's `sitecustomize.py` goes first on its PYTHONPATH)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def run_torchless(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python *args` with the packages of `sitecustomize.BLOCKED` unimportable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout
    )
