"""The asset manifest and the store that fetches, converts and checks every file a method needs.

``configs/assets.yaml`` declares each file an identity method needs once: where it is published (a hub
repository, a URL, or a Python package installed with imagegen), its format, licence, digest where known and
the conversion it needs. An :class:`AssetStore` is one model-cache directory laid out like the hub's own cache;
``imagegen models pull`` fills it (:func:`pull`), ``imagegen models show`` reads it (:meth:`AssetStore.state`),
and the identity methods get their files from it through :func:`method_files`, which checks every asset
*before* anything is loaded and fails with one line naming the ``models pull`` command.

Where a preset's files come from is the only thing that differs between presets: real presets use the store
at ``<model cache>`` (files downloaded from the hub); tiny presets use the store at ``<model cache>/tiny``,
into which a builder writes stand-ins in the released formats and file names, under the same repository ids.
The loaders that read them cannot tell the difference, and neither can the code that calls them.

Pickle checkpoints (``.pt``/``.pth``/``.bin``) are converted once to safetensors with
``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only; nothing is ever fully
unpickled, and an unconverted pickle is never handed to a loader.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from imagegen.errors import ConfigError, ImagegenError, ModelNotAvailableError, UnsafeCheckpointError
from imagegen.files import atomic_write
from imagegen.pipelines.presets import Preset, is_available_locally, read_yaml_config
from imagegen.settings import PROJECT_ROOT, Settings, get_settings

log = logging.getLogger(__name__)

DEFAULT_ASSETS_CONFIG = PROJECT_ROOT / "configs" / "assets.yaml"
#: the module that writes the tiny presets' stand-ins, found by name (as diffusers finds component classes):
#: it sits above the pipelines, beside the tiny model builder, and is the only code that knows about stand-ins
STANDIN_BUILDER = "imagegen.standins.build:write_standins"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: bumped when the conversion changes; older conversions are redone
CONVERTER_VERSION = 1

AssetState = Literal["present", "converted", "needs conversion", "needs unpacking", "missing", "licence pending"]


class AssetError(ImagegenError):
    """An asset that is corrupt, has the wrong digest, or cannot be converted."""

    code = "asset_error"


# --------------------------------------------------------------------------------------------- manifest


class HubSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo: str
    files: list[str] = Field(min_length=1)
    revision: str = "main"


class UrlSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str
    #: ``zip``: extract the download; ``files`` are the members that must be in it
    unpack: Literal["zip"] | None = None
    files: list[str] = Field(default_factory=list)

    @property
    def file_name(self) -> str:
        return Path(urlparse(self.url).path).name


class PackageSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    module: str


class Asset(BaseModel):
    """One entry of ``configs/assets.yaml``."""

    model_config = ConfigDict(extra="forbid")

    id: str
    description: str = ""
    hub: HubSource | None = None
    url: UrlSource | None = None
    package: PackageSource | None = None
    format: Literal["safetensors", "torch-pickle", "onnx", "transformers-folder", "python-package"]
    convert: Literal["safetensors"] | None = None
    sha256: dict[str, str] = Field(default_factory=dict)
    licence: str = ""
    non_commercial: bool = False
    gated: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> Asset:
        sources = [s for s in (self.hub, self.url, self.package) if s is not None]
        if len(sources) != 1:
            raise ValueError("an asset needs exactly one of hub, url, package")
        if self.convert and self.format != "torch-pickle":
            raise ValueError("only torch-pickle assets are converted")
        if self.format == "torch-pickle" and not self.convert:
            raise ValueError("a torch-pickle asset must declare `convert: safetensors`: pickles are never loaded")
        return self

    @property
    def needs_acceptance(self) -> bool:
        return self.non_commercial or self.gated

    @property
    def source_text(self) -> str:
        if self.hub is not None:
            return f"hub {self.hub.repo}: {', '.join(self.hub.files)}"
        if self.url is not None:
            return self.url.url
        return f"pip package {self.package.name}"


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    assets: dict[str, Asset]
    #: method -> role -> asset id
    methods: dict[str, dict[str, str]]

    @model_validator(mode="after")
    def _known_assets(self) -> Manifest:
        for method, roles in self.methods.items():
            for role, asset in roles.items():
                if asset not in self.assets:
                    raise ValueError(f"method {method} role {role}: unknown asset {asset!r}")
        return self

    def method_assets(self, method: str) -> dict[str, Asset]:
        if method not in self.methods:
            raise ConfigError(f"identity method '{method}' has no entry under `methods:` in the asset manifest")
        return {role: self.assets[asset_id] for role, asset_id in self.methods[method].items()}


@lru_cache(maxsize=4)
def _load_manifest(path: Path) -> Manifest:
    raw = read_yaml_config(path, "assets", "asset manifest", "IMAGEGEN_ASSETS_CONFIG")
    try:
        assets = {name: {"id": name, **(body or {})} for name, body in raw["assets"].items()}
        return Manifest(assets=assets, methods=raw.get("methods") or {})
    except ValidationError as exc:
        raise ConfigError(f"{path} is invalid: {exc}") from exc


def load_manifest(settings: Settings | None = None) -> Manifest:
    """The asset manifest of these settings (``IMAGEGEN_ASSETS_CONFIG``, default ``configs/assets.yaml``)."""
    settings = settings or get_settings()
    return _load_manifest((settings.assets_config or DEFAULT_ASSETS_CONFIG).resolve())


# --------------------------------------------------------------------------------------------- digests

_DIGESTS: dict[tuple[str, int, int], str] = {}
_DIGEST_LOCK = threading.Lock()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (remembered per path, size and mtime within the process)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _DIGEST_LOCK:
        if key in _DIGESTS:
            return _DIGESTS[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _DIGEST_LOCK:
        _DIGESTS[key] = value
    return value


def files_digest(paths: Iterable[Path]) -> str:
    """One digest of several files (of a folder asset, say): the sha256 of their names and digests."""
    parts = [f"{Path(p).name}:{file_sha256(p)}" for p in sorted(paths, key=lambda p: Path(p).name)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- conversion


def read_tensor_pickle(path: Path) -> dict:
    """A pickle checkpoint read with ``torch.load(weights_only=True)``: tensors and plain containers only."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UnsafeCheckpointError(
            f"{path.name} cannot be read as tensors only (torch.load(weights_only=True) refused it: "
            f"{str(exc).splitlines()[0][:200]}); it may hold code, and imagegen never fully unpickles a file"
        ) from exc


