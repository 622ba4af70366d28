"""Backend names -> analysers, built once per process and configuration.

Names (``IMAGEGEN_FACE_BACKEND`` or the ``name`` argument):

- ``dlib``: HOG detector + dlib ResNet (offline, public domain; the default).
- ``dlib-cnn``: the same embedding with dlib's MMOD CNN detector (slow on CPU).
- ``insightface``: the default pack (``antelopev2``); ``insightface:<pack>`` picks another one
  (``insightface:buffalo_l``). Non-commercial weights that you install yourself.

A name's *family* (``dlib`` or ``insightface``) is what ``Face.backend`` holds and what selects
the similarity metric; the detector or pack does not change how embeddings are compared.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from imagegen.faces.base import FaceAnalyzer
from imagegen.faces.errors import UnknownFaceBackendError
from imagegen.settings import get_settings


def _dlib(option: str | None) -> FaceAnalyzer:
    from imagegen.faces.dlib_backend import DlibAnalyzer

    return DlibAnalyzer(detector="hog")


def _dlib_cnn(option: str | None) -> FaceAnalyzer:
    from imagegen.faces.dlib_backend import DlibAnalyzer

    return DlibAnalyzer(detector="cnn")


def _insightface(option: str | None) -> FaceAnalyzer:
    from imagegen.faces.insightface_backend import InsightFaceAnalyzer

    return InsightFaceAnalyzer(pack=option)


#: name -> (family, factory, accepts ":<option>")
_BACKENDS: dict[str, tuple[str, Callable[[str | None], FaceAnalyzer], bool]] = {
    "dlib": ("dlib", _dlib, False),
    "dlib-cnn": ("dlib", _dlib_cnn, False),
    "insightface": ("insightface", _insightface, True),
}

_cache: dict[tuple, FaceAnalyzer] = {}
_lock = threading.Lock()


def available_backends() -> list[str]:
    """Backend names :func:`get_analyzer` knows (``insightface`` also takes ``insightface:<pack>``).

    Known is not installed: ``insightface`` raises ``ModelNotAvailableError`` until its pack is in
    place.
    """
    return list(_BACKENDS)


def _split(name: str) -> tuple[str, str | None]:
    base, sep, option = name.strip().partition(":")
    entry = _BACKENDS.get(base)
    if entry is None or (sep and (not entry[2] or not option)):
        raise UnknownFaceBackendError(
            f"unknown face backend {name!r}; known backends: {', '.join(_BACKENDS)} "
            "(insightface:<pack> picks a pack, e.g. insightface:buffalo_l); set IMAGEGEN_FACE_BACKEND to one"
        )
    return base, (option or None)


def backend_family(name: str) -> str:
    """The family (``Face.backend`` value, similarity metric) of a backend name: ``dlib-cnn`` -> ``dlib``."""
    if ":" not in name and name in {family for family, _, _ in _BACKENDS.values()}:
        return name
    base, _ = _split(name)
    return _BACKENDS[base][0]


def get_analyzer(name: str | None = None) -> FaceAnalyzer:
    """The analyser for ``name`` (default: ``settings.face_backend``), cached per process.

    The cache key includes the settings the backend reads (insightface root, pack, device), so a
    changed configuration builds a new analyser instead of returning a stale one.
    """
    settings = get_settings()
    name = name or settings.face_backend
    base, option = _split(name)
    family, factory, _ = _BACKENDS[base]
    key: tuple = (base, option)
    if family == "insightface":
        key += (str(settings.insightface_home), getattr(settings, "insightface_pack", None), settings.device)
    with _lock:
        analyzer = _cache.get(key)
        if analyzer is None:
            analyzer = factory(option)
            _cache[key] = analyzer
    return analyzer


def analyzer_for_pack(pack_dir: str | Path, pack: str | None = None) -> FaceAnalyzer:
    """An insightface analyser over the pack folder ``pack_dir`` (an identity method's asset, named ``pack``),
    cached per folder."""
    from imagegen.faces.insightface_backend import InsightFaceAnalyzer

    key: tuple = ("pack", str(Path(pack_dir).resolve()), get_settings().device)
    with _lock:
        analyzer = _cache.get(key)
        if analyzer is None:
            analyzer = InsightFaceAnalyzer(pack, pack_dir=pack_dir)
            _cache[key] = analyzer
    return analyzer


def clear_analyzer_cache() -> None:
    """Forget the cached analysers (tests; after installing a pack in a running process)."""
    with _lock:
        _cache.clear()
