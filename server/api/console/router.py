"""GET /console: the operator console page, its assets, and two read-only JSON views it polls.

The page and its script and style sheet are static files shipped in the package
(`smolora.server.console`: `index.html`, `console.js`, `console.css`); they hold no key
and need none (the page asks for keys and keeps them in memory). Everything else the page
shows comes from the public endpoints (`/v1/chat/completions`, `/v1/models`, `/ready`,
`/admin/checkpoints/*`) and from:

GET /console/api/metrics    the app's metrics registry as JSON (`summary.metrics_summary`)
GET /console/api/versions   published + resident versions with their manifests' `eval`

Both views take the inference API key (as `/v1/models` does). Assets are served with a
Content-Security-Policy that allows only this origin, so nothing is fetched from elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from smolora.server.api.auth import require_api_key
from smolora.server.api.console.summary import metrics_summary, versions_summary
from smolora.server.api.errors import NotFoundError
from smolora.server.api.state import get_state

router = APIRouter(tags=["console"])

#: The assets the console serves, by URL name -> media type (nothing else in the folder is served).
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
        "style-src 'self'; connect-src 'self'; frame-ancestors 'none'"
    ),
}


def _asset(name: str) -> Response:
    data = resources.files("smolora.server.console").joinpath(name).read_bytes()
    return Response(data, media_type=ASSETS[name], headers=_HEADERS)


@router.get("/console", include_in_schema=False)
async def console_page() -> Response:
    return _asset("index.html")


@router.get("/console/", include_in_schema=False)
async def console_slash() -> Response:
    return RedirectResponse("../console", status_code=308)  # relative: works behind a path prefix


@router.get("/console/assets/{name}", include_in_schema=False)
async def console_asset(name: str) -> Response:
    if name not in ASSETS:
        raise NotFoundError(f"the console has no asset {name!r}", code="not_found")
    return _asset(name)


@router.get("/console/api/metrics", dependencies=[Depends(require_api_key)])
async def console_metrics(request: Request) -> dict[str, Any]:
    """Latency percentiles, counters, gauges and expert usage (cumulative since start), with the
    server's clock (`time`, unix seconds: the console's rates and its time axis use it)."""
    return {"time": time.time(), **metrics_summary(get_state(request).metrics.registry)}


@router.get("/console/api/versions", dependencies=[Depends(require_api_key)])
async def console_versions(request: Request) -> dict[str, Any]:
    """Published and resident versions with tasks, eval metrics and expert counts, and the
    promotion policy's canary and decisions (None without a policy)."""
    state = get_state(request)
    if not state.settings.adapters:
        return {"adapters": False, "active": None, "latest": None, "history": [], "versions": []}
    described = await state.require_versions().describe()
    summary = await asyncio.to_thread(versions_summary, described)
    summary["promotion"] = state.promoter.describe() if state.promoter else None
    return summary
