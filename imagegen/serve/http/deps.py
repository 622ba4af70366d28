"""Route dependencies: the replica's state and the caller's API key, checked for a scope."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from fastapi import Request, Security
from fastapi.security import HTTPBearer

from imagegen.serve.auth import allows
from imagegen.serve.errors import ApiError
from imagegen.serve.store import ApiKey

bearer = HTTPBearer(auto_error=False, description="An API key from `imagegen keys create`.")
#: routes that need a key say so in the OpenAPI document (the edge middleware does the checking)
AUTH = [Security(bearer)]


def ingress_of(request: Request) -> Any:
    """The ``Ingress`` deployment object of this replica (its config, stores and services)."""
    return request.app.state.ingress


async def replica(request: Request) -> Any:
    """``ingress_of`` as a route dependency.

    Dependencies here are ``async``: FastAPI runs a plain ``def`` dependency in a worker thread,
    a hop per request that buys nothing.
    """
    return ingress_of(request)


def key_of(request: Request, needed: str | None) -> ApiKey:
    """The caller's key (the edge authenticated it), if it has scope ``needed`` (None: any scope)."""
    key: ApiKey | None = request.scope.get("imagegen.key")
    if key is None:  # only reachable on a public docs route
        raise ApiError(401, "unauthorized", "this route needs an API key", headers={"WWW-Authenticate": "Bearer"})
    if not allows(key.scopes, needed):
        have = ", ".join(key.scopes)
        raise ApiError(403, "forbidden", f"this route needs the scope {needed!r}; this key has: {have}")
    return key


def scoped(needed: str | None) -> Callable[[Request], ApiKey]:
    """A dependency giving the caller's key, refused (403) without scope ``needed``."""

    async def dependency(request: Request) -> ApiKey:
        return key_of(request, needed)

    return dependency


def request_id(request: Request) -> str:
    return request.scope.get("imagegen.request_id") or uuid.uuid4().hex
