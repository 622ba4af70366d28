"""Regression suites: a YAML file (``configs/suites/*.yaml``) validated by pydantic, and its grid.

A suite is a fixed grid, rendered and scored the same way every time::

    name: nightly                      # slug; names the run
    description: free text
    gated: true                        # false: report only, never fail (the smoke suite)
    presets: [flux-dev]                # one or more model presets
    methods:                           # identity methods; "none" renders without identity
      - {name: none}
      - {name: pulid-flux-v0.9.1, weights: [0.8, 1.0], start_step: 0}
      - {name: default}                # the preset's default method
    characters:
      - {id: mia}                      # a registered character
      - {id: smoke-astronaut, sample: astronaut, register: true}   # bundled public-domain photo
    prompts:
      - id: cafe                       # optional slug (default p0, p1 ...)
        text: "photo of {name} at a cafe at night"    # {name}: the character's name
        negative: ""
        tags: {pose: sitting, angle: three-quarter, expression: smiling, style: photo, lighting: night}
    seeds: [1, 2, 3]
    size: {width: 1024, height: 1024}  # optional: the preset's default
    steps: 28                          # optional
    guidance: 3.5                      # optional
    backend: dlib                      # face backend that scores (default IMAGEGEN_FACE_BACKEND)
    thresholds: {dlib: {similarity: 0.5, copy: 0.9}}   # per backend; see imagegen.eval.thresholds
    gates: {min_detection_rate: 0.9, min_pass_rate: 0.8, max_copy_rate: 0.1}
    baseline: runs/nightly-2024-06-01  # optional run to compare with after scoring
    workers: 2                         # renderer actors per preset
    batch_size: 4                      # requests per actor call
    profile: fast                      # optional optimisation profile of the renderers (configs/models.yaml)
    on_unsupported: fail               # or skip: cells a preset cannot render are reported, not fatal
    bootstrap: {samples: 1000, seed: 0}

Every cell of presets x methods x weights x characters x prompts x seeds is one render. A cell's
**key** is a hash of everything that determines its pixels (preset and its repo, the resolved
request, the character's registry version for identity cells, ``cache_salt``, and the options of
the optimisation profile unless it is eager): renders are stored under it, so a rerun renders only
what changed and scores everything again. The profile is ``--profile`` of ``imagegen eval run``, else
the suite's ``profile``, else ``IMAGEGEN_PROFILE``, else each preset's own (``quality``: eager).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imagegen.errors import ConfigError
from imagegen.eval.thresholds import Gates, ImageThresholds, eval_settings
from imagegen.samples import PHOTOS

SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
#: tags a prompt may carry
TAG_NAMES = ("pose", "angle", "expression", "style", "lighting")
#: method names with a meaning of their own
NO_IDENTITY = "none"
DEFAULT_METHOD = "default"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptTags(_Strict):
    pose: str | None = None
    angle: str | None = None
    expression: str | None = None
    style: str | None = None
    lighting: str | None = None

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class PromptSpec(_Strict):
    id: str | None = None
    text: str = Field(min_length=1, max_length=2000)
    negative: str = Field(default="", max_length=2000)
    tags: PromptTags = Field(default_factory=PromptTags)

    @field_validator("id")
    @classmethod
    def _slug(cls, value: str | None) -> str | None:
        if value is not None and not SLUG.fullmatch(value):
            raise ValueError("a prompt id is a slug: lowercase letters, digits, '-' and '_'")
        return value


class MethodSpec(_Strict):
    """An identity method and the weights to try it at (``none``: no identity conditioning)."""

    name: str = Field(default=NO_IDENTITY, pattern=r"^[A-Za-z0-9_.+-]{1,64}$")
    weights: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    start_step: int = Field(default=0, ge=0)

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: list[float]) -> list[float]:
        if any(not 0 <= w <= 3 for w in value):
            raise ValueError("identity weights are between 0 and 3")
        return value

    @property
    def uses_identity(self) -> bool:
        return self.name != NO_IDENTITY

    @property
    def request_method(self) -> str | None:
        """The ``RenderRequest.method`` value (None: the preset's default)."""
        return None if self.name in (NO_IDENTITY, DEFAULT_METHOD) else self.name


class CharacterSpec(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: str
    #: build the character from a bundled public-domain photo instead of the registry
    sample: str | None = None
    #: register the sample character (if missing) so identity methods can render it (YAML: register)
    register_sample: bool = Field(default=False, alias="register")
    name: str | None = None

    @field_validator("id")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not SLUG.fullmatch(value):
            raise ValueError("a character id is a slug: lowercase letters, digits, '-' and '_'")
        return value

    @field_validator("sample")
    @classmethod
    def _sample(cls, value: str | None) -> str | None:
        if value is not None and value not in PHOTOS:
            raise ValueError(f"unknown sample photo {value!r}; choose one of {', '.join(PHOTOS)}")
        return value


class SizeSpec(_Strict):
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class BootstrapSpec(_Strict):
    samples: int = Field(default=1000, ge=0, le=100_000)
    seed: int = 0


class Suite(_Strict):
    name: str
    description: str = ""
    gated: bool = True
    presets: list[str] = Field(min_length=1)
    methods: list[MethodSpec] = Field(default_factory=lambda: [MethodSpec()], min_length=1)
    characters: list[CharacterSpec] = Field(min_length=1)
    prompts: list[PromptSpec] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    size: SizeSpec | None = None
    steps: int | None = Field(default=None, ge=1)
    guidance: float | None = Field(default=None, ge=0, le=50)
    backend: str | None = None
    thresholds: dict[str, ImageThresholds] = Field(default_factory=dict)
    gates: Gates = Field(default_factory=Gates)
    baseline: str | None = None
    workers: int = Field(default=2, ge=1, le=64)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=4, ge=1, le=64)
    on_unsupported: Literal["fail", "skip"] = "fail"
    #: optimisation profile of every renderer actor (None: IMAGEGEN_PROFILE, else each preset's own)
    profile: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.+-]{1,64}$")
    bootstrap: BootstrapSpec = Field(default_factory=BootstrapSpec)
    cache_salt: str = ""

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not SLUG.fullmatch(value):
            raise ValueError("a suite name is a slug: lowercase letters, digits, '-' and '_'")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        if any(s < 0 for s in value) or len(set(value)) != len(value):
            raise ValueError("seeds are distinct integers >= 0")
        return value

    @model_validator(mode="after")
    def _unique(self) -> Suite:
        ids = [c.id for c in self.characters]
        if len(set(ids)) != len(ids):
            raise ValueError("character ids must be unique")
        prompt_ids = [p.id for p in self.prompts if p.id]
        if len(set(prompt_ids)) != len(prompt_ids):
            raise ValueError("prompt ids must be unique")
        for backend in self.thresholds:
            from imagegen.faces import metric_for

            metric_for(backend)
        return self

    def prompt_id(self, index: int) -> str:
        return self.prompts[index].id or f"p{index}"


