"""Library versions recorded with every render, so an image can be traced to the code that made it."""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    versions = {}
    for dist in ("imagegen", "torch", "diffusers", "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions
