"""The OpenAI-compatible HTTP API: one subpackage per endpoint family.

`chat/` (POST /v1/chat/completions), `models/` (GET /v1/models), `checkpoints/` (admin:
load, activate, roll back, unload checkpoint versions), `health/` (/health, /ready,
/metrics). `engine_protocol.py` is the seam to the engine, `errors.py` the typed errors,
`admission.py` the queue limits, `auth.py` the API keys, `state.py` the per-app state.
Importing this package starts nothing.
"""