def load_suite(path_or_name: str | Path) -> tuple[Suite, Path]:
    """Read and validate a suite: a YAML path, or a name in ``configs/suites/``."""
    path = Path(path_or_name)
    if not path.is_file() and path.suffix not in (".yaml", ".yml"):
        candidate = eval_settings().suites_dir / f"{path_or_name}.yaml"
        if candidate.is_file():
            path = candidate
    if not path.is_file():
        known = sorted(p.stem for p in eval_settings().suites_dir.glob("*.yaml"))
        raise ConfigError(
            f"no suite file {str(path_or_name)!r}: give a YAML path or one of the suites in "
            f"{eval_settings().suites_dir} ({', '.join(known) or 'none'})",
            field="suite",
        )
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read suite {path}: {exc}", field="suite") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a suite is a YAML mapping (name, presets, characters, prompts, seeds ...)")
    try:
        return Suite.model_validate(data), path
    except ValidationError as exc:
        parts = []
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        raise ConfigError(f"invalid suite {path}: " + "; ".join(parts), field="suite") from None


# -- the grid ----------------------------------------------------------------------------------------
class Cell(BaseModel):
    """One render of the grid: the request to send and what it is for."""

    model_config = ConfigDict(frozen=True)

    preset: str
    character: str
    method: str
    weight: float | None
    prompt_id: str
    seed: int
    request: dict[str, Any]
    tags: dict[str, str]
    key: str

    @property
    def file(self) -> str:
        """Where the render is stored, relative to the run directory."""
        weight = "" if self.weight is None else f"-w{self.weight:g}"
        name = f"{self.preset}__{self.method}{weight}__{self.prompt_id}__s{self.seed}__{self.key[:12]}.png"
        return f"renders/{self.character}/{name}"


