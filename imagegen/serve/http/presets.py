"""``GET /v1/presets``: the presets this service renders, with their identity methods and defaults.

What a client (the Studio's playground) needs to offer choices instead of guessing them: each
served preset's family, identity methods (the first is the default), default size/steps/guidance
and limits. Read from ``configs/models.yaml`` through the preset registry; any key may read it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from imagegen.pipelines.presets import get_preset
from imagegen.serve.http.deps import AUTH, replica, scoped
from imagegen.serve.store import ApiKey

router = APIRouter(tags=["presets"], dependencies=AUTH)


class PresetOut(BaseModel):
    """A served preset, as a client offers it."""

    name: str
    family: str
    description: str = ""
    #: identity methods; the first is the default
    methods: list[str]
    default_method: str | None = None
    defaults: dict[str, Any]
    limits: dict[str, Any]


class PresetList(BaseModel):
    presets: list[PresetOut]


@router.get("/v1/presets", response_model=PresetList)
async def list_presets(key: ApiKey = Depends(scoped(None)), ingress: Any = Depends(replica)) -> PresetList:
    """The presets served here: family, identity methods (first = default), defaults and limits."""
    out = []
    for name in ingress.service.presets:
        preset = get_preset(name)
        out.append(
            PresetOut(
                name=preset.name,
                family=preset.family,
                description=preset.description,
                methods=list(preset.methods),
                default_method=preset.default_method,
                defaults=preset.defaults.model_dump(),
                limits=preset.limits.model_dump(),
            )
        )
    return PresetList(presets=out)