def flatten_tensors(loaded) -> dict:
    """Every tensor of a loaded checkpoint under a dotted key (``{"a": {"b": t}}`` -> ``{"a.b": t}``).

    Training wrappers (``state_dict`` / ``model`` / ``module``) are unwrapped first; non-tensor values (step
    counters, configs) are dropped.
    """
    import torch

    for key in ("state_dict", "model", "module"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            out[prefix] = value.contiguous()
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", loaded)
    return out


def convert_pickle_to_safetensors(source: Path, target: Path) -> Path:
    """Convert a trusted-format pickle checkpoint to safetensors (written atomically); the target."""
    from safetensors.torch import save_file

    tensors = flatten_tensors(read_tensor_pickle(source))
    if not tensors:
        raise AssetError(f"{source.name} holds no tensors")
    return atomic_write(target, lambda tmp: save_file(tensors, tmp))


# --------------------------------------------------------------------------------------------- the store


@dataclass
class AssetStore:
    """One model cache: hub files in the hub's cache layout, URL downloads, unpacked archives, conversions.

    ``remote``: whether assets may be fetched into it (the tiny store is written by a builder, never fetched).
    """

    root: Path
    remote: bool = True

    @property
    def hub_dir(self) -> Path:
        return self.root / "hub"

    def download_path(self, asset: Asset) -> Path:
        """Where a URL asset's file is kept (``downloads/<host>/<path>``)."""
        parsed = urlparse(asset.url.url)
        return self.root / "downloads" / parsed.netloc / parsed.path.lstrip("/")

    def _unpacked_dir(self, asset: Asset) -> Path:
        return self.root / "unpacked" / asset.id

    def _converted_path(self, asset: Asset) -> Path:
        return self.root / "converted" / asset.id / (Path(self._source_name(asset)).stem + ".safetensors")

    @staticmethod
    def _source_name(asset: Asset) -> str:
        return asset.hub.files[0] if asset.hub is not None else asset.url.file_name

    # where the fetched files are ---------------------------------------------------------------------------

    def _hub_file(self, asset: Asset, name: str) -> Path | None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(asset.hub.repo, name, cache_dir=str(self.hub_dir), revision=asset.hub.revision)
        return Path(found) if isinstance(found, str) and Path(found).is_file() else None

    def fetched_files(self, asset: Asset) -> list[Path] | None:
        """The asset's files as published (before conversion), or None when any is missing."""
        if asset.hub is not None:
            found = [self._hub_file(asset, name) for name in asset.hub.files]
            return None if any(f is None for f in found) else found
        if asset.url is not None:
            download = self.download_path(asset)
            if asset.url.unpack is None:
                return [download] if download.is_file() else None
            folder = self._unpacked_dir(asset)
            found = [_find_member(folder, name) for name in asset.url.files]
            return None if any(f is None for f in found) else found
        return None

    # what a loader gets ------------------------------------------------------------------------------------

    def state(self, asset: Asset, accepted: bool | None = None) -> AssetState:
        """present / converted / needs conversion / missing / licence pending (missing, not yet accepted)."""
        if asset.package is not None:
            return "present" if importlib.util.find_spec(asset.package.module) is not None else "missing"
        if asset.convert and self._conversion_current(asset):
            return "converted"
        fetched = self.fetched_files(asset)
        if fetched is not None:
            return "needs conversion" if asset.convert else "present"
        if asset.url is not None and asset.url.unpack and self.download_path(asset).is_file():
            return "needs unpacking"
        if self.remote and asset.needs_acceptance and not (accepted or self.licence_accepted(asset)):
            return "licence pending"
        return "missing"

    def path(self, asset: Asset) -> Path:
        """The usable local path: a file (single-file or converted assets) or the folder of a multi-file asset."""
        if asset.package is not None:
            spec = importlib.util.find_spec(asset.package.module)
            if spec is None or spec.origin is None:
                raise ModelNotAvailableError(
                    f"{asset.id} needs the Python package {asset.package.name}: pip install it"
                )
            return Path(spec.origin).parent
        if asset.convert:
            if not self._conversion_current(asset):
                raise ModelNotAvailableError(f"{asset.id} is not converted to safetensors yet")
            return self._converted_path(asset)
        fetched = self.fetched_files(asset)
        if fetched is None:
            raise ModelNotAvailableError(f"{asset.id} is not in {self.root}")
        if len(fetched) == 1 and (asset.url is None or asset.url.unpack is None):
            return fetched[0]
        return Path(os.path.commonpath([str(p.parent) for p in fetched]))

    def files(self, asset: Asset) -> list[Path]:
        """Every file of the usable asset (what its digest covers)."""
        path = self.path(asset)
        if asset.package is not None:
            return sorted(p for p in path.rglob("*.dat") if p.is_file()) or sorted(path.glob("*.py"))
        if path.is_file():
            return [path]
        names = asset.hub.files if asset.hub is not None else asset.url.files
        return [p for p in (path / Path(n).name for n in names) if p.is_file()] or sorted(path.iterdir())

    def digest(self, asset: Asset) -> str:
        """The digest of the usable files: what a cache key of anything computed from the asset is made of."""
        return files_digest(self.files(asset))

    # licences ----------------------------------------------------------------------------------------------

    @property
    def _licence_file(self) -> Path:
        return self.root / "licences.json"

    def _licences(self) -> dict:
        try:
            return json.loads(self._licence_file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def licence_accepted(self, asset: Asset) -> bool:
        return asset.id in self._licences()

    def accept_licence(self, asset: Asset) -> None:
        records = self._licences()
        records[asset.id] = {"licence": asset.licence, "accepted_at": datetime.now(UTC).isoformat()}
        _write_json(self._licence_file, records)

    # fetching, unpacking, converting -----------------------------------------------------------------------

    def fetch(self, asset: Asset, allow_downloads: bool) -> list[Path]:
        """Fetch whatever of the asset is missing (resumable; idempotent); its published files."""
        fetched = self.fetched_files(asset)
        if fetched is not None:
            return fetched
        if asset.package is not None:
            raise ModelNotAvailableError(f"{asset.id}: pip install {asset.package.name}")
        if asset.url is not None and asset.url.unpack and self.download_path(asset).is_file():
            self._check_digests(asset)  # downloaded before, not unpacked yet (an interrupted pull)
            self.unpack(asset)
            return self.fetched_files(asset) or []
        if not self.remote:
            raise ModelNotAvailableError(f"{asset.id} is not in {self.root}, and files are never fetched into it")
        if not allow_downloads:
            raise ModelNotAvailableError(
                f"{asset.id} ({asset.source_text}) is not in {self.root} and downloads are disabled "
                "(IMAGEGEN_ALLOW_DOWNLOADS=false)"
            )
        if asset.hub is not None:
            from huggingface_hub import hf_hub_download

            for name in asset.hub.files:
                try:
                    hf_hub_download(asset.hub.repo, name, revision=asset.hub.revision, cache_dir=str(self.hub_dir))
                except Exception as exc:  # huggingface_hub raises several unrelated types for "not there"
                    hint = " (gated: accept its licence on the hub page and log in with `hf auth login`)"
                    raise ModelNotAvailableError(
                        f"could not download {name} of {asset.hub.repo}: {str(exc).splitlines()[0][:200]}"
                        + (hint if asset.gated else "")
                    ) from exc
        else:
            _download_url(asset.url.url, self.download_path(asset))
        self._check_digests(asset)
        if asset.url is not None and asset.url.unpack == "zip":
            self.unpack(asset)
        fetched = self.fetched_files(asset)
        if fetched is None:
            raise AssetError(f"{asset.id}: fetched, but the expected files are not there ({asset.source_text})")
        return fetched

    def _check_digests(self, asset: Asset) -> None:
        for name, expected in asset.sha256.items():
            path = self._published_file(asset, name)
            if path is not None and file_sha256(path) != expected.lower():
                actual = file_sha256(path)
                path.unlink()
                raise AssetError(
                    f"{asset.id}: {name} has sha256 {actual}, not the published {expected}; the file was removed, "
                    "run `imagegen models pull` again"
                )

    def _published_file(self, asset: Asset, name: str) -> Path | None:
        if asset.hub is not None:
            return self._hub_file(asset, name)
        download = self.download_path(asset)
        return download if download.is_file() else None

    def unpack(self, asset: Asset) -> Path:
        """Extract a zip download into its own folder (members checked for paths outside it first)."""
        archive = self.download_path(asset)
        target = self._unpacked_dir(asset)
        staging = Path(tempfile.mkdtemp(prefix=f".{asset.id}-", dir=_mkdir(target.parent)))
        try:
            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():
                    if member.startswith("/") or ".." in Path(member).parts:
                        raise AssetError(f"{archive.name} has an unsafe member path {member!r}")
                zf.extractall(staging)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        except zipfile.BadZipFile as exc:
            archive.unlink(missing_ok=True)
            raise AssetError(f"{archive.name} is not a valid zip (removed; pull again): {exc}") from exc
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return target

    def _conversion_record(self, asset: Asset) -> Path:
        return self._converted_path(asset).with_suffix(".source.json")

    def _conversion_current(self, asset: Asset) -> bool:
        target = self._converted_path(asset)
        if not target.is_file():
            return False
        try:
            record = json.loads(self._conversion_record(asset).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        if record.get("converter") != CONVERTER_VERSION:
            return False
        fetched = self.fetched_files(asset)
        # the published pickle may have been deleted after conversion; when it is there, it must be the same file
        return fetched is None or record.get("source_sha256") == file_sha256(fetched[0])

    def convert(self, asset: Asset) -> Path:
        """Convert the fetched pickle once; later calls return the conversion while its source is unchanged."""
        target = self._converted_path(asset)
        if self._conversion_current(asset):
            return target
        fetched = self.fetched_files(asset)
        if fetched is None:
            raise ModelNotAvailableError(f"{asset.id} must be fetched before it is converted")
        log.info("converting %s to safetensors (torch.load(weights_only=True))", fetched[0].name)
        convert_pickle_to_safetensors(fetched[0], target)
        _write_json(
            self._conversion_record(asset),
            {"source": fetched[0].name, "source_sha256": file_sha256(fetched[0]), "converter": CONVERTER_VERSION},
        )
        return target


def _find_member(folder: Path, name: str) -> Path | None:
    if not folder.is_dir():
        return None
    direct = folder / name
    if direct.is_file():
        return direct
    return next((p for p in sorted(folder.rglob(Path(name).name)) if p.is_file()), None)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_json(path: Path, data) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True)))


