"""Small deterministic test data: PNG bytes made with Pillow and fake face analyses."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from imagegen.identity.models import ReferenceInput

DIM = 8


def png_bytes(seed: int, size: tuple[int, int] = (12, 10)) -> bytes:
    """A small PNG whose pixels depend on ``seed`` (different seeds, different bytes)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def embedding(seed: int, dim: int = DIM) -> np.ndarray:
    vec = np.random.default_rng(10_000 + seed).standard_normal(dim).astype(np.float32)
    return vec / np.linalg.norm(vec)


def fake_face(seed: int, dim: int = DIM) -> dict[str, Any]:
    rng = np.random.default_rng(20_000 + seed)
    return {
        "bbox": np.array([1.0, 2.0, 9.0, 8.0], dtype=np.float32),
        "landmarks": rng.uniform(0, 10, size=(5, 2)).astype(np.float32),
        "det_score": np.float32(0.5 + 0.4 * rng.random()),
        "embedding": embedding(seed, dim),
        "model_version": "fake-face-1",
        "quality": {"sharpness": float(rng.random()), "yaw": float(rng.uniform(-30, 30))},
    }


def make_refs(n: int, start: int = 0, backends: tuple[str, ...] = ("dlib",)) -> list[ReferenceInput]:
    return [
        ReferenceInput(
            data=png_bytes(seed),
            filename=f"ref_{seed:03d}.png",
            faces={backend: fake_face(seed + 1000 * k) for k, backend in enumerate(backends)},
        )
        for seed in range(start, start + n)
    ]


def make_character(character_id: str = "mia", **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": character_id,
        "name": character_id.capitalize(),
        "card": {
            "look": "short red hair, green eyes, freckles",
            "personality": "curious, dry humour",
            "style_notes": "soft light, 35mm film look",
            "extra": {"palette": ["red", "teal"], "height_cm": 168},
        },
        "provenance": {
            "kind": "synthetic",
            "creator": "art-team",
            "date": "2024-05-01",
            "evidence": "generated from text prompts only",
        },
    }
    data.update(overrides)
    return data
