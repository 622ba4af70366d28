"""Write the tiny presets' stand-ins into an asset store, in the released formats, file names and repository ids.

This is the one place that knows about stand-ins. The asset store calls :func:`write_standins` for a tiny preset
(``store: tiny``) with the assets it lacks; each is written as its publisher released it:

=============================  ========================================================================
asset                          what is written, and where (hub layout: ``models--owner--repo/snapshots``)
=============================  ========================================================================
pulid-flux-v0.9.1 / -sdxl-v1.1  safetensors under ``guozinan/PuLID``
eva02-clip-l-336               a tensor-only ``EVA02_CLIP_L_336_psz14_s6B.pt`` (``visual.*`` keys) under
                               ``QuanSun/EVA-CLIP``; the store converts it like the released pickle
facexlib-bisenet               a tensor-only ``parsing_bisenet.pth`` at its release URL's download path
antelopev2                     ``scrfd_10g_bnkps.onnx``, ``glintr100.onnx``, ``genderage.onnx`` under
                               ``DIAMONIK7777/antelopev2``
buffalo_l                      ``buffalo_l.zip`` at its release URL's download path (the store unpacks it)
IP-Adapter files               the h94 / XLabs files (FaceID-PlusV2 as its released pickle ``.bin``)
image encoders                 ``config.json`` + ``model.safetensors`` folders under ``h94/IP-Adapter`` and
                               ``openai/clip-vit-large-patch14``
=============================  ========================================================================

The face models are ONNX stand-ins (:mod:`imagegen.standins.faces`), marked as such in their metadata: the
detector looks at the pixels, the recognizer is a fixed random projection, and the age model never vouches for
anyone (a stand-in estimator cannot make the age gate pass).
"""

from __future__ import annotations

import io
import logging
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import onnx
import torch

from imagegen.files import atomic_write
from imagegen.pipelines.assets import Asset, AssetStore
from imagegen.settings import Settings
from imagegen.standins import faces as face_standins
from imagegen.standins import identity as tiny

log = logging.getLogger(__name__)

#: bumped whenever a stand-in changes; a tiny store written by another version is rebuilt
STANDIN_VERSION = 1
#: the commit the stand-ins' hub snapshots are filed under
STANDIN_COMMIT = "1" * 40
BISENET_SEED = 1234
ENCODER_SEEDS = {"clip-vit-h-14-image-encoder": 9101, "clip-vit-large-patch14": 9102}
RECOGNIZER_SEEDS = {"antelopev2": 0, "buffalo_l": 600}


def write_standins(store: AssetStore, assets: list[Asset], settings: Settings) -> None:
    """Write each of ``assets`` (manifest entries) into ``store`` as its publisher released it."""
    for asset in assets:
        writer = WRITERS.get(asset.id)
        if writer is None:
            raise KeyError(f"no stand-in is known for asset {asset.id!r}; tiny presets can only use {sorted(WRITERS)}")
        log.info("writing the tiny stand-in of %s", asset.id)
        files = writer(settings)
        if asset.hub is not None:
            for name in asset.hub.files:
                place_in_hub_cache(store.hub_dir, asset.hub.repo, name, files[name])
        else:
            _write_bytes(store.download_path(asset), files[asset.url.file_name])


def place_in_hub_cache(hub_dir: Path, repo: str, filename: str, data: bytes) -> Path:
    """``data`` as ``filename`` of ``repo`` in a hub cache (``models--owner--name/snapshots/<commit>/...``)."""
    repo_dir = hub_dir / ("models--" + repo.replace("/", "--"))
    target = repo_dir / "snapshots" / STANDIN_COMMIT / filename
    _write_bytes(target, data)
    _write_bytes(repo_dir / "refs" / "main", STANDIN_COMMIT.encode())
    return target


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


# what each asset's files are ------------------------------------------------------------------------------------


def _safetensors(tensors: dict, metadata: dict | None = None) -> bytes:
    from imagegen.identity.pulid.weights import save_safetensors

    with tempfile.TemporaryDirectory() as folder:
        path = save_safetensors(tensors, Path(folder) / "weights.safetensors", metadata)
        return path.read_bytes()


