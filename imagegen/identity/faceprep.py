"""Face preparation shared by the identity methods (PuLID, IP-Adapter): detector, alignment, ArcFace recogniser.

Every method finds the reference's face with the analyser of its ``faces`` asset and reads its 5 landmarks; what
it does next is built from these parts, so the production models and the offline stand-ins run through one path:

- detection + 5 landmarks: the analyser of the method's ``faces`` asset (:func:`method_analyzer`: an insightface
  pack such as antelopev2 or buffalo_l, or dlib); the landmark order is the same (eyes, nose, mouth corners);
- alignment: ``cv2.estimateAffinePartial2D`` (LMEDS) onto facexlib's 512 px FFHQ template, border colour
  (135, 133, 132), exactly as ``facexlib.utils.face_restoration_helper.FaceRestoreHelper`` (:func:`align_face`);
- recognition: the pack's ArcFace-signature ONNX model loaded through insightface's ``model_zoo``
  (antelopev2's ``glintr100.onnx``, buffalo_l's ``w600k_r50.onnx``): :class:`ArcFaceRecognizer`.

PuLID's own steps on top of these (BiSeNet parsing, the masked crop) are in :mod:`imagegen.identity.pulid.preparer`.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from imagegen.errors import ModelNotAvailableError
from imagegen.faces import FaceAnalyzer, analyzer_for_pack, get_analyzer
from imagegen.faces.errors import NoFaceError

#: facexlib's "standard 5 landmarks for FFHQ faces with 512 x 512" (FaceRestoreHelper.face_template)
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float32,
)
ALIGN_BORDER = (135, 133, 132)
ALIGNED_SIZE = 512


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """The face warped onto the FFHQ template: ``[size, size, 3]`` uint8 RGB."""
    template = FFHQ_TEMPLATE_512 * (size / 512.0)
    matrix, _ = cv2.estimateAffinePartial2D(np.asarray(landmarks, dtype=np.float32), template, method=cv2.LMEDS)
    if matrix is None:
        raise NoFaceError("could not align the face: its landmarks are degenerate")
    return cv2.warpAffine(
        np.ascontiguousarray(image), matrix, (size, size), borderMode=cv2.BORDER_CONSTANT, borderValue=ALIGN_BORDER
    )


def method_analyzer(files) -> FaceAnalyzer:
    """The face analyser of a method's ``faces`` asset: an insightface pack folder, or dlib (its Python package).

    ``files`` is the method's :class:`~imagegen.pipelines.assets.MethodFiles`.
    """
    if files.assets["faces"].format == "onnx":
        return analyzer_for_pack(files["faces"], files.assets["faces"].id)
    return get_analyzer("dlib")


class ArcFaceRecognizer:
    """An ArcFace-signature ONNX recognizer through insightface's ``model_zoo`` (as PuLID loads glintr100)."""

    def __init__(self, model_file: Path):
        if not Path(model_file).exists():
            raise ModelNotAvailableError(
                f"ArcFace recognizer {model_file} is missing: place insightface's antelopev2 pack "
                "(glintr100.onnx; non-commercial licence) there"
            )
        from insightface.model_zoo import model_zoo

        self.model_file = Path(model_file)
        self.model = model_zoo.get_model(str(model_file), providers=["CPUExecutionProvider"])
        self.model.prepare(ctx_id=-1)

    def raw_embedding(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """The un-normalised 512-d embedding of the face with ``landmarks`` in the RGB ``image``."""
        from insightface.app.common import Face as InsightFace

        bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
        face = InsightFace(kps=np.asarray(landmarks, dtype=np.float32))
        return np.asarray(self.model.get(bgr, face), dtype=np.float32).reshape(-1)
