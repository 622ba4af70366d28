"""Process-wide settings: one home directory, overridable through ``IMAGEGEN_*`` variables.

Everything the system writes (model cache, registry database, blobs) lives under
``IMAGEGEN_HOME`` so a test or a deployment can point the whole system somewhere else with one
variable; a cluster moves blobs and job images to a bucket with ``IMAGEGEN_STORAGE_URL``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS_CONFIG = PROJECT_ROOT / "configs" / "models.yaml"


class Settings(BaseSettings):
    """Settings read from the environment (``IMAGEGEN_HOME``, ``IMAGEGEN_DEVICE`` ...)."""

    model_config = SettingsConfigDict(env_prefix="IMAGEGEN_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".imagegen")
    models_config: Path = DEFAULT_MODELS_CONFIG
    #: the asset manifest (every file an identity method needs); default configs/assets.yaml
    assets_config: Path | None = None
    #: model cache; defaults to IMAGEGEN_HOME/models (tests share one across isolated homes)
    model_cache_dir: Path | None = None
    #: compiled code of compiling profiles (inductor's cache directory); defaults to IMAGEGEN_HOME/inductor-cache
    #: (``imagegen.pipelines.compile_cache``; an explicit TORCHINDUCTOR_CACHE_DIR wins). Not the object store's
    #: ``compile-cache/`` folder of shared artifacts, which lies under IMAGEGEN_HOME too without IMAGEGEN_STORAGE_URL
    compile_cache_dir: Path | None = None
    #: "auto" picks CUDA when available, else CPU; "cpu" / "cuda" / "cuda:1" force one.
    device: str = "auto"
    #: optimisation profile of every renderer this process loads (None: each preset's own; see models.yaml)
    profile: str | None = None
    #: number of prompt embeddings a renderer keeps (bounded LRU)
    prompt_cache_size: int = Field(default=256, ge=0)
    #: allow downloads from the model hub for real presets
    allow_downloads: bool = True
    #: SQLAlchemy URL of the registry; empty means SQLite at IMAGEGEN_HOME/registry.db
    database_url: str = ""
    #: where blobs and job images live (``imagegen.storage``): empty means IMAGEGEN_HOME on the local disk; a
    #: directory, or s3://bucket/prefix, gs://bucket/prefix, az://container/prefix shared by every node
    storage_url: str = ""
    #: face backend used for analysis and scoring: "dlib" (offline, public domain) or "insightface"
    face_backend: str = "dlib"
    #: insightface pack used by the "insightface" face backend (antelopev2 is what PuLID uses)
    insightface_pack: str = "antelopev2"
    #: where insightface model packs live (<root>/models/<pack>/*.onnx, insightface's own layout)
    insightface_root: Path | None = None
    #: apparent-age gate: references that look younger than this are refused
    min_apparent_age: int = Field(default=25, ge=18)
    #: strict age gate: refuse a character when no age estimator is available
    strict_age_gate: bool = False
    #: DEVELOPMENT ONLY: render characters whose apparent age was never verified (no estimator
    #: installed). Off, the service and the CLI refuse them; the demo and the tests turn it on,
    #: logged at start, shown in /readyz and stamped into every image's provenance metadata.
    allow_unverified_age: bool = False
    #: write the raw prompt into image metadata (off: images carry its SHA-256 and the recipe only)
    metadata_include_prompt: bool = False
    #: C2PA signing certificate chain (PEM, leaf first) and its private key: the deployment's secrets.
    #: Unset, images are signed by a development pair made once under IMAGEGEN_HOME/provenance
    #: (``imagegen provenance keygen`` makes one to configure; reports say "development signer").
    c2pa_cert: Path | None = None
    c2pa_key: Path | None = None
    #: extra trust anchors (PEM) ``imagegen provenance check`` validates C2PA signers against
    c2pa_trust: Path | None = None

    @property
    def age_policy(self) -> str:
        """What an image's provenance says about the age gate its character passed."""
        return "unverified-allowed (development only)" if self.allow_unverified_age else "verified-only"

    @property
    def model_cache(self) -> Path:
        return self.model_cache_dir or self.home / "models"

    @property
    def compile_cache(self) -> Path:
        return self.compile_cache_dir or self.home / "inductor-cache"

    @property
    def blob_root(self) -> Path:
        return self.home / "blobs"

    @property
    def registry_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'registry.db'}"

    @property
    def storage_root(self) -> str:
        """The root of ``imagegen.storage.open_storage``: ``storage_url``, else IMAGEGEN_HOME."""
        return self.storage_url or str(self.home)

    @property
    def insightface_home(self) -> Path:
        return self.insightface_root or self.home / "insightface"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process (read once; tests call ``get_settings.cache_clear()``)."""
    return Settings()
