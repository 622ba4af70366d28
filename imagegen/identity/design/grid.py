"""The design flow's prompts and turnaround grid, read from ``configs/turnaround.yaml``.

A turnaround is a set of *slots*, each one identity-conditioned render of the artist's pick: a
view (front, three-quarter left/right, profile; each with a nominal yaw), an expression and a
lighting. The grid is data, not code, so a studio can add views or lighting setups without a
release; a request may name one of the file's grids or give its own slots from the same
vocabulary. Prompts are filled from the character card (empty fields drop out cleanly).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from imagegen.errors import ConfigError, ImagegenError
from imagegen.identity.models import Card
from imagegen.settings import PROJECT_ROOT

DEFAULT_GRID_FILE = PROJECT_ROOT / "configs" / "turnaround.yaml"
#: the most slots one turnaround may render (one batched job)
MAX_SLOTS = 16
_FIELD = re.compile(r"\{(\w+)\}")


class InvalidGridError(ImagegenError):
    """A turnaround grid (named or given) that the grid file does not allow."""

    code = "invalid_grid"
    field = "grid"


@dataclass(frozen=True)
class View:
    name: str
    yaw: float
    prompt: str


@dataclass(frozen=True)
class Slot:
    """One cell of a turnaround: which view, expression and lighting it renders."""

    view: str
    expression: str
    lighting: str

    def to_dict(self) -> dict[str, str]:
        return {"view": self.view, "expression": self.expression, "lighting": self.lighting}


@dataclass(frozen=True)
class Prompts:
    prompt: str
    negative_prompt: str


@dataclass(frozen=True)
class GridConfig:
    """Everything ``configs/turnaround.yaml`` says."""

    portrait: Prompts
    turnaround: Prompts
    identity_weight: float
    views: dict[str, View]
    expressions: dict[str, str]
    lighting: dict[str, str]
    grids: dict[str, tuple[Slot, ...]]
    analysable_yaw: dict[str, float]

    # -- prompts -----------------------------------------------------------------------------------
    def portrait_prompt(self, name: str, card: Card) -> Prompts:
        """The candidates' prompt: a plain portrait built from the card."""
        return Prompts(fill(self.portrait.prompt, _card_fields(name, card)), self.portrait.negative_prompt)

    def slot_prompt(self, name: str, card: Card, slot: Slot) -> Prompts:
        """One turnaround slot's prompt: the card plus the slot's view, expression and lighting."""
        fields = {
            **_card_fields(name, card),
            "view": self.views[slot.view].prompt,
            "expression": self.expressions[slot.expression],
            "lighting": self.lighting[slot.lighting],
        }
        return Prompts(fill(self.turnaround.prompt, fields), self.turnaround.negative_prompt)

    # -- grids -------------------------------------------------------------------------------------
    def resolve(self, grid: str | dict | list | None) -> tuple[Slot, ...]:
        """The slots of ``grid``: a grid's name (None: ``default``), or ``{"slots": [[view, expression,
        lighting], ...]}`` (a bare list works too) using this file's views, expressions and lighting."""
        if grid is None:
            grid = "default"
        if isinstance(grid, str):
            if grid not in self.grids:
                raise InvalidGridError(f"no turnaround grid {grid!r}; the grids are: {', '.join(self.grids)}")
            return self.grids[grid]
        raw = grid.get("slots") if isinstance(grid, dict) else grid
        if isinstance(grid, dict) and set(grid) - {"slots"}:
            raise InvalidGridError("a grid override has one key, slots: [[view, expression, lighting], ...]")
        if not isinstance(raw, list) or not raw:
            raise InvalidGridError("a grid override needs slots: a non-empty list of [view, expression, lighting]")
        return self._slots(raw, "grid")

    def _slots(self, raw: list, where: str) -> tuple[Slot, ...]:
        if len(raw) > MAX_SLOTS:
            raise InvalidGridError(f"{where} has {len(raw)} slots; a turnaround renders at most {MAX_SLOTS}")
        slots = []
        for i, item in enumerate(raw):
            if not (isinstance(item, list | tuple) and len(item) == 3 and all(isinstance(v, str) for v in item)):
                raise InvalidGridError(f"{where} slot {i} must be [view, expression, lighting] (three names)")
            view, expression, lighting = item
            for value, known, what in (
                (view, self.views, "view"),
                (expression, self.expressions, "expression"),
                (lighting, self.lighting, "lighting"),
            ):
                if value not in known:
                    raise InvalidGridError(
                        f"{where} slot {i}: unknown {what} {value[:40]!r}; known: {', '.join(known)}"
                    )
            slots.append(Slot(view, expression, lighting))
        return tuple(slots)

    def analysable(self, view: str, backend_family: str) -> bool:
        """Whether the face backend's detector can analyse this view (|yaw| within its range)."""
        limit = self.analysable_yaw.get(backend_family, 45.0)
        return abs(self.views[view].yaw) <= limit


