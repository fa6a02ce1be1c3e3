"""Pydantic bodies of the checkpoint admin endpoints."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class VersionRequest(BaseModel):
    """`{"version": 3}`."""

    model_config = ConfigDict(strict=True, extra="forbid")

    version: int = Field(ge=1)


class LoadRequest(VersionRequest):
    """`{"version": 3, "activate": false}`: make a published version resident (and optionally
    active)."""

    activate: bool = False
