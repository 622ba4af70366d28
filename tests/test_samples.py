"""Sample characters from the packaged public-domain photos: one builder for the demo and the eval suites."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from imagegen import samples
from imagegen.identity.registry import Registry


def test_reference_sets_are_named_deterministic_pngs():
    named = samples.reference_images("grace_hopper")
    assert [n for n, _ in named] == ["grace_hopper.png"] + [f"grace_hopper-{k}.png" for k in samples.REFERENCE_KINDS]
    files = samples.reference_files("grace_hopper")
    assert files == samples.reference_files("grace_hopper")
    assert [n for n, _ in files] == [n for n, _ in named]
    assert Image.open(io.BytesIO(files[0][1])).format == "PNG"
    with pytest.raises(ValueError, match="unknown sample photo 'mona_lisa'"):
        samples.reference_images("mona_lisa")


def test_provenance_names_the_public_domain_source():
    for sample in samples.PHOTOS:
        record = samples.provenance(sample)
        assert record["kind"] == "licensed" and "public-domain" in record["creator"] + record["evidence"]


def test_register_sample_character_keeps_or_replaces_an_existing_one(isolated_home):
    with Registry.open() as registry:
        first = samples.register_sample_character(registry, "sample-hopper", "grace_hopper")
        assert first.character.status == "approved" and first.report.passed
        assert registry.characters.get("sample-hopper").name == samples.NAMES["grace_hopper"]
        assert samples.register_sample_character(registry, "sample-hopper", "grace_hopper", name="Other") is None
        assert registry.characters.get("sample-hopper").name == samples.NAMES["grace_hopper"]
        again = samples.register_sample_character(registry, "sample-hopper", "grace_hopper", name="Other", replace=True)
        assert again.character.name == "Other" and registry.characters.get("sample-hopper").status == "approved"
