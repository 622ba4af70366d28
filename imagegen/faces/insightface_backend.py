"""insightface backend: SCRFD detector + ArcFace 512-d embedding from an insightface model pack.

This is what PuLID and IP-Adapter FaceID were trained with (``antelopev2``: SCRFD-10G +
glintr100; ``buffalo_l``: SCRFD-10G + w600k_r50), so it is the production choice for
conditioning. **The packs are licensed by InsightFace for non-commercial research use only**;
use the ``dlib`` backend where that does not fit.

Weights are looked up in insightface's own layout, ``<root>/models/<pack>/*.onnx`` with
``root = settings.insightface_home`` (``IMAGEGEN_INSIGHTFACE_ROOT``, default
``IMAGEGEN_HOME/insightface``); a zip that unpacked into ``<pack>/<pack>/`` is accepted too.
imagegen never downloads a pack: insightface's ``FaceAnalysis`` downloads any pack it cannot
find, so we check the directory first and hand ``FaceAnalysis`` its absolute path (which it
uses as is, also immune to a same-named folder in the working directory). A missing pack
raises :class:`~imagegen.errors.ModelNotAvailableError` naming the pack and the directory.

Input is RGB like every backend (see :mod:`imagegen.faces.base`); we flip to BGR, the order
insightface's OpenCV-based preprocessing expects.
"""

from __future__ import annotations

import logging
import re
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from imagegen.errors import ModelNotAvailableError
from imagegen.faces.base import (
    FaceAnalyzer,
    ImageLike,
    is_standin_model,
    model_file_version,
    sort_largest_first,
    to_rgb_array,
)
from imagegen.faces.types import Face

logger = logging.getLogger(__name__)

#: packs this backend knows, with their detector and recognizer files
KNOWN_PACKS: dict[str, tuple[str, str]] = {
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
}
DEFAULT_PACK = "antelopev2"
#: a pack name is a directory name, never a path
PACK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LICENSE_NOTE = (
    "insightface model packs are licensed for non-commercial research use only; for commercial use "
    "set IMAGEGEN_FACE_BACKEND=dlib"
)

# insightface 2.1's aligner calls a scikit-image API deprecated in 0.26; not ours to fix
warnings.filterwarnings("ignore", message="`estimate` is deprecated", category=FutureWarning)


def find_pack_dir(pack: str, root: str | Path) -> Path:
    """The directory holding ``pack``'s models under ``root``, or a clear error. Never downloads."""
    if not PACK_NAME.fullmatch(pack):
        raise ModelNotAvailableError(
            f"invalid insightface pack name {pack!r}: use a plain name such as {', '.join(KNOWN_PACKS)}"
        )
    root = Path(root).expanduser()
    expected = root / "models" / pack
    for candidate in (expected, expected / pack):  # some zips unpack into <pack>/<pack>/
        if candidate.is_dir() and (any(candidate.glob("*.onnx")) or (candidate / "manifest.json").is_file()):
            return candidate.resolve()
    files = KNOWN_PACKS.get(pack)
    example = f" (e.g. {expected / files[0]} and {expected / files[1]})" if files else ""
    state = "is empty" if expected.is_dir() else "does not exist"
    raise ModelNotAvailableError(
        f"insightface model pack {pack!r} is not installed: {expected} {state}. imagegen never downloads "
        f"insightface packs; get the {pack!r} zip yourself and unpack its .onnx files into that "
        f"directory{example}, or set IMAGEGEN_INSIGHTFACE_ROOT to a directory that has models/{pack}/. "
        f"Note: {LICENSE_NOTE}."
    )