def _card_fields(name: str, card: Card) -> dict[str, str]:
    return {"name": name, "look": card.look, "personality": card.personality, "style_notes": card.style_notes}


def fill(template: str, fields: dict[str, str]) -> str:
    """``template`` with ``{field}`` replaced; empty values drop out with their separating comma."""
    text = _FIELD.sub(lambda m: " ".join(str(fields.get(m.group(1), "")).split()), template)
    parts = [p.strip() for p in text.split(",")]
    return ", ".join(p for p in parts if p)


def _prompts(data: Any, where: str) -> Prompts:
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
        raise ConfigError(f"{where} needs a prompt (and an optional negative_prompt)")
    return Prompts(data["prompt"], str(data.get("negative_prompt", "")))


def parse_grid_config(data: Any, source: str = "turnaround.yaml") -> GridConfig:
    """A ``GridConfig`` from the YAML's data; ``ConfigError`` naming what is wrong."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping")
    try:
        views = {
            str(name): View(str(name), float(v["yaw"]), str(v["prompt"])) for name, v in (data["views"] or {}).items()
        }
        expressions = {str(k): str(v) for k, v in (data["expressions"] or {}).items()}
        lighting = {str(k): str(v) for k, v in (data["lighting"] or {}).items()}
        analysable = {str(k): float(v) for k, v in (data.get("analysable_yaw") or {}).items()}
        turnaround = data["turnaround"]
        weight = float(turnaround.get("identity_weight", 1.0))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: missing or malformed entry ({exc})") from None
    if not views or not expressions or not lighting:
        raise ConfigError(f"{source}: views, expressions and lighting must each name at least one entry")
    config = GridConfig(
        portrait=_prompts(data.get("portrait"), f"{source}: portrait"),
        turnaround=_prompts(turnaround, f"{source}: turnaround"),
        identity_weight=weight,
        views=views,
        expressions=expressions,
        lighting=lighting,
        grids={},
        analysable_yaw=analysable,
    )
    grids = {}
    for name, raw in (data.get("grids") or {}).items():
        try:
            grids[str(name)] = config._slots(list(raw or []), f"grid {name!r}")
        except InvalidGridError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    if "default" not in grids:
        raise ConfigError(f"{source}: grids must define `default`")
    return GridConfig(**{**config.__dict__, "grids": grids})


@lru_cache(maxsize=4)
def _load(path: str, mtime_ns: int) -> GridConfig:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the turnaround grid {path}: {exc}") from None
    return parse_grid_config(data, Path(path).name)


def load_grid_config(path: str | Path | None = None) -> GridConfig:
    """The grid file (default ``configs/turnaround.yaml``), parsed once per change of the file."""
    chosen = Path(path) if path is not None else DEFAULT_GRID_FILE
    try:
        mtime = chosen.stat().st_mtime_ns
    except OSError as exc:
        raise ConfigError(f"cannot read the turnaround grid {chosen}: {exc.strerror or exc}") from None
    return _load(str(chosen), mtime)
