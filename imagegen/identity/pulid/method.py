"""PuLID as an ``IdentityMethod``: FLUX.1 (v0.9.1) and SDXL (v1.1).

``compute`` turns a character's references into id tokens once (face preparation, EVA-CLIP,
IDFormer; several references are encoded together through IDFormer's multi-image input), and
``conditioning`` applies cached tokens per sample for one batch.

Where the parts come from:

| part | production presets | tiny presets (offline) |
| --- | --- | --- |
| detection, 5 landmarks | insightface ``antelopev2`` | the configured backend (dlib) |
| ArcFace (raw) | ``antelopev2/glintr100.onnx`` via ``model_zoo`` | generated glintr100-signature ONNX |
| face parsing | facexlib BiSeNet, ``parsing_bisenet.pth`` (``weights_only`` load) | the same class, seeded, at 128 px |
| EVA02-CLIP-L-14-336 | official checkpoint (converted to safetensors) | tiny seeded EVA (``weights.py``) |
| IDFormer + cross-attentions | ``guozinan/PuLID`` safetensors | tiny seeded PuLID (``weights.py``) |
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from imagegen.errors import ModelNotAvailableError
from imagegen.faces import get_analyzer
from imagegen.identity.conditioning import BatchConditioning, IdentityMethod, IdentitySample
from imagegen.identity.pulid import weights as pulid_weights
from imagegen.identity.pulid.embed import background_mask, eva_pixels, id_tokens, stack_batch
from imagegen.identity.pulid.faceprep import ArcFaceRecognizer, FacePreparer, build_parser
from imagegen.identity.pulid.flux_ca import PulidFluxState
from imagegen.identity.pulid.sdxl_processor import PulidSDXLState
from imagegen.pipelines.presets import Preset
from imagegen.settings import Settings, get_settings

TINY_PARSING_SIZE = 128
PARSING_SIZE = 512
BISENET_SEED = 1234


def tiny_face_models(settings: Settings) -> tuple[Path, Path]:
    """The tiny presets' recognizer (glintr100 signature) and seeded BiSeNet, written once."""
    from imagegen.faces.testing_models import write_arcface_recognizer

    folder = settings.model_cache / pulid_weights.TINY_DIR
    recognizer = folder / "glintr100-standin.onnx"
    parser = folder / "bisenet_seeded.safetensors"
    if not recognizer.exists():
        write_arcface_recognizer(recognizer)
    if not parser.exists():
        torch.manual_seed(BISENET_SEED)
        state = {k: v.contiguous() for k, v in build_parser().state_dict().items()}
        folder.mkdir(parents=True, exist_ok=True)
        tmp = parser.with_suffix(".tmp")
        save_file(state, str(tmp))
        tmp.replace(parser)
    return recognizer, parser


def production_face_models(settings: Settings) -> tuple[Path, dict[str, torch.Tensor]]:
    """antelopev2's glintr100 and facexlib's BiSeNet weights, from where the user placed them."""
    recognizer = settings.insightface_home / "models" / "antelopev2" / "glintr100.onnx"
    parser_file = settings.model_cache / "facexlib" / "parsing_bisenet.pth"
    if not parser_file.exists():
        raise ModelNotAvailableError(
            f"PuLID needs facexlib's face parser at {parser_file} (parsing_bisenet.pth from facexlib's releases); "
            "it is loaded with torch.load(weights_only=True), which cannot run code"
        )
    return recognizer, torch.load(parser_file, map_location="cpu", weights_only=True)


