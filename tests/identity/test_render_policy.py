"""The one render policy: approved (or a draft whose report passed, for previews), age verified
unless the deployment allows unverified characters (development only); and the provider's
in-memory tensors never outlive the registration they were computed for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imagegen.identity.conditioning import CharacterNotRenderableError
from imagegen.identity.models import Character
from imagegen.identity.provider import RegistryIdentity, refusal
from imagegen.identity.registry import Registry
from imagegen.settings import Settings
from tests.identity._helpers import make_character, make_refs


@pytest.fixture
def registry(isolated_home: Path):
    reg = Registry.open()
    yield reg
    reg.close()


def _character(**overrides) -> Character:
    return Character.model_validate(make_character("policy-mia", **overrides))


@pytest.mark.parametrize(
    ("fields", "allow_draft", "allow_unverified", "expected"),
    [
        ({"status": "approved", "age_check": "passed"}, False, False, None),
        ({"status": "approved", "age_check": "unverified"}, False, False, "age_unverified"),
        ({"status": "approved", "age_check": "unverified"}, False, True, None),
        ({"status": "approved", "age_check": "failed"}, False, True, "age_check_failed"),
        ({"status": "draft", "age_check": "passed"}, False, False, "character_not_renderable"),
        ({"status": "draft", "age_check": "passed", "report_passed": True}, True, False, None),
        ({"status": "draft", "age_check": "passed", "report_passed": False}, True, False, "character_not_renderable"),
        ({"status": "draft", "age_check": "passed"}, True, False, "character_not_renderable"),
    ],
)
def test_refusal(fields, allow_draft, allow_unverified, expected):
    found = refusal(_character(**fields), allow_draft=allow_draft, allow_unverified_age=allow_unverified)
    assert (found.code if found else None) == expected
    if found is not None:
        assert "policy-mia" in found.message


def test_strict_provider_refuses_unverified(registry, isolated_home):
    registry.characters.register(Character.model_validate(make_character("policy-ann")), make_refs(2))
    registry.characters.approve("policy-ann")
    strict = RegistryIdentity(registry, Settings(home=isolated_home, allow_unverified_age=False))
    with pytest.raises(CharacterNotRenderableError, match="IMAGEGEN_ALLOW_UNVERIFIED_AGE"):
        strict.renderable("policy-ann")
    relaxed = RegistryIdentity(registry, Settings(home=isolated_home, allow_unverified_age=True))
    assert relaxed.renderable("policy-ann").id == "policy-ann"
    registry.characters.set_age_check("policy-ann", "passed")
    assert strict.renderable("policy-ann").age_check == "passed"


def test_cached_tensors_go_with_the_registration(registry, isolated_home):
    provider = RegistryIdentity(registry, Settings(home=isolated_home, allow_unverified_age=True))
    registry.characters.register(Character.model_validate(make_character("policy-bo")), make_refs(2))
    registry.characters.approve("policy-bo")
    old = provider.renderable("policy-bo")
    key = (old.id, old.created_at, old.version, "pulid-flux-v0.9.1", "weights-hash")
    provider._lru[key] = {"id": torch.zeros(1)}

    assert provider.forget_stale() == 0  # still the same registration
    registry.characters.delete("policy-bo")
    assert provider.forget_stale() == 1 and not provider._lru

    provider._lru[key] = {"id": torch.zeros(1)}
    registry.characters.register(Character.model_validate(make_character("policy-bo")), make_refs(2, start=5))
    registry.characters.approve("policy-bo")
    again = provider.renderable("policy-bo")
    assert again.version > old.version  # versions never restart for a re-used id
    assert provider.forget_stale() == 1 and not provider._lru


def test_a_request_renders_the_registration_it_was_accepted_for(registry, isolated_home):
    """The service pins the version it authorised a caller against (``RenderRequest.character_version``): a character
    deleted and registered again under its id (by anyone) while the request waited is refused, not rendered with the
    new face."""
    from imagegen.pipelines.presets import get_preset

    provider = RegistryIdentity(registry, Settings(home=isolated_home, allow_unverified_age=True))
    conditioner = provider.load("pulid-flux-v0.9.1", get_preset("tiny-flux"), torch.device("cpu"), torch.float32)
    registry.characters.register(Character.model_validate(make_character("policy-cy")), make_refs(2))
    accepted = registry.characters.approve("policy-cy")
    key = (accepted.id, accepted.created_at, accepted.version, conditioner.name, conditioner.weights_hash)
    provider._lru[key] = {"id": torch.ones(1)}  # what the registration's render would read
    assert provider.tensors_for("policy-cy", conditioner, accepted.version)["id"].item() == 1
    assert provider.tensors_for("policy-cy", conditioner)["id"].item() == 1  # no pin: the current registration

    registry.characters.delete("policy-cy")
    registry.characters.register(Character.model_validate(make_character("policy-cy")), make_refs(2, start=5))
    registry.characters.approve("policy-cy")
    with pytest.raises(CharacterNotRenderableError, match="changed since this request was accepted"):
        provider.tensors_for("policy-cy", conditioner, accepted.version)