def _download_url(url: str, target: Path) -> None:
    """Download ``url`` to ``target``, resuming a ``.part`` left by an interrupted run; a progress bar."""
    import httpx
    from tqdm import tqdm

    part = target.with_name(target.name + ".part")
    _mkdir(target.parent)
    done = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={done}-"} if done else {}
    try:
        with httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=60.0) as response:
            if response.status_code == 416:  # already complete
                os.replace(part, target)
                return
            response.raise_for_status()
            if done and response.status_code != 206:  # the server ignored the range: start again
                done = 0
            total = int(response.headers.get("content-length", 0)) + done
            with (
                part.open("ab" if done else "wb") as f,
                tqdm(total=total or None, initial=done, unit="B", unit_scale=True, desc=target.name) as bar,
            ):
                for chunk in response.iter_bytes(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except httpx.HTTPError as exc:
        raise ModelNotAvailableError(f"could not download {url}: {exc}") from exc
    os.replace(part, target)


# --------------------------------------------------------------------------------------------- presets


def store_for(preset: Preset, settings: Settings | None = None) -> AssetStore:
    """Where ``preset``'s files come from: the hub-fed model cache, or the tiny stand-ins' own cache."""
    settings = settings or get_settings()
    if preset.store == "tiny":
        return AssetStore(settings.model_cache / "tiny", remote=False)
    return AssetStore(settings.model_cache, remote=True)


def preset_methods(preset: Preset, methods: Iterable[str] | None) -> list[str]:
    """``methods`` checked against the preset (all of its methods when None)."""
    chosen = list(preset.methods) if methods is None else list(methods)
    unknown = [m for m in chosen if m not in preset.methods]
    if unknown:
        raise ConfigError(
            f"preset '{preset.name}' does not support {', '.join(unknown)}; it supports {', '.join(preset.methods)}"
        )
    return chosen


def pull_command(preset: Preset, methods: Iterable[str], accept: bool) -> str:
    parts = ["imagegen models pull", preset.name, *(f"--method {m}" for m in methods)]
    return " ".join(parts + (["--accept-licence"] if accept else []))


def _build_standins(store: AssetStore, assets: list[Asset], settings: Settings) -> None:
    """Have the stand-in builder write the tiny store's missing files (the tiny presets' only difference).

    Stand-ins written by another version of the builder are removed first, so a store never mixes versions.
    """
    module, _, func = STANDIN_BUILDER.partition(":")
    builder_module = importlib.import_module(module)
    marker = store.root / "standins.json"
    version = getattr(builder_module, "STANDIN_VERSION", 0)
    try:
        current = json.loads(marker.read_text()).get("version") == version
    except (OSError, json.JSONDecodeError):
        current = False
    if not current:
        for part in ("hub", "downloads", "unpacked", "converted"):
            shutil.rmtree(store.root / part, ignore_errors=True)
        _write_json(marker, {"version": version})
    missing = [a for a in assets if a.package is None and store.fetched_files(a) is None]
    if missing:
        getattr(builder_module, func)(store, missing, settings)


def pull(
    preset: Preset,
    methods: Iterable[str] | None = None,
    *,
    accept_licence: bool = False,
    settings: Settings | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, AssetState]:
    """Fetch, unpack, convert and check everything ``preset`` needs for ``methods`` (and its base model).

    Idempotent (present files are not fetched again) and resumable (hub downloads and URL ``.part`` files
    continue where they stopped). Returns each asset's state afterwards.
    """
    settings = settings or get_settings()
    chosen = preset_methods(preset, methods)
    manifest = load_manifest(settings)
    store = store_for(preset, settings)
    assets = _unique(a for m in chosen for a in manifest.method_assets(m).values())
    pending = [a for a in assets if store.remote and store.state(a, accepted=accept_licence) == "licence pending"]
    if pending:
        raise ModelNotAvailableError(
            "these assets need their licence accepted first: "
            + "; ".join(f"{a.id} ({a.licence})" for a in pending)
            + f". Read them, then run `{pull_command(preset, chosen, True)}`"
        )
    _pull_base_model(preset, settings, progress)
    if not store.remote:
        _build_standins(store, assets, settings)
    for asset in assets:
        if progress:
            progress(asset.id)
        if asset.package is None:
            store.fetch(asset, settings.allow_downloads)
            if asset.needs_acceptance and store.remote and accept_licence:
                store.accept_licence(asset)
        if asset.convert:
            store.convert(asset)
    return {a.id: store.state(a) for a in assets}


def _pull_base_model(preset: Preset, settings: Settings, progress: Callable[[str], None] | None) -> None:
    """The preset's diffusers repository (and replacement VAE) in the hub cache, or its tiny build."""
    if progress:
        progress(preset.repo)
    if preset.is_tiny:
        from imagegen.pipelines.tiny import ensure_tiny_repo

        ensure_tiny_repo(preset.tiny_name, settings.model_cache)
        return
    if is_available_locally(preset, settings.model_cache):
        return
    if not settings.allow_downloads:
        raise ModelNotAvailableError(
            f"{preset.repo} is not in {settings.model_cache / 'hub'} and downloads are disabled "
            "(IMAGEGEN_ALLOW_DOWNLOADS=false)"
        )
    from diffusers import AutoencoderKL, DiffusionPipeline

    cache = str(settings.model_cache / "hub")
    try:
        DiffusionPipeline.download(preset.repo, cache_dir=cache, variant=preset.variant, use_safetensors=True)
        if preset.vae:
            AutoencoderKL.from_pretrained(preset.vae, cache_dir=cache, use_safetensors=True)
    except Exception as exc:
        raise ModelNotAvailableError(
            f"could not download {preset.repo}: {str(exc).splitlines()[0][:200]} "
            f"({preset.licence or 'see its hub page'}; gated repositories need their licence accepted on the hub "
            "page and `hf auth login`)"
        ) from exc


def _unique(assets: Iterable[Asset]) -> list[Asset]:
    seen: dict[str, Asset] = {}
    for asset in assets:
        seen.setdefault(asset.id, asset)
    return list(seen.values())


@dataclass(frozen=True)
class MethodFiles:
    """What an identity method loads: each role's local path and digest (for cache keys), and its asset."""

    method: str
    paths: dict[str, Path]
    digests: dict[str, str]
    assets: dict[str, Asset]

    def __getitem__(self, role: str) -> Path:
        return self.paths[role]

    @property
    def digest(self) -> str:
        """One digest of every file the method loads: changes whenever any of them does."""
        parts = [f"{role}={self.digests[role]}" for role in sorted(self.digests)]
        return hashlib.sha256("|".join([self.method, *parts]).encode()).hexdigest()


def method_files(preset: Preset, method: str, settings: Settings | None = None) -> MethodFiles:
    """The pre-flight: every file ``method`` needs on ``preset``, checked before anything is loaded.

    A tiny preset's stand-ins are written (and converted) here on first use. Anything missing raises one
    :class:`ModelNotAvailableError` naming the exact ``imagegen models pull`` command; nothing is downloaded.
    """
    settings = settings or get_settings()
    store = store_for(preset, settings)
    roles = load_manifest(settings).method_assets(method)
    if not store.remote:
        pull(preset, [method], settings=settings)
    problems = [(role, asset, store.state(asset)) for role, asset in roles.items()]
    problems = [(role, asset, state) for role, asset, state in problems if state not in ("present", "converted")]
    if problems:
        accept = any(state == "licence pending" for _, _, state in problems)
        listed = ", ".join(f"{asset.id} ({state})" for _, asset, state in problems)
        raise ModelNotAvailableError(
            f"preset '{preset.name}' with {method} needs files that are not on this machine: {listed}; "
            f"run `{pull_command(preset, [method], accept)}`"
        )
    paths = {role: store.path(asset) for role, asset in roles.items()}
    digests = {role: store.digest(asset) for role, asset in roles.items()}
    return MethodFiles(method, paths, digests, dict(roles))


def preflight(preset: Preset, methods: Iterable[str] = (), settings: Settings | None = None) -> None:
    """Check the base model and every asset of ``methods`` before a render loads anything; one clear line."""
    settings = settings or get_settings()
    methods = list(methods)
    if preset.is_tiny:
        from imagegen.pipelines.tiny import ensure_tiny_repo

        ensure_tiny_repo(preset.tiny_name, settings.model_cache)
    elif not is_available_locally(preset, settings.model_cache):
        # on a cluster each node has its own cache (or shares one): the line says which node to pull on
        raise ModelNotAvailableError(
            f"preset '{preset.name}' needs {preset.repo}, which is not in the model cache "
            f"{settings.model_cache / 'hub'} on this node ({socket.gethostname()}); "
            f"run `{pull_command(preset, methods, _any_pending(preset, methods, settings))}` on this node, "
            "or set IMAGEGEN_MODEL_CACHE_DIR to a shared cache that holds it (nothing is downloaded while serving)"
        )
    for method in methods:
        method_files(preset, method, settings)


def _any_pending(preset: Preset, methods: list[str], settings: Settings) -> bool:
    store = store_for(preset, settings)
    manifest = load_manifest(settings)
    return any(
        a.needs_acceptance and not store.licence_accepted(a)
        for m in methods
        for a in manifest.method_assets(m).values()
    )


def asset_states(preset: Preset, settings: Settings | None = None) -> dict[str, list[tuple[str, Asset, AssetState]]]:
    """For ``imagegen models show``: method -> [(role, asset, state)]."""
    settings = settings or get_settings()
    store = store_for(preset, settings)
    manifest = load_manifest(settings)
    out = {}
    for method in preset.methods:
        out[method] = [(role, asset, store.state(asset)) for role, asset in manifest.method_assets(method).items()]
    return out


def prepare(preset: Preset, methods: Iterable[str] | None = None, settings: Settings | None = None) -> None:
    """Before actors or replicas start: build what a built store needs once (so replicas never race to write it),
    and check that everything else is on this machine (a replica never downloads while serving)."""
    settings = settings or get_settings()
    chosen = preset_methods(preset, methods)
    if not store_for(preset, settings).remote:
        pull(preset, chosen, settings=settings)
    preflight(preset, chosen, settings)
