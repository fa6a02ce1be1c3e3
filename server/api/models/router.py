"""GET /v1/models: the served model (its active version) and `name@version` per resident version.

With adapters off (base-only serving) the list holds the base model alone. With a
promotion policy, the served model's card names the running canary and each version's card
carries the latest promotion decision about it (`server/promotion.py`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from smolora.server.api.auth import require_api_key
from smolora.server.api.errors import NotFoundError
from smolora.server.api.state import ServerState, get_state

router = APIRouter(tags=["inference"])


def model_cards(state: ServerState) -> list[dict[str, Any]]:
    """OpenAI model objects: `name` (the active version) and `name@N` for each resident
    version N."""
    name = state.settings.served_model_name
    if not state.settings.adapters:
        return [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "smolora",
                "root": name,
                "parent": None,
                "smolora": {"adapters": False, "active_version": None, "alias_of": None},
            }
        ]
    versions, promoter = state.versions, state.promoter
    canary = promoter.canary if promoter else None
    active = versions.active() if versions else None
    resident = versions.resident() if versions else []
    created = int(min((v.loaded_at for v in resident), default=0))
    cards: list[dict[str, Any]] = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "smolora",
            "root": name,
            "parent": None,
            "smolora": {
                "adapters": True,
                "active_version": active,
                "alias_of": f"{name}@{active}" if active else None,
                "canary": None
                if canary is None
                else {"version": canary.version, "share": canary.share},
            },
        }
    ]
    for v in resident:
        cards.append(
            {
                "id": f"{name}@{v.version}",
                "object": "model",
                "created": int(v.loaded_at),
                "owned_by": "smolora",
                "root": name,
                "parent": name,
                "smolora": {
                    "version": v.version,
                    "name": v.name,
                    "tasks": list(v.tasks),
                    "active": v.version == active,
                    "instruction_types": [t.name for t in v.instruction_table.types],
                    "promotion": promoter.latest(v.version) if promoter else None,
                },
            }
        )
    return cards


@router.get("/v1/models", dependencies=[Depends(require_api_key)])
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": model_cards(get_state(request))}


@router.get("/v1/models/{model_id}", dependencies=[Depends(require_api_key)])
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    for card in model_cards(get_state(request)):
        if card["id"] == model_id:
            return card
    raise NotFoundError(
        f"the model {model_id!r} does not exist; see GET /v1/models",
        param="model",
        code="model_not_found",
    )
