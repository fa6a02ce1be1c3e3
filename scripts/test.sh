#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: fast unit tests, then the tests that
# start the real vLLM engine and HTTP server, after ruff (lint + format check). Extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# promtool (Debian package "prometheus") checks the live /metrics scrape and deploy/'s rules;
# those tests fail under CI=true without it. Installed quietly when missing and running as root;
# the Prometheus server the package brings is not left running.
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing promtool (apt-get install prometheus)" >&2
    if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) \
            >/dev/null 2>&1; then
        if command -v systemctl >/dev/null 2>&1; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
    else
        echo "warning: could not install promtool; the metrics tests that need it fail in CI" >&2
    fi
fi
# Chromium + its driver (Debian "chromium", "chromium-driver") run the operator console's
# browser tests (tests/e2e/test_console.py, selenium on the system chromedriver; no browser
# download). Installed quietly when missing and running as root.
if ! command -v chromedriver >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium + chromium-driver (apt-get)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver) \
        >/dev/null 2>&1 || echo "warning: could not install chromium; the console browser tests fail in CI" >&2
fi
# Lint and format first (config in pyproject.toml): a style failure fails CI in seconds.
.venv/bin/ruff format --check --quiet .
.venv/bin/ruff check --quiet .
# Engines in tests size their KV cache explicitly (EngineConfig.kv_cache_bytes, tens of MiB).
exec .venv/bin/python -m pytest tests -q --timeout=900 "$@"
