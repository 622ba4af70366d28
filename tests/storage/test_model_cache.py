"""Models on many nodes: a renderer replica never downloads; a node without the preset's files fails at load
with one line naming the command to run on that node.

The replica's constructor (``RendererActor``, what ``RendererDeployment`` builds on every node) runs against a
model cache with nothing in it, downloads allowed (the default): it refuses before loading anything.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from imagegen.errors import ModelNotAvailableError
from imagegen.serve.actors import RendererActor
from imagegen.settings import get_settings


def test_a_replica_without_the_model_fails_at_load_naming_models_pull_on_this_node(
    isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "node-cache"
    monkeypatch.setenv("IMAGEGEN_MODEL_CACHE_DIR", str(empty))
    monkeypatch.setenv("IMAGEGEN_ALLOW_DOWNLOADS", "true")
    get_settings.cache_clear()
    with pytest.raises(ModelNotAvailableError) as info:
        RendererActor("flux-dev", warmup=False, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert "run `imagegen models pull flux-dev` on this node" in message
    assert socket.gethostname() in message and "IMAGEGEN_MODEL_CACHE_DIR" in message
    assert not empty.exists() or not any(p.is_file() for p in empty.rglob("*"))  # nothing was fetched
