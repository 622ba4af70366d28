"""Presets come from configs/models.yaml and are validated."""

from __future__ import annotations

import pytest

from imagegen.errors import ConfigError, UnknownPresetError
from imagegen.pipelines.presets import all_presets, get_preset
from imagegen.settings import get_settings


def test_real_and_tiny_presets_are_defined():
    presets = all_presets()
    assert presets["flux-dev"].repo == "black-forest-labs/FLUX.1-dev"
    assert presets["flux-schnell"].defaults.steps == 4
    assert presets["sdxl-base"].family == "sdxl" and presets["sdxl-base"].vae
    assert presets["tiny-flux"].is_tiny and presets["tiny-sdxl"].is_tiny
    assert all(p.licence for p in presets.values())


def test_unknown_preset_lists_known_ones():
    with pytest.raises(UnknownPresetError, match="tiny-flux"):
        get_preset("flux-pro")


def test_invalid_config_is_a_clear_error(tmp_path, monkeypatch):
    bad = tmp_path / "models.yaml"
    bad.write_text("presets:\n  broken:\n    repo: x\n    family: unet3000\n")
    monkeypatch.setenv("IMAGEGEN_MODELS_CONFIG", str(bad))
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError, match="preset 'broken' is invalid"):
            all_presets()
    finally:
        get_settings.cache_clear()