def cell_key(preset: Any, request: dict[str, Any], identity_version: str | None, salt: str, profile: Any = None) -> str:
    """Content hash of everything that decides a render's pixels (an eager ``profile`` changes nothing: renders
    made before profiles existed keep their keys)."""
    payload = {
        "preset": preset.name,
        "repo": preset.repo,
        "family": preset.family,
        "dtype": preset.dtype,
        "request": request,
        "identity_version": identity_version,
        "salt": salt,
    }
    if profile is not None and not profile.is_eager:
        payload["profile"] = profile.model_dump(mode="json", exclude={"name", "description"})
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def expand(suite: Suite, names: dict[str, str], fingerprints: dict[str, str]) -> list[Cell]:
    """Every cell of the grid, in a stable order.

    ``names``: display name per character id ({name} in prompts); ``fingerprints``: identity
    fingerprint per character id (registry version + reference digests), in identity cells' keys.
    """
    from imagegen.pipelines.presets import get_preset
    from imagegen.pipelines.profiles import profile_for

    cells: list[Cell] = []
    for preset_name in suite.presets:
        preset = get_preset(preset_name)
        profile = profile_for(preset, suite.profile)
        d = preset.defaults
        width = suite.size.width if suite.size else d.width
        height = suite.size.height if suite.size else d.height
        steps = suite.steps or d.steps
        guidance = d.guidance if suite.guidance is None else suite.guidance
        for method in suite.methods:
            weights: list[float | None] = list(method.weights) if method.uses_identity else [None]
            for weight in weights:
                for character in suite.characters:
                    for p_index, prompt in enumerate(suite.prompts):
                        text = prompt.text.replace("{name}", names.get(character.id, character.id))
                        for seed in suite.seeds:
                            request: dict[str, Any] = {
                                "prompt": text,
                                "negative_prompt": prompt.negative,
                                "seed": seed,
                                "width": width,
                                "height": height,
                                "steps": steps,
                                "guidance": guidance,
                            }
                            if method.uses_identity:
                                request.update(
                                    character=character.id,
                                    identity_weight=weight,
                                    identity_start_step=method.start_step,
                                    method=method.request_method,
                                )
                            version = fingerprints.get(character.id) if method.uses_identity else None
                            tags = {
                                **prompt.tags.as_dict(),
                                "preset": preset_name,
                                "method": method.name,
                                "prompt": suite.prompt_id(p_index),
                            }
                            if weight is not None:
                                tags["weight"] = f"{weight:g}"
                            cells.append(
                                Cell(
                                    preset=preset_name,
                                    character=character.id,
                                    method=method.name,
                                    weight=weight,
                                    prompt_id=suite.prompt_id(p_index),
                                    seed=seed,
                                    request=request,
                                    tags=tags,
                                    key=cell_key(preset, request, version, suite.cache_salt, profile),
                                )
                            )
    return cells
