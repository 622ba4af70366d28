"""Suite files: validation with clear errors, and a stable grid of content-hashed cells."""

from __future__ import annotations

import pytest
import yaml

from imagegen.errors import ConfigError
from imagegen.eval.suite import expand, load_suite
from imagegen.eval.thresholds import eval_settings


def test_the_smoke_suite_validates_and_expands():
    suite, path = load_suite("smoke")
    assert path == eval_settings().suites_dir / "smoke.yaml"
    assert suite.gated is False and suite.on_unsupported == "skip"
    assert [c.register_sample for c in suite.characters] == [True, True]
    cells = expand(suite, {c.id: c.id for c in suite.characters}, {})
    assert len(cells) == 2 * 2 * 2 * 2 * 1  # presets x methods x characters x prompts x seeds
    assert len({c.key for c in cells}) == len(cells) and len({c.file for c in cells}) == len(cells)
    again = expand(suite, {c.id: c.id for c in suite.characters}, {})
    assert [c.key for c in again] == [c.key for c in cells]  # content hash: stable
    plain = next(c for c in cells if c.method == "none")
    assert "character" not in plain.request and plain.weight is None
    identity = next(c for c in cells if c.method == "default")
    assert identity.request["character"] in ("smoke-astronaut", "smoke-hopper")
    assert identity.request["method"] is None and identity.request["identity_weight"] == 1.0
    assert set(identity.tags) >= {"pose", "angle", "expression", "style", "lighting", "preset", "method", "weight"}
    # a changed character (version, references) re-renders its identity cells only
    bumped = expand(suite, {c.id: c.id for c in suite.characters}, {"smoke-astronaut": "v2-0123"})
    changed = {a.file for a, b in zip(cells, bumped, strict=True) if a.key != b.key}
    assert changed and all("smoke-astronaut" in f and "__default" in f for f in changed)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"presets": []}, "presets: List should have at least 1 item"),
        ({"characters": [{"id": "Bad Id"}]}, "a character id is a slug"),
        ({"characters": [{"id": "x", "sample": "mona-lisa"}]}, "unknown sample photo"),
        ({"prompts": [{"text": "a", "tags": {"mood": "happy"}}]}, "prompts.0.tags.mood: Extra inputs"),
        ({"seeds": [1, 1]}, "seeds are distinct"),
        ({"methods": [{"name": "pulid", "weights": [5]}]}, "identity weights are between 0 and 3"),
        ({"gates": {"min_pass_rate": 2}}, "gates.min_pass_rate"),
        ({"thresholds": {"dlib": {"similarity": 0.5, "copy": 0.9, "extra": 1}}}, "thresholds.dlib.extra"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_invalid_suites_are_refused_naming_the_field(tmp_path, patch, message):
    base = yaml.safe_load((eval_settings().suites_dir / "smoke.yaml").read_text())
    base.update(patch)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError) as info:
        load_suite(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_unknown_suite_names_the_known_ones():
    with pytest.raises(ConfigError, match="smoke"):
        load_suite("does-not-exist")
