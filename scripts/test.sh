#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: fast unit tests, then the tests that
# start the real vLLM engine and HTTP server. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Engines in tests size their KV cache explicitly (EngineConfig.kv_cache_bytes, tens of MiB).
exec .venv/bin/python -m pytest tests -q --timeout=900 "$@"
