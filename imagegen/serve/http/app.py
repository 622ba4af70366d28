"""The FastAPI app of one ingress replica: edge middleware, error handlers, the route modules."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from imagegen import __version__ as imagegen_version
from imagegen.serve.http import (
    characters,
    designs,
    evalruns,
    health,
    jobs,
    library,
    presets,
    provenance,
    renders,
    studio,
)
from imagegen.serve.http.edge import EdgeMiddleware, install_error_handlers


def build_api(ingress: Any) -> FastAPI:
    """The app serving ``ingress`` (the replica's state, reachable as ``app.state.ingress``)."""
    api = FastAPI(
        title="imagegen",
        version=imagegen_version,
        description=(
            "Render registered characters with a consistent face. Every route but `/healthz` and `/readyz` "
            "needs an API key: `Authorization: Bearer igk_...` (`imagegen keys create`). Errors are always "
            '`{"error": {"code", "message", "field"}}`.'
        ),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    api.state.ingress = ingress
    api.add_middleware(EdgeMiddleware)
    install_error_handlers(api)
    for module in (health, renders, jobs, characters, designs, presets, studio, library, evalruns, provenance):
        api.include_router(module.router)
    return api