class PulidMethod(IdentityMethod):
    """What PuLID FLUX and SDXL share: the ID encoder pipeline and the cache key."""

    version: ClassVar[str] = "1"

    def __init__(self, preset: Preset, device: torch.device, dtype: torch.dtype, settings: Settings | None = None):
        self.preset = preset
        self.device = device
        self.dtype = dtype
        self.settings = settings or get_settings()
        self.weights = self._load_weights()
        if preset.is_tiny:
            self.eva = pulid_weights.load_tiny_eva_clip(self.settings)
            recognizer_file, parser_file = tiny_face_models(self.settings)
            parser = build_parser(load_file(str(parser_file)))
            analyzer, parsing_size = get_analyzer(), TINY_PARSING_SIZE
        else:
            self.eva = pulid_weights.load_eva_clip(settings=self.settings)
            recognizer_file, parser_state = production_face_models(self.settings)
            parser = build_parser(parser_state)
            analyzer, parsing_size = get_analyzer("insightface"), PARSING_SIZE
        self.preparer = FacePreparer(analyzer, ArcFaceRecognizer(recognizer_file), parser, parsing_size)
        self._weights_hash = hashlib.sha256(
            "|".join(
                [
                    self.weights.sha256,
                    self.eva.sha256,
                    pulid_weights.file_sha256(recognizer_file),
                    analyzer.model_version,
                ]
            ).encode()
        ).hexdigest()[:32]
        self.handle = None

    @abstractmethod
    def _load_weights(self):
        """This method's checkpoint (released file, or the tiny seeded one for tiny presets)."""

    @property
    def weights_hash(self) -> str:
        return self._weights_hash

    @torch.inference_mode()
    def compute(self, references: list[Image.Image]) -> dict[str, torch.Tensor]:
        prepared = [self.preparer.prepare(image, what=f"reference {i}") for i, image in enumerate(references)]
        faces = torch.from_numpy(np.stack([p.aligned for p in prepared])).permute(0, 3, 1, 2).float().div(255)
        parsing = torch.cat([p.parsing for p in prepared])
        pixels = eva_pixels(faces, self.eva.config.img_size, background_mask(parsing))
        arcface = torch.from_numpy(np.stack([p.arcface for p in prepared]))
        encoder = self.weights.encoder
        cond, uncond = id_tokens(encoder, self.eva.model, arcface, pixels.to(next(self.eva.model.parameters())))
        return {"id": cond.float().cpu(), "uncond": uncond.float().cpu()}

    def _stack(self, samples: list[IdentitySample], key: str) -> torch.Tensor:
        template = next(s.tensors[key] for s in samples if s.tensors is not None)[0]
        tokens, _ = stack_batch([s.tensors[key] if s.tensors is not None else None for s in samples], template)
        return tokens.to(device=self.device, dtype=self.dtype)

    def detach(self, pipe) -> None:
        if self.handle is not None:
            self.handle.detach()
            self.handle = None


class PulidFluxMethod(PulidMethod):
    name: ClassVar[str] = pulid_weights.FLUX_METHOD
    family: ClassVar[str] = "flux"

    def _load_weights(self):
        if self.preset.is_tiny:
            return pulid_weights.load_tiny_pulid_flux(self.settings, dtype=self.dtype, device=self.device)
        return pulid_weights.load_pulid_flux(settings=self.settings, dtype=self.dtype, device=self.device)

    def attach(self, pipe) -> None:
        if self.handle is None:
            self.handle = self.weights.attach(pipe.transformer)

    @contextmanager
    def conditioning(self, pipe, samples: list[IdentitySample], cfg: bool = False) -> Iterator[BatchConditioning]:
        state = PulidFluxState(
            self._stack(samples, "id"),
            weight=[s.weight if s.tensors is not None else 0.0 for s in samples],
            uncond_id_tokens=self._stack(samples, "uncond") if cfg else None,
            start_step=[s.start_step for s in samples],
        )
        with self.handle.use(state):
            yield BatchConditioning(on_step_end=state.callback)


class PulidSDXLMethod(PulidMethod):
    name: ClassVar[str] = pulid_weights.SDXL_METHOD
    family: ClassVar[str] = "sdxl"

    def _load_weights(self):
        if self.preset.is_tiny:
            return pulid_weights.load_tiny_pulid_sdxl(self.settings, dtype=self.dtype, device=self.device)
        return pulid_weights.load_pulid_sdxl(settings=self.settings, dtype=self.dtype, device=self.device)

    def attach(self, pipe) -> None:
        if self.handle is None:
            self.handle = self.weights.attach(pipe.unet)

    @contextmanager
    def conditioning(self, pipe, samples: list[IdentitySample], cfg: bool = False) -> Iterator[BatchConditioning]:
        state = PulidSDXLState(
            self._stack(samples, "id"),
            scale=[s.weight if s.tensors is not None else 0.0 for s in samples],
            uncond_id_tokens=self._stack(samples, "uncond") if cfg else None,
            start_step=[s.start_step for s in samples],
        )
        with self.handle.use(state):
            yield BatchConditioning(on_step_end=state.callback)
