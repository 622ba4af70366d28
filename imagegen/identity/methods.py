"""Identity method names → implementations, checked against what a preset supports."""

from __future__ import annotations

import torch

from imagegen.identity.conditioning import IdentityMethod, UnsupportedMethodError
from imagegen.pipelines.presets import Preset
from imagegen.settings import Settings


def _pulid_flux(preset, device, dtype, settings):
    from imagegen.identity.pulid.method import PulidFluxMethod

    return PulidFluxMethod(preset, device, dtype, settings)


def _pulid_sdxl(preset, device, dtype, settings):
    from imagegen.identity.pulid.method import PulidSDXLMethod

    return PulidSDXLMethod(preset, device, dtype, settings)


def _ipadapter_plus_face_sdxl(preset, device, dtype, settings):
    from imagegen.identity.ipadapter.method import PlusFaceSDXLMethod

    return PlusFaceSDXLMethod(preset, device, dtype, settings)


def _ipadapter_faceid_plusv2_sdxl(preset, device, dtype, settings):
    from imagegen.identity.ipadapter.method import FaceIDPlusV2SDXLMethod

    return FaceIDPlusV2SDXLMethod(preset, device, dtype, settings)


def _ipadapter_flux(preset, device, dtype, settings):
    from imagegen.identity.ipadapter.method import FluxIPAdapterMethod

    return FluxIPAdapterMethod(preset, device, dtype, settings)


#: every identity method imagegen implements, by the name presets and requests use
FACTORIES = {
    "pulid-flux-v0.9.1": _pulid_flux,
    "pulid-sdxl-v1.1": _pulid_sdxl,
    "ipadapter-faceid-plusv2-sdxl": _ipadapter_faceid_plusv2_sdxl,
    "ipadapter-plus-face-sdxl": _ipadapter_plus_face_sdxl,
    "ipadapter-flux": _ipadapter_flux,
}


def resolve_method(preset: Preset, requested: str | None) -> str:
    """The method a request gets on ``preset``: the requested one if supported, else the default."""
    name = requested or preset.default_method
    if name is None:
        raise UnsupportedMethodError(f"preset '{preset.name}' supports no identity method")
    if name not in preset.methods:
        supported = ", ".join(preset.methods) or "none"
        raise UnsupportedMethodError(
            f"identity method '{name}' is not supported by preset '{preset.name}'; supported: {supported}"
        )
    if name not in FACTORIES:
        raise UnsupportedMethodError(f"identity method '{name}' is not implemented; known: {', '.join(FACTORIES)}")
    return name


def create_method(
    name: str, preset: Preset, device: torch.device, dtype: torch.dtype, settings: Settings
) -> IdentityMethod:
    return FACTORIES[resolve_method(preset, name)](preset, device, dtype, settings)
