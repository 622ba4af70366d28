"""Compiled code kept between processes: ``torch.compile``'s cost is paid once per machine, and once per cluster.

A renderer under a compiling profile (``fast``, ``fastest``) compiles its denoiser's blocks at warm-up: seconds on
the tiny presets, ~10 s for SDXL ``fast`` and minutes for FLUX ``fastest`` on an H200 (``docs/benchmarks.md``). A
replica is ready only when warm, so without a cache every new replica (a scale-up, a restart after a crash, a pod
rescheduled to a fresh node) pays it again, and inductor's default cache directory (``/tmp/torchinductor_<user>``)
is gone with the container. Two layers keep the work:

1. **A local directory** (``IMAGEGEN_COMPILE_CACHE_DIR``, default ``IMAGEGEN_HOME/inductor-cache``) becomes inductor's
   ``TORCHINDUCTOR_CACHE_DIR`` (Triton's kernels live under it too): the compiled graphs, the C++ / Triton kernels and
   the autotuning results. A second replica on the same machine or volume finds everything compiled. An operator's
   own ``TORCHINDUCTOR_CACHE_DIR`` wins and is reported.
2. **Artifacts in the object store** (``IMAGEGEN_STORAGE_URL``, a bucket shared by every node, else
   ``IMAGEGEN_HOME``): after a warm-up that compiled anything new, the replica stores
   ``torch.compiler.save_cache_artifacts()`` (torch's portable "mega-cache": the AOT-autograd and FX-graph cache
   entries, with the Triton kernels bundled into them on a GPU) and the C++ kernels inductor built on a CPU (torch's
   artifacts carry their source only) under ``compile-cache/<fingerprint>.bin``; a replica whose local directory is
   empty loads them before it compiles.

The fingerprint names what the compiled code depends on and torch's own cache keys do not separate cheaply: the
preset, the profile's options, torch / Triton / CUDA / Python versions and the device (GPU model and compute
capability, or the CPU's architecture and vector ISA). torch's keys still decide every hit, so a stale artifact is a
miss (compiled again, then saved again), never wrong code.

**Trust.** Both layers hold code that runs in the renderer (generated Python, kernels, pickles), like the model cache:
only the deployment's own processes may write there; nothing a user sends reaches them. An artifact object is one
atomic put of a header (its fingerprint and the payload's SHA-256) and the payload; a payload that does not match its
header, or that torch refuses, is reported and ignored (the replica compiles), never a failed start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from imagegen.files import atomic_write
from imagegen.settings import Settings
from imagegen.storage import ObjectNotFoundError, ObjectStore, StorageError, open_storage

log = logging.getLogger(__name__)

#: the object store's folder of compile artifacts
PREFIX = "compile-cache"
#: an artifact's object name (:func:`artifact_key`): ``<preset>-<profile>-<16 hex>.bin``, at the folder's top
ARTIFACT_NAME = re.compile(r"[A-Za-z0-9_.-]+-[0-9a-f]{16}\.bin")
#: first line of an artifact object; the header's ``format`` says how the rest is laid out
MAGIC = b"imagegen-compile-cache\n"
FORMAT = 1
#: ``torch._dynamo.utils.counters`` entries that say what the caches did: (group, name) -> report name
CACHE_COUNTERS = {
    ("inductor", "fxgraph_cache_hit"): "fx_graph_hits",
    ("inductor", "fxgraph_cache_miss"): "fx_graph_misses",
    ("inductor", "fxgraph_cache_bypass"): "fx_graph_bypasses",
    ("aot_autograd", "autograd_cache_hit"): "aot_hits",
    ("aot_autograd", "autograd_cache_miss"): "aot_misses",
    ("aot_autograd", "autograd_cache_bypass"): "aot_bypasses",
}

#: set beside ``TORCHINDUCTOR_CACHE_DIR`` when imagegen chose that directory: a child process (a CLI run, a worker)
#: inherits both, and may then point inductor at its own settings' directory instead of taking it for the operator's
CHOSEN_HERE = "IMAGEGEN_INDUCTOR_DIR_CHOSEN"


def use_local_dir(settings: Settings) -> tuple[str, str]:
    """Point inductor's on-disk caches at ``settings.compile_cache`` unless the operator chose a directory.

    Returns ``(directory, who chose it)``: ``"IMAGEGEN_COMPILE_CACHE_DIR"`` (or the home's default) or
    ``"TORCHINDUCTOR_CACHE_DIR"``. torch writes its own default back into the variable the first time it reads it, so
    that value, like one imagegen set (:data:`CHOSEN_HERE`, in this process or a parent), is not the operator's.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    ours = {os.environ.get(CHOSEN_HERE), os.path.abspath(default_cache_dir())}
    if current is not None and os.path.abspath(current) not in ours:
        return current, "TORCHINDUCTOR_CACHE_DIR"
    wanted = str(settings.compile_cache.expanduser().resolve())
    os.makedirs(wanted, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.environ[CHOSEN_HERE] = wanted
    return wanted, "IMAGEGEN_COMPILE_CACHE_DIR"


def environment(device: torch.device) -> dict[str, Any]:
    """What compiled code depends on besides the model and profile: versions and the device it was built for."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        env["device"] = torch.cuda.get_device_name(index)
        env["capability"] = list(torch.cuda.get_device_capability(index))
    else:
        env["device"] = f"{device.type}-{platform.machine()}"
        env["capability"] = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else None
    return env


def fingerprint(preset: str, profile: Any, device: torch.device) -> dict[str, Any]:
    """The artifact's identity: preset, the profile's options (an override under the same name differs) and
    :func:`environment`."""
    options = profile.model_dump(mode="json", exclude={"description"})
    return {"preset": preset, "profile": options, **environment(device)}


def artifact_key(signature: dict[str, Any]) -> str:
    """``compile-cache/<preset>-<profile>-<sha256 of the fingerprint, 16 hex>.bin``: readable, and one object per
    distinct fingerprint."""
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]
    readable = f"{signature['preset']}-{signature['profile']['name']}"
    name = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "_" for c in readable)
    return f"{name}-{digest}.bin"


def cache_counters() -> dict[str, int]:
    """The process's cache counters so far (:data:`CACHE_COUNTERS`): take two readings and subtract."""
    from torch._dynamo.utils import counters

    return {name: int(counters[group][key]) for (group, key), name in CACHE_COUNTERS.items()}


class UnusableArtifact(ValueError):
    """An artifact object that is not one this module wrote whole (the message says what is wrong)."""


#: inductor's compiled C++ kernels in its cache directory: ``<2 chars>/c<hash>.so`` or ``c<hash>.main.so`` (the only
#: names carried; anything else in an object is refused, so no name can point outside the directory)
KERNEL_NAME = re.compile(r"^[0-9a-z]{2}/c[0-9a-z]{20,80}(\.main)?\.so$")
#: the most kernel bytes one artifact carries (a directory shared by many presets may hold more)
MAX_KERNEL_BYTES = 256 * 1024 * 1024
TORCH_PART = "torch"


def collect_kernels(local_dir: str | os.PathLike[str]) -> dict[str, bytes]:
    """The compiled C++ kernels under ``local_dir`` (torch's artifacts hold their source, not the built objects, so a
    CPU replica with an empty directory would build them again); none when they exceed :data:`MAX_KERNEL_BYTES`."""
    root = Path(local_dir)
    paths = sorted(p for p in root.glob("*/c*.so") if KERNEL_NAME.fullmatch(p.relative_to(root).as_posix()))
    if sum(p.stat().st_size for p in paths) > MAX_KERNEL_BYTES:
        log.warning("compile cache: %d kernel objects exceed %d bytes; not stored", len(paths), MAX_KERNEL_BYTES)
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in paths}


def restore_kernels(local_dir: str | os.PathLike[str], kernels: dict[str, bytes]) -> int:
    """Write the kernels ``local_dir`` lacks (atomically: a concurrent compile sees a whole file or none); the count
    written. ``kernels`` come from :func:`unpack`, which refuses any name outside inductor's layout."""
    written = 0
    for name, data in kernels.items():  # names checked against KERNEL_NAME by unpack
        path = Path(local_dir) / name
        if not path.exists():
            atomic_write(path, lambda tmp, data=data: Path(tmp).write_bytes(data))
            written += 1
    return written


def pack(payload: bytes, kernels: dict[str, bytes], signature: dict[str, Any]) -> bytes:
    """One artifact object: :data:`MAGIC`, a JSON header line (the fingerprint, each part's name, size and SHA-256),
    then the parts: torch's artifacts, then each kernel object."""
    parts = [(TORCH_PART, payload), *sorted(kernels.items())]
    header = {
        "format": FORMAT,
        "fingerprint": signature,
        "parts": [{"name": n, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for n, data in parts],
        "created": time.time(),
        "host": socket.gethostname(),
    }
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + b"".join(data for _, data in parts)


def unpack(data: bytes) -> tuple[dict[str, Any], bytes, dict[str, bytes]]:
    """``(header, torch's artifacts, kernels)`` of an object :func:`pack` made; :class:`UnusableArtifact` otherwise."""
    if not data.startswith(MAGIC):
        raise UnusableArtifact("not an imagegen compile-cache object")
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        raise UnusableArtifact("its header is cut short")
    try:
        header = json.loads(data[len(MAGIC) : end])
    except ValueError as exc:
        raise UnusableArtifact(f"its header is not JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise UnusableArtifact(f"format {header.get('format') if isinstance(header, dict) else '?'}, not {FORMAT}")
    parts, offset = {}, end + 1
    try:
        for part in header.get("parts") or []:
            name, size, digest = str(part["name"]), int(part["size"]), part["sha256"]
            if name != TORCH_PART and not KERNEL_NAME.fullmatch(name):
                raise UnusableArtifact(f"it names a kernel {name!r} outside the cache's layout")
            chunk = data[offset : offset + size]
            offset += size
            if len(chunk) != size or hashlib.sha256(chunk).hexdigest() != digest:
                raise UnusableArtifact(f"its part {name!r} does not match the SHA-256 in its header")
            parts[name] = chunk
    except UnusableArtifact:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise UnusableArtifact(f"its header's parts are malformed ({exc!r})") from None
    if offset != len(data) or TORCH_PART not in parts:
        raise UnusableArtifact("its parts do not add up to the object")
    payload = parts.pop(TORCH_PART)
    return header, payload, parts


@dataclass
class CompileCacheReport:
    """What the caches did for one renderer (``WarmupReport.compile_cache``, shown by ``/readyz``)."""

    #: inductor's cache directory, and who chose it (see :func:`use_local_dir`)
    local_dir: str
    local_dir_from: str
    #: the artifact object under the object store's ``compile-cache/``
    artifact: str
    #: "loaded" | "absent" | "unusable: <why>" | "unavailable: <why>" (the store could not be read)
    load: str = "absent"
    load_bytes: int = 0
    #: compiled C++ kernels the artifact brought that the local directory lacked
    kernels_restored: int = 0
    load_s: float = 0.0
    #: "saved" | "kept: nothing new compiled" | "nothing compiled" | "failed: <why>" (None: not yet decided)
    save: str | None = None
    save_bytes: int = 0
    save_s: float = 0.0
    #: cache hits / misses / bypasses since the renderer was made (:data:`CACHE_COUNTERS`)
    counters: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


class CompileCache:
    """The compile caches of one renderer (preset x profile x device); see the module docstring.

    :meth:`start` (before the first compile) points the local directory and loads the stored artifacts;
    :meth:`finish` (after warm-up) stores them again when something was compiled that they lacked.
    """

    def __init__(self, objects: ObjectStore, signature: dict[str, Any], settings: Settings):
        self.objects = objects
        self.fingerprint = signature
        self.settings = settings
        self.key = artifact_key(signature)
        self.report: CompileCacheReport | None = None
        self._before: dict[str, int] = {}
        #: counters at the last :meth:`finish` (a later warm-up of new shapes stores again only if it compiled)
        self._last: dict[str, int] = {}
        #: the stored artifacts hold what this process compiled so far (loaded and nothing compiled since, or saved)
        self._stored = False

    @classmethod
    def for_renderer(cls, settings: Settings, preset: str, profile: Any, device: torch.device) -> CompileCache:
        return cls(artifact_store(settings), fingerprint(preset, profile, device), settings)

    def start(self) -> CompileCacheReport:
        local_dir, chosen_by = use_local_dir(self.settings)
        self._before = self._last = cache_counters()
        self.report = CompileCacheReport(local_dir=local_dir, local_dir_from=chosen_by, artifact=self.key)
        started = time.perf_counter()
        try:
            header, payload, kernels = unpack(self.objects.get(self.key))
            torch.compiler.load_cache_artifacts(payload)
            self.report.kernels_restored = restore_kernels(local_dir, kernels)
            self.report.load, self.report.load_bytes = "loaded", len(payload) + sum(map(len, kernels.values()))
            self._stored = True
            log.info("compile artifacts %s loaded (%d bytes, made on %s)", self.key, len(payload), header.get("host"))
        except ObjectNotFoundError:
            self.report.load = "absent"
        except StorageError as exc:
            self.report.load = f"unavailable: {exc}"
            log.warning("compile artifacts %s not read: %s", self.key, exc)
        except Exception as exc:  # a corrupt or foreign object, or torch refusing it: compile instead
            self.report.load = f"unusable: {exc}"
            log.warning("compile artifacts %s ignored: %s", self.key, exc)
        self.report.load_s = round(time.perf_counter() - started, 3)
        return self.report

    def finish(self) -> CompileCacheReport:
        """Store the process's artifacts when something was compiled since the last call (a cache miss), or when none
        were stored for this fingerprint; called after every warm-up."""
        report = self.report or self.start()
        now = cache_counters()
        report.counters = {name: now[name] - self._before.get(name, 0) for name in now}
        compiled_new = any(now[name] > self._last.get(name, 0) for name in ("fx_graph_misses", "aot_misses"))
        self._last = now
        if self._stored and not compiled_new:
            report.save = "kept: nothing new compiled"
            return report
        started = time.perf_counter()
        try:
            saved = torch.compiler.save_cache_artifacts()
            if saved is None or not saved[0]:
                report.save = "nothing compiled"
                return report
            packed = pack(saved[0], collect_kernels(report.local_dir), self.fingerprint)
            self.objects.put(self.key, packed)
            report.save, report.save_bytes = "saved", len(packed)
            self._stored = True
        except Exception as exc:  # the store refusing a put must not fail a replica that is otherwise warm
            report.save = f"failed: {exc}"
            log.warning("compile artifacts %s not stored: %s", self.key, exc)
        report.save_s = round(time.perf_counter() - started, 3)
        return report


def artifact_store(settings: Settings) -> ObjectStore:
    """The object store's folder of compile artifacts (:data:`PREFIX` under ``IMAGEGEN_STORAGE_URL`` or the home)."""
    return open_storage(settings.storage_root).child(PREFIX)


#: the fingerprint's fields that name this installation's software (an artifact made under others is never hit)
SOFTWARE = ("torch", "triton", "cuda", "python")


def stored_artifacts(settings: Settings) -> list[dict[str, Any]]:
    """Every artifact object in the object store: key, size, time written and, where readable, its fingerprint, and
    ``stale``: made by other software than this installation's (:data:`SOFTWARE`) or unreadable, so no replica of this
    installation can use it."""
    objects = artifact_store(settings)
    here = environment(torch.device("cpu"))
    rows = []
    for info in _artifacts(objects):
        row: dict[str, Any] = {"key": info.key, "bytes": info.size, "modified": info.modified}
        try:
            header, _, _ = unpack(objects.get(info.key))
            found = header["fingerprint"]
            row.update(fingerprint=found, host=header.get("host"))
            row["stale"] = any(found.get(name) != here[name] for name in SOFTWARE)
        except (UnusableArtifact, StorageError) as exc:
            row.update(unusable=str(exc), stale=True)
        rows.append(row)
    return rows


def _artifacts(objects: Any) -> list[Any]:
    """The objects of the artifact folder named as :func:`artifact_key` names them: never anything else an operator
    keeps there (an inductor directory pointed at the same folder), which listing or clearing must not touch."""
    return [info for info in objects.list() if ARTIFACT_NAME.fullmatch(info.key)]


def clear_artifacts(settings: Settings, stale_only: bool = False) -> int:
    """Delete the stored artifact objects (``stale_only``: those :func:`stored_artifacts` marks stale, after an upgrade
    of torch or CUDA); the count deleted. The next warm-up that finds none compiles and stores afresh."""
    objects = artifact_store(settings)
    if stale_only:
        keys = [row["key"] for row in stored_artifacts(settings) if row["stale"]]
    else:
        keys = [info.key for info in _artifacts(objects)]
    for key in keys:
        objects.delete(key)
    return len(keys)


__all__ = [
    "CompileCache",
    "CompileCacheReport",
    "UnusableArtifact",
    "artifact_key",
    "cache_counters",
    "clear_artifacts",
    "fingerprint",
    "pack",
    "stored_artifacts",
    "unpack",
    "use_local_dir",
]