def providers_for(device: str) -> tuple[list[Any], int]:
    """ONNX Runtime providers and insightface ``ctx_id`` for an imagegen device string."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if device == "cpu":
        return ["CPUExecutionProvider"], -1
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise ModelNotAvailableError(
                f"device {device!r} asked for, but this onnxruntime has no CUDA provider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu or set IMAGEGEN_DEVICE=cpu"
            )
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], index
    raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


class InsightFaceAnalyzer(FaceAnalyzer):
    """Faces with an insightface pack (``antelopev2`` by default), loaded through insightface."""

    name = "insightface"
    embedding_dim = 512

    def __init__(
        self,
        pack: str | None = None,
        *,
        root: str | Path | None = None,
        pack_dir: str | Path | None = None,
        device: str | None = None,
        det_size: tuple[int, int] = (640, 640),
        det_thresh: float = 0.5,
        intra_op_threads: int | None = None,
    ):
        """``intra_op_threads`` caps ONNX Runtime's threads per session (default: one per core);
        set it to 1 when several analysers share a machine (one per process or Ray actor)."""
        from imagegen.settings import get_settings

        settings = get_settings()
        if pack_dir is not None:  # a pack an asset store holds (imagegen models pull): used as it is
            self.pack_dir = Path(pack_dir).resolve()
            self.pack = pack or self.pack_dir.name
            self.root = self.pack_dir.parent
            if not any(self.pack_dir.glob("*.onnx")):
                raise ModelNotAvailableError(f"insightface pack folder {self.pack_dir} holds no .onnx models")
        else:
            self.pack = pack or getattr(settings, "insightface_pack", None) or DEFAULT_PACK
            self.root = Path(root).expanduser() if root is not None else settings.insightface_home
            self.pack_dir = find_pack_dir(self.pack, self.root)  # before insightface is even imported

        from insightface.app import FaceAnalysis

        providers, ctx_id = providers_for(device or settings.device)
        extra: dict[str, Any] = {}
        if intra_op_threads is not None:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = int(intra_op_threads)
            extra["sess_options"] = options
        try:
            app = FaceAnalysis(
                name=str(self.pack_dir),
                root=str(self.root),
                allowed_modules=["detection", "recognition"],
                providers=providers,
                **extra,
            )
        except AssertionError as exc:  # FaceAnalysis asserts a detection model was found
            raise ModelNotAvailableError(
                f"insightface pack {self.pack!r} in {self.pack_dir} has no face detector insightface "
                f"recognises (files: {_listing(self.pack_dir)}); reinstall the pack"
            ) from exc
        if "recognition" not in app.models:
            raise ModelNotAvailableError(
                f"insightface pack {self.pack!r} in {self.pack_dir} has no recognition model "
                f"(files: {_listing(self.pack_dir)}); reinstall the pack"
            )
        app.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=det_size)
        if not getattr(app.det_model, "use_kps", False):
            raise ModelNotAvailableError(
                f"the detector of pack {self.pack!r} has no keypoints; ArcFace needs 5 landmarks to align"
            )
        self._app = app
        self._detector = app.det_model
        self._recognizer = app.models["recognition"]
        out = getattr(self._recognizer, "output_shape", None)
        if out and isinstance(out[-1], int):
            self.embedding_dim = int(out[-1])  # instance override (antelopev2/buffalo_l: 512)
        self.is_standin = is_standin_model(self._recognizer.model_file) or is_standin_model(self._detector.model_file)
        if self.is_standin:
            logger.warning(
                "insightface pack %s in %s is a tiny test stand-in, not real face models", self.pack, self.pack_dir
            )

    @property
    def recognizer_file(self) -> Path:
        """The pack's ArcFace ONNX file (what PuLID and FaceID take their raw embedding from)."""
        return Path(self._recognizer.model_file)

    @property
    def detector_file(self) -> Path:
        return Path(self._detector.model_file)

    @cached_property
    def model_version(self) -> str:
        """``<pack>/<recognizer>-<sha>+<detector>-<sha>`` (``+standin`` for generated test models)."""
        version = (
            f"{self.pack}/{model_file_version(self._recognizer.model_file)}"
            f"+{model_file_version(self._detector.model_file)}"
        )
        return version + ("+standin" if self.is_standin else "")

    def detect(self, image: ImageLike) -> list[Face]:
        bgr = _bgr(image)
        boxes, kpss = self._detector.detect(bgr, max_num=0, metric="default")
        faces = [
            Face(bbox=tuple(boxes[i, :4]), landmarks=kpss[i], det_score=float(boxes[i, 4]), backend=self.name)
            for i in range(boxes.shape[0])
        ]
        return sort_largest_first(faces)

    def embed(self, image: ImageLike, face: Face) -> Face:
        from insightface.app.common import Face as InsightFace

        bgr = _bgr(image)
        record = InsightFace(
            bbox=np.asarray(face.bbox, dtype=np.float32), kps=face.landmarks.copy(), det_score=face.det_score
        )
        embedding = self._recognizer.get(bgr, record)  # insightface's own align (norm_crop) + forward
        return face.with_embedding(
            np.asarray(embedding, dtype=np.float32).reshape(-1), backend=self.name, model_version=self.model_version
        )

    def describe(self) -> dict[str, object]:
        info = super().describe()
        info.update(pack=self.pack, pack_dir=str(self.pack_dir), standin=self.is_standin)
        return info


def _bgr(image: ImageLike) -> np.ndarray:
    return np.ascontiguousarray(to_rgb_array(image)[..., ::-1])


def _listing(directory: Path) -> str:
    names = sorted(p.name for p in directory.iterdir())
    return ", ".join(names) or "none"