def _pickle(obj) -> bytes:
    """A tensor-only pickle, as ``torch.save`` writes released checkpoints."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _onnx(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def _tiny_unet():
    """The tiny SDXL preset's UNet architecture (meta device), read from its repo's config."""
    from diffusers import UNet2DConditionModel

    from imagegen.pipelines.tiny import ensure_tiny_repo

    config = UNet2DConditionModel.load_config(str(ensure_tiny_repo("sdxl") / "unet"))
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _tiny_flux_config() -> dict:
    from diffusers import FluxTransformer2DModel

    from imagegen.pipelines.tiny import ensure_tiny_repo

    return dict(FluxTransformer2DModel.load_config(str(ensure_tiny_repo("flux") / "transformer")))


def _pulid_flux(settings: Settings) -> dict[str, bytes]:
    tensors, metadata = tiny.tiny_pulid_flux_state_dict()
    return {"pulid_flux_v0.9.1.safetensors": _safetensors(tensors, metadata)}


def _pulid_sdxl(settings: Settings) -> dict[str, bytes]:
    tensors, metadata = tiny.tiny_pulid_sdxl_state_dict(_tiny_unet())
    return {"pulid_v1.1.safetensors": _safetensors(tensors, metadata)}


def _eva_clip(settings: Settings) -> dict[str, bytes]:
    return {"EVA02_CLIP_L_336_psz14_s6B.pt": _pickle(tiny.tiny_eva_clip_state_dict())}


def _bisenet(settings: Settings) -> dict[str, bytes]:
    from facexlib.parsing.bisenet import BiSeNet

    torch.manual_seed(BISENET_SEED)
    state = {k: v.contiguous() for k, v in BiSeNet(num_class=19).state_dict().items()}
    return {"parsing_bisenet.pth": _pickle(state)}


def _pack_models(pack: str) -> dict[str, bytes]:
    detector, recognizer = face_standins.PACK_FILES[pack]
    return {
        detector: _onnx(face_standins.pixel_scrfd_detector_model()),
        recognizer: _onnx(face_standins.arcface_recognizer_model(seed=RECOGNIZER_SEEDS[pack])),
        "genderage.onnx": _onnx(face_standins.genderage_model()),
    }


def _antelopev2(settings: Settings) -> dict[str, bytes]:
    return _pack_models("antelopev2")


def _buffalo_l(settings: Settings) -> dict[str, bytes]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in _pack_models("buffalo_l").items():
            zf.writestr(name, data)
    return {"buffalo_l.zip": buffer.getvalue()}


def _plus_face(settings: Settings) -> dict[str, bytes]:
    tensors = tiny.tiny_plus_face_state_dict(_tiny_unet())
    return {"sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors": _safetensors(tensors)}


def _faceid(settings: Settings) -> dict[str, bytes]:
    flat = tiny.tiny_faceid_state_dict(_tiny_unet())
    nested: dict[str, dict] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        group, _, rest = key.partition(".")
        nested[group][rest] = value
    return {"ip-adapter-faceid-plusv2_sdxl.bin": _pickle(nested)}


def _xlabs_flux(settings: Settings) -> dict[str, bytes]:
    return {"ip_adapter.safetensors": _safetensors(tiny.tiny_xlabs_flux_state_dict(_tiny_flux_config()))}


def _encoder_folder(build: Callable, seed: int, prefix: str) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as folder:
        build(seed).save_pretrained(folder, safe_serialization=True)
        return {f"{prefix}{name}": (Path(folder) / name).read_bytes() for name in ("config.json", "model.safetensors")}


def _clip_vit_h(settings: Settings) -> dict[str, bytes]:
    return _encoder_folder(tiny.tiny_clip_vision, ENCODER_SEEDS["clip-vit-h-14-image-encoder"], "models/image_encoder/")


def _clip_vit_l(settings: Settings) -> dict[str, bytes]:
    return _encoder_folder(tiny.tiny_clip_model, ENCODER_SEEDS["clip-vit-large-patch14"], "")


WRITERS: dict[str, Callable[[Settings], dict[str, bytes]]] = {
    "pulid-flux-v0.9.1": _pulid_flux,
    "pulid-sdxl-v1.1": _pulid_sdxl,
    "eva02-clip-l-336": _eva_clip,
    "facexlib-bisenet": _bisenet,
    "antelopev2": _antelopev2,
    "buffalo_l": _buffalo_l,
    "ipadapter-plus-face-sdxl": _plus_face,
    "ipadapter-faceid-plusv2-sdxl": _faceid,
    "xlabs-flux-ip-adapter": _xlabs_flux,
    "clip-vit-h-14-image-encoder": _clip_vit_h,
    "clip-vit-large-patch14": _clip_vit_l,
}


def write_hub_layout(root: Path, settings: Settings, asset_ids: list[str] | None = None) -> AssetStore:
    """Lay every stand-in (or ``asset_ids``) into ``root`` exactly as ``imagegen models pull`` would have fetched the
    released files: a store the loaders cannot tell from a real one (used by tests of the production path)."""
    from imagegen.pipelines.assets import load_manifest

    manifest = load_manifest(settings)
    store = AssetStore(root, remote=True)
    chosen = [manifest.assets[a] for a in (asset_ids or WRITERS)]
    write_standins(store, chosen, settings)
    return store
