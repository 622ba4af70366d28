"""The asset manifest and store: the production path runs on stand-ins laid out exactly like the released files.

The main test lays every stand-in into a hub-style cache under the real repository ids and file names (what
`imagegen models pull` would have fetched), then renders a preset whose asset names are the real ones (tiny base
weights) with PuLID-FLUX, PuLID-SDXL and each IP-Adapter method, downloads disabled. The EVA `.pt`, BiSeNet `.pth`
and FaceID `.bin` go through the pickle conversion, the buffalo_l zip through unpacking.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from imagegen.errors import ModelNotAvailableError, UnsafeCheckpointError
from imagegen.identity.characters import approve_character, register_character
from imagegen.identity.provider import identity_renderer
from imagegen.identity.registry import Registry
from imagegen.pipelines.assets import (
    AssetError,
    AssetStore,
    load_manifest,
    method_files,
    preflight,
    pull,
    read_tensor_pickle,
    store_for,
)
from imagegen.pipelines.presets import get_preset
from imagegen.pipelines.types import RenderRequest
from imagegen.settings import PROJECT_ROOT, Settings, get_settings
from imagegen.standins.build import write_hub_layout
from tests.photos import astronaut_set

SYNTHETIC = {"kind": "synthetic", "creator": "tests"}
REAL_NAMED = {
    "named-flux": {"repo": "tiny:flux", "family": "flux", "methods": ["pulid-flux-v0.9.1", "ipadapter-flux"]},
    "named-sdxl": {
        "repo": "tiny:sdxl",
        "family": "sdxl",
        "methods": ["pulid-sdxl-v1.1", "ipadapter-faceid-plusv2-sdxl", "ipadapter-plus-face-sdxl"],
    },
}


@pytest.fixture(scope="module")
def released_layout(tmp_path_factory):
    """A home whose model cache holds every stand-in as `models pull` would have laid out the released files,
    and a models.yaml with presets that use those real asset names (store: hub) over tiny base weights."""
    root = tmp_path_factory.mktemp("released")
    config = yaml.safe_load((PROJECT_ROOT / "configs" / "models.yaml").read_text())
    for name, body in REAL_NAMED.items():
        config["presets"][name] = {
            **body,
            "dtype": "float32",
            "defaults": {"width": 64, "height": 64, "steps": 3, "guidance": 3.5},
            "limits": {"min_size": 16, "max_size": 256, "max_steps": 50},
        }
    models_yaml = root / "models.yaml"
    models_yaml.write_text(yaml.safe_dump(config))
    settings = Settings(home=root / "home", model_cache_dir=root / "models", models_config=models_yaml)
    store = write_hub_layout(settings.model_cache, settings)
    return settings, store, models_yaml


@pytest.fixture
def offline(released_layout, monkeypatch):
    settings, store, models_yaml = released_layout
    monkeypatch.setenv("IMAGEGEN_HOME", str(settings.home))
    monkeypatch.setenv("IMAGEGEN_MODEL_CACHE_DIR", str(settings.model_cache))
    monkeypatch.setenv("IMAGEGEN_MODELS_CONFIG", str(models_yaml))
    monkeypatch.setenv("IMAGEGEN_ALLOW_DOWNLOADS", "false")
    get_settings.cache_clear()
    yield get_settings(), store
    get_settings.cache_clear()


def test_stand_ins_sit_under_the_real_repo_ids_and_file_names(offline):
    settings, store = offline
    hub = settings.model_cache / "hub"
    for path in (
        "models--guozinan--PuLID/snapshots/*/pulid_flux_v0.9.1.safetensors",
        "models--QuanSun--EVA-CLIP/snapshots/*/EVA02_CLIP_L_336_psz14_s6B.pt",
        "models--DIAMONIK7777--antelopev2/snapshots/*/glintr100.onnx",
        "models--h94--IP-Adapter/snapshots/*/models/image_encoder/model.safetensors",
        "models--h94--IP-Adapter-FaceID/snapshots/*/ip-adapter-faceid-plusv2_sdxl.bin",
        "models--XLabs-AI--flux-ip-adapter/snapshots/*/ip_adapter.safetensors",
    ):
        assert list(hub.glob(path)), path
    downloads = settings.model_cache / "downloads" / "github.com"
    assert (downloads / "xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth").is_file()
    assert (downloads / "deepinsight/insightface/releases/download/v0.7/buffalo_l.zip").is_file()
    # pickles as released: tensors only, readable without unpickling code
    eva = next(hub.glob("models--QuanSun--EVA-CLIP/snapshots/*/EVA02_CLIP_L_336_psz14_s6B.pt"))
    assert all(k.startswith("visual.") for k in read_tensor_pickle(eva))


def test_released_names_render_with_every_method_offline(offline):
    settings, store = offline
    preset = get_preset("named-flux")
    # nothing converted yet: the pre-flight names the exact pull command, before anything loads
    with pytest.raises(ModelNotAvailableError, match=r"eva02-clip-l-336 \(needs conversion\).*imagegen models pull"):
        preflight(preset, ["pulid-flux-v0.9.1"])
    for name in REAL_NAMED:
        states = pull(get_preset(name))  # downloads disabled: nothing is fetched, pickles converted, zip unpacked
        assert set(states.values()) <= {"present", "converted"}, states
    assert pull(preset) == pull(preset)  # idempotent
    with Registry.open(settings) as registry:
        register_character(registry, character_id="mia", name="Mia", provenance=SYNTHETIC, files=list(astronaut_set(3)))
        approve_character(registry, "mia")
        for name, body in REAL_NAMED.items():
            renderer = identity_renderer(name, registry)
            [plain] = renderer.render([RenderRequest(prompt="a cafe", seed=3)])
            for method in body["methods"]:
                [out] = renderer.render([RenderRequest(prompt="a cafe", seed=3, character="mia", method=method)])
                assert out.ok and out.metadata()["method"] == method
                difference = np.abs(np.asarray(out.image, np.int16) - np.asarray(plain.image, np.int16)).sum()
                assert difference > 0, f"{method} changed nothing"
                files = method_files(renderer.preset, method)
                assert all(settings.model_cache in p.parents or "site-packages" in str(p) for p in files.paths.values())
    converted = settings.model_cache / "converted"
    assert {p.name for p in converted.glob("*/*.safetensors")} == {
        "EVA02_CLIP_L_336_psz14_s6B.safetensors",
        "parsing_bisenet.safetensors",
        "ip-adapter-faceid-plusv2_sdxl.safetensors",
    }


def test_conversion_is_redone_when_the_released_file_changes(offline, tmp_path):
    settings, _ = offline
    store = AssetStore(tmp_path / "cache")
    write_hub_layout(store.root, settings, ["eva02-clip-l-336"])
    asset = load_manifest().assets["eva02-clip-l-336"]
    assert store.state(asset) == "needs conversion"
    first = store.convert(asset)
    assert store.state(asset) == "converted" and store.convert(asset) == first
    (pt,) = store.fetched_files(asset)
    torch.save({"visual.pos_embed": torch.zeros(1, 2, 3)}, pt)  # a different file appears at the same place
    assert store.state(asset) == "needs conversion"


def test_code_in_a_pickle_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        read_tensor_pickle(path)


def test_a_wrong_digest_removes_the_file(offline, tmp_path):
    settings, _ = offline
    store = AssetStore(tmp_path / "cache")
    write_hub_layout(store.root, settings, ["pulid-flux-v0.9.1"])
    asset = (
        load_manifest()
        .assets["pulid-flux-v0.9.1"]
        .model_copy(update={"sha256": {"pulid_flux_v0.9.1.safetensors": "0" * 64}})
    )
    with pytest.raises(AssetError, match="not the published"):
        store._check_digests(asset)
    assert store.fetched_files(asset) is None


def test_licence_must_be_accepted_before_fetching(isolated_home, monkeypatch):
    monkeypatch.setenv("IMAGEGEN_ALLOW_DOWNLOADS", "false")
    get_settings.cache_clear()
    preset = get_preset("flux-dev")
    with pytest.raises(ModelNotAvailableError, match=r"licence accepted first.*--accept-licence"):
        pull(preset, ["ipadapter-flux"])
    asset = load_manifest().assets["xlabs-flux-ip-adapter"]
    assert store_for(preset).state(asset) == "licence pending"
    with pytest.raises(ModelNotAvailableError, match="downloads are disabled"):
        pull(preset, ["ipadapter-flux"], accept_licence=True)


def run_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imagegen.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_render_with_nothing_pulled_is_one_line_naming_models_pull(isolated_home, tmp_path):
    import os

    env = {**os.environ, "IMAGEGEN_HOME": str(isolated_home), "IMAGEGEN_MODEL_CACHE_DIR": str(tmp_path / "empty")}
    env["IMAGEGEN_ALLOW_DOWNLOADS"] = "false"
    result = run_cli("render", "--preset", "flux-dev", "--character", "mia", "--prompt", "x", env=env)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "imagegen models pull flux-dev --method pulid-flux-v0.9.1" in lines[0]
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").rglob("*.safetensors"))


def test_models_show_lists_methods_and_asset_states(isolated_home):
    import os

    result = run_cli("models", "show", "sdxl-base", env={**os.environ, "COLUMNS": "250"})
    assert result.returncode == 0, result.stderr
    for text in ("pulid-sdxl-v1.1", "eva02-clip-l-336", "licence pending", "missing", "buffalo_l"):
        assert text in result.stdout


def test_no_full_unpickling_anywhere_in_the_package():
    package = Path(__file__).resolve().parents[2] / "imagegen"
    offenders = []
    for path in package.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"torch\.load\(", line) and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(package)}:{number}")
    assert offenders == []


class _RangeServer:
    """A real HTTP server for one file, honouring ``Range`` (as GitHub's release CDN does); counts bytes served."""

    def __init__(self, data: bytes):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server interface
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                body = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                server.served += len(body)

            def log_message(self, *args):
                pass

        self.served = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/releases/v1/pack.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_url_download_resumes_unpacks_and_checks_its_digest(tmp_path):
    import hashlib
    import io
    import zipfile

    from imagegen.pipelines.assets import Asset

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("pack/det.onnx", b"d" * 300_000)
        zf.writestr("pack/rec.onnx", b"r" * 300_000)
    data = buffer.getvalue()
    server = _RangeServer(data)
    try:
        asset = Asset(
            id="pack",
            url={"url": server.url, "unpack": "zip", "files": ["det.onnx", "rec.onnx"]},
            format="onnx",
            sha256={"pack.zip": hashlib.sha256(data).hexdigest()},
        )
        store = AssetStore(tmp_path / "cache")
        target = store.download_path(asset)
        target.parent.mkdir(parents=True)
        half = len(data) // 2
        target.with_name(target.name + ".part").write_bytes(data[:half])  # an interrupted earlier pull
        files = store.fetch(asset, allow_downloads=True)
        assert server.served == len(data) - half  # only the rest came over the wire
        assert [p.name for p in files] == ["det.onnx", "rec.onnx"] and store.path(asset).name == "pack"
        assert store.fetch(asset, allow_downloads=True) == files and server.served == len(data) - half  # idempotent
        # the same archive with a wrong published digest is removed, never unpacked
        bad = asset.model_copy(update={"id": "bad", "sha256": {"pack.zip": "0" * 64}})
        other = AssetStore(tmp_path / "other")
        with pytest.raises(AssetError, match="not the published"):
            other.fetch(bad, allow_downloads=True)
        assert not other.download_path(bad).exists() and other.fetched_files(bad) is None
    finally:
        server.close()


def test_an_archive_with_paths_outside_its_folder_is_refused(tmp_path):
    import io
    import zipfile

    from imagegen.pipelines.assets import Asset

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("../../escaped.onnx", b"x")
    server = _RangeServer(buffer.getvalue())
    try:
        asset = Asset(id="evil", url={"url": server.url, "unpack": "zip", "files": ["escaped.onnx"]}, format="onnx")
        store = AssetStore(tmp_path / "cache")
        with pytest.raises(AssetError, match="unsafe member path"):
            store.fetch(asset, allow_downloads=True)
        assert not list(tmp_path.rglob("escaped.onnx"))
    finally:
        server.close()


def test_the_age_gate_finds_the_pulled_packs_genderage_model(offline):
    """A pack fetched by `models pull` serves the registration age gate too; a stand-in one never vouches."""
    from imagegen.identity.safeguards import find_age_estimator

    settings, _ = offline
    estimator = find_age_estimator(settings)
    assert estimator is not None and estimator.is_standin and "standin" in estimator.name
    assert settings.model_cache in estimator.model_file.parents
