"""FastAPI route of POST /v1/chat/completions (thin: parsing, auth, rate-limit key, hand-off
to `ChatService`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from smolora.server.api.auth import presented_key, require_api_key
from smolora.server.api.chat.protocol import ChatCompletionRequest
from smolora.server.api.chat.serving import ChatService
from smolora.server.api.state import get_state

router = APIRouter(tags=["inference"])


@router.post("/v1/chat/completions", dependencies=[Depends(require_api_key)])
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """OpenAI chat completions with image parts; see `chat/protocol.py` for the `smolora`
    extension."""
    state = get_state(request)
    limiter = state.rate_limiter
    client_key = (
        limiter.client_key(
            presented_key(request) if state.settings.api_keys else None,
            request.client.host if request.client else None,
        )
        if limiter.enabled
        else None
    )
    return await ChatService(state).create(
        body,
        receive=request.receive,
        client_key=client_key,
        access=getattr(request.state, "access", None),
    )
