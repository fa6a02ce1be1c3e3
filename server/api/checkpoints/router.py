"""Checkpoint admin routes (admin API key): list, load, activate, roll back, unload.

GET    /admin/checkpoints                  registry + residency + active + history
POST   /admin/checkpoints/load             {"version": N, "activate": false}
POST   /admin/checkpoints/activate         {"version": N}
POST   /admin/checkpoints/rollback         {}  (back to the previously active version)
POST   /admin/checkpoints/unload           {"version": N}
DELETE /admin/checkpoints/{version}        same as unload
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from smolora.server.api.auth import require_admin_key
from smolora.server.api.checkpoints.protocol import LoadRequest, VersionRequest
from smolora.server.api.state import get_state
from smolora.server.engine.protocol import VersionInfo

router = APIRouter(
    prefix="/admin/checkpoints", tags=["admin"], dependencies=[Depends(require_admin_key)]
)


def version_json(v: VersionInfo, active: int | None) -> dict[str, Any]:
    return {
        "version": v.version,
        "name": v.name,
        "tasks": list(v.tasks),
        "path": str(v.path),
        "loaded_at": v.loaded_at,
        "load_seconds": v.load_seconds,
        "active": v.version == active,
        "instruction_types": [
            {"name": t.name, "text": t.text, "task": t.task} for t in v.instruction_table.types
        ],
    }


@router.get("")
async def list_checkpoints(request: Request) -> dict[str, Any]:
    """The registry and residency, and the promotion policy's state (None without one)."""
    state = get_state(request)
    listing = await state.require_versions().describe()
    listing["promotion"] = state.promoter.describe() if state.promoter else None
    return listing


@router.post("/load")
async def load_checkpoint(body: LoadRequest, request: Request) -> dict[str, Any]:
    versions = get_state(request).require_versions()
    info = await versions.load(body.version, activate=body.activate)
    return {"loaded": version_json(info, versions.active()), "active": versions.active()}


@router.post("/activate")
async def activate_checkpoint(body: VersionRequest, request: Request) -> dict[str, Any]:
    versions = get_state(request).require_versions()
    info = await versions.activate(body.version)
    return {"active": versions.active(), "version": version_json(info, versions.active())}


@router.post("/rollback")
async def rollback_checkpoint(request: Request) -> dict[str, Any]:
    versions = get_state(request).require_versions()
    info = await versions.rollback()
    return {"active": versions.active(), "version": version_json(info, versions.active())}


@router.post("/unload")
async def unload_checkpoint(body: VersionRequest, request: Request) -> dict[str, Any]:
    versions = get_state(request).require_versions()
    await versions.unload(body.version)
    return {"unloaded": body.version, "active": versions.active()}


@router.delete("/{version}")
async def delete_checkpoint(version: int, request: Request) -> dict[str, Any]:
    versions = get_state(request).require_versions()
    await versions.unload(version)
    return {"unloaded": version, "active": versions.active()}
