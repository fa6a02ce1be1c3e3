"""API-key checks for inference and admin endpoints (FastAPI dependencies).

Keys travel as `Authorization: Bearer <key>` (what the OpenAI SDK sends); `X-API-Key`
is accepted too. Inference endpoints are open unless the server has inference keys;
admin endpoints need the admin key and answer 403 when the server has none configured.
Comparisons are constant-time. It does not rate-limit (`rate_limit.py` does, keyed by a
hash of the presented key) or log keys.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from smolora.server.api.errors import AuthenticationError, PermissionDeniedError
from smolora.server.api.state import get_state


def presented_key(request: Request) -> str | None:
    """The key a request presents (`Authorization: Bearer` or `X-API-Key`), if any."""
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    key = request.headers.get("x-api-key")
    return key.strip() if key else None


def _matches(presented: str, keys: tuple[str, ...]) -> bool:
    ok = False
    for k in keys:  # no early exit: the time taken does not tell which key matched
        ok |= hmac.compare_digest(presented.encode(), k.encode())
    return ok


async def require_api_key(request: Request) -> None:
    """Dependency: the inference key, when the server has any."""
    keys = get_state(request).settings.api_keys
    if not keys:
        return
    presented = presented_key(request)
    if presented is None:
        raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
    if not _matches(presented, keys):
        raise AuthenticationError("invalid API key")


async def require_admin_key(request: Request) -> None:
    """Dependency: the admin key (admin endpoints are disabled without one)."""
    admin = get_state(request).settings.admin_api_key
    if admin is None:
        raise PermissionDeniedError(
            "checkpoint admin endpoints are disabled; start the server with an admin API key "
            "(--admin-api-key-file or SMOLORA_ADMIN_API_KEY)",
            code="admin_disabled",
        )
    presented = presented_key(request)
    if presented is None:
        raise AuthenticationError("missing admin API key: send 'Authorization: Bearer <admin key>'")
    if not _matches(presented, (admin,)):
        raise AuthenticationError("invalid admin API key")
