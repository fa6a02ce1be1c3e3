"""The OpenAI-compatible HTTP API: one subpackage per endpoint family.

`chat/` (POST /v1/chat/completions), `models/` (GET /v1/models), `checkpoints/` (admin:
load, activate, roll back, unload checkpoint versions), `health/` (/health, /ready,
/metrics). The engine is reached through `smolora.server.engine.protocol` (`EngineClient`,
`GenerateRequest`, the `EngineError` family), `errors.py` holds the typed errors,
`admission.py` the queue limits, `auth.py` the API keys, `state.py` the per-app state.
Importing this package starts nothing.
"""
