"""From a reference photo to what PuLID's ID encoder reads: a raw ArcFace vector and a masked face crop.

PuLID's reference code does, per image: detect (antelopev2), align the face to facexlib's 512 px
FFHQ template, parse it with facexlib's BiSeNet, paint background and hair white, turn the rest
grey, and take the *raw* ArcFace embedding of the face. This module does the same steps with
pluggable parts, so the production models and the offline stand-ins run through one path:

- detection, alignment and recognition: the parts every identity method shares
  (:mod:`imagegen.identity.faceprep`: the method's face analyser, facexlib's FFHQ alignment, insightface's
  ArcFace through ``model_zoo``, antelopev2's ``glintr100.onnx`` for PuLID);
- parsing (PuLID only): ``facexlib.parsing.bisenet.BiSeNet`` (19 classes) with facexlib's weights, at 512 px.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from imagegen.faces import FaceAnalyzer
from imagegen.identity.faceprep import ArcFaceRecognizer, align_face

log = logging.getLogger(__name__)

#: ImageNet normalisation facexlib's BiSeNet expects
PARSING_MEAN = (0.485, 0.456, 0.406)
PARSING_STD = (0.229, 0.224, 0.225)


def build_parser(weights: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """facexlib's BiSeNet face parser, with ``weights`` (strict) or left as constructed."""
    from facexlib.parsing.bisenet import BiSeNet

    parser = BiSeNet(num_class=19)
    if weights is not None:
        parser.load_state_dict(weights, strict=True)
    return parser.eval()


@torch.inference_mode()
def parse_labels(parser: torch.nn.Module, aligned: np.ndarray, input_size: int) -> torch.Tensor:
    """Per-pixel BiSeNet labels of an aligned crop, ``[1, 1, 512, 512]`` (computed at ``input_size``)."""
    device = next(parser.parameters()).device
    pixels = torch.from_numpy(aligned).permute(2, 0, 1).float().div(255).unsqueeze(0).to(device)
    small = F.interpolate(pixels, size=(input_size, input_size), mode="bilinear", align_corners=False)
    mean = torch.tensor(PARSING_MEAN, device=device)[None, :, None, None]
    std = torch.tensor(PARSING_STD, device=device)[None, :, None, None]
    logits = parser((small - mean) / std)[0]
    logits = F.interpolate(logits, size=aligned.shape[:2], mode="bilinear", align_corners=False)
    return logits.argmax(dim=1, keepdim=True).cpu()


#: PuLID's reference resizes every reference so its long edge is at most this before face preparation
REFERENCE_LONG_EDGE = 1024


def downscale_long_edge(rgb: np.ndarray, long_edge: int) -> np.ndarray:
    """``rgb`` shrunk (area interpolation) so that its longer side is at most ``long_edge``; never enlarged."""
    height, width = rgb.shape[:2]
    scale = long_edge / max(height, width)
    if scale >= 1:
        return rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(np.ascontiguousarray(rgb), size, interpolation=cv2.INTER_AREA)


@dataclass
class PreparedFace:
    """One reference, ready for the ID encoder."""

    arcface: np.ndarray  # raw ArcFace embedding [512]
    aligned: np.ndarray  # [512, 512, 3] uint8 RGB
    parsing: torch.Tensor  # [1, 1, 512, 512] BiSeNet labels


class FacePreparer:
    """Detect → align → parse → recognise, for each reference image of a character."""

    def __init__(
        self, analyzer: FaceAnalyzer, recognizer: ArcFaceRecognizer, parser: torch.nn.Module, parsing_size: int = 512
    ):
        self.analyzer = analyzer
        self.recognizer = recognizer
        self.parser = parser
        self.parsing_size = parsing_size
        #: faces prepared so far (a render that hits the cache never adds to it)
        self.calls = 0

    def prepare(self, image: Image.Image, what: str = "reference") -> PreparedFace:
        self.calls += 1
        rgb = downscale_long_edge(np.asarray(image.convert("RGB")), REFERENCE_LONG_EDGE)
        face = self.analyzer.largest(rgb).require(what)
        aligned = align_face(rgb, face.landmarks)
        return PreparedFace(
            arcface=self.recognizer.raw_embedding(rgb, face.landmarks),
            aligned=aligned,
            parsing=parse_labels(self.parser, aligned, self.parsing_size),
        )
