"""PuLID as an ``IdentityMethod``: FLUX.1 (v0.9.1) and SDXL (v1.1).

``compute`` turns a character's references into id tokens once (face preparation, EVA-CLIP,
IDFormer; several references are encoded together through IDFormer's multi-image input), and
``conditioning`` applies cached tokens per sample for one batch.

Every file comes from the asset manifest (``configs/assets.yaml``) through :func:`method_files`, which checks
them all before anything is loaded; the same code reads the released files and the tiny presets' stand-ins:

| role | asset | loaded as |
| --- | --- | --- |
| ``faces`` | insightface ``antelopev2`` (SCRFD detector, 5 landmarks; ``glintr100`` raw ArcFace) | ONNX, insightface |
| ``face_parser`` | facexlib BiSeNet ``parsing_bisenet.pth``, converted to safetensors | facexlib's ``BiSeNet`` |
| ``eva_clip`` | EVA02-CLIP-L-14-336 ``.pt``, converted to safetensors | timm (:mod:`.eva_clip`) |
| ``weights`` | ``guozinan/PuLID`` safetensors (IDFormer + cross-attentions / id_to_k,v) | :mod:`.weights` |

The face models and EVA-CLIP are needed only to compute a character's tokens: they are loaded on the first
``compute`` and released when it ends, so a serving replica whose characters are cached holds only the pipeline
and the PuLID weights. The cache key (:attr:`weights_hash`) is made of the files' digests, known before loading.

Dtypes on CUDA (:data:`DTYPE_PLAN`; everything is float32 on CPU) follow the reference code: FLUX runs EVA-CLIP,
IDFormer and the cross-attentions in the pipeline's bf16; SDXL runs EVA-CLIP and the ``id_to_k/v`` projections in
the UNet's fp16 but IDFormer in float32, as ``pulid/pipeline_v1_1.py`` does.
"""

from __future__ import annotations

import gc
import hashlib
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from imagegen.identity.conditioning import IdentityMethod
from imagegen.identity.faceprep import ArcFaceRecognizer, method_analyzer
from imagegen.identity.pulid import weights as pulid_weights
from imagegen.identity.pulid.embed import background_mask, eva_pixels, id_tokens, stack_batch
from imagegen.identity.pulid.flux_ca import PulidFluxState
from imagegen.identity.pulid.preparer import FacePreparer, build_parser
from imagegen.identity.pulid.sdxl_processor import PulidSDXLState
from imagegen.pipelines.assets import MethodFiles, method_files
from imagegen.pipelines.conditioning import BatchConditioning, IdentitySample
from imagegen.pipelines.presets import Preset
from imagegen.settings import Settings, get_settings

#: BiSeNet's input size (facexlib parses the 512 px aligned face at full size)
PARSING_SIZE = 512
#: component -> dtype on CUDA: "model" is the pipeline's dtype (bf16 FLUX, fp16 SDXL), else the named one
DTYPE_PLAN: dict[str, dict[str, str]] = {
    "flux": {"eva_clip": "model", "idformer": "model", "cross_attention": "model"},
    "sdxl": {"eva_clip": "model", "idformer": "float32", "cross_attention": "model"},
}


def plan_dtype(family: str, component: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``component`` runs in for a pipeline in ``model_dtype`` (float32 stays float32 everywhere)."""
    choice = DTYPE_PLAN[family][component]
    return model_dtype if choice == "model" else getattr(torch, choice)


@dataclass
class _Encoders:
    """What only ``compute`` needs: the face preparation chain and EVA-CLIP."""

    preparer: FacePreparer
    eva: pulid_weights.EvaClipWeights


class PulidMethod(IdentityMethod):
    """What PuLID FLUX and SDXL share: the files, the ID encoder pipeline and the cache key."""

    version: ClassVar[str] = "2"

    def __init__(self, preset: Preset, device: torch.device, dtype: torch.dtype, settings: Settings | None = None):
        self.preset = preset
        self.device = device
        self.dtype = dtype
        self.settings = settings or get_settings()
        self.files: MethodFiles = method_files(preset, self.name, self.settings)  # every file checked first
        self.weights = self._load_weights()
        self._weights_hash = hashlib.sha256(self.files.digest.encode()).hexdigest()[:32]
        self._encoders: _Encoders | None = None
        #: reference faces prepared so far (a render that hits the cache never adds to it)
        self.calls = 0
        self.handle = None

    @abstractmethod
    def _load_weights(self):
        """This method's checkpoint, from ``self.files["weights"]``."""

    def _component_dtype(self, component: str) -> torch.dtype:
        return plan_dtype(self.family, component, self.dtype)

    def _load_encoders(self) -> _Encoders:
        if self._encoders is None:
            analyzer = method_analyzer(self.files)
            recognizer = ArcFaceRecognizer(analyzer.recognizer_file)
            parser = build_parser(load_file(str(self.files["face_parser"]))).to(self.device)
            eva = pulid_weights.load_eva_clip(
                self.files["eva_clip"], dtype=self._component_dtype("eva_clip"), device=self.device
            )
            self._encoders = _Encoders(FacePreparer(analyzer, recognizer, parser, PARSING_SIZE), eva)
        return self._encoders

    def release_encoders(self) -> None:
        """Free the face models and EVA-CLIP (reloaded by the next ``compute``)."""
        if self._encoders is not None:
            self._encoders = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @property
    def weights_hash(self) -> str:
        return self._weights_hash

    @torch.inference_mode()
    def compute(self, references: list[Image.Image]) -> dict[str, torch.Tensor]:
        try:
            encoders = self._load_encoders()
            prepared = []
            for i, image in enumerate(references):
                self.calls += 1
                prepared.append(encoders.preparer.prepare(image, what=f"reference {i}"))
            faces = torch.from_numpy(np.stack([p.aligned for p in prepared])).permute(0, 3, 1, 2).float().div(255)
            parsing = torch.cat([p.parsing for p in prepared]).to(faces.device)
            pixels = eva_pixels(faces, encoders.eva.config.img_size, background_mask(parsing))
            arcface = torch.from_numpy(np.stack([p.arcface for p in prepared]))
            eva_model = encoders.eva.model
            cond, uncond = id_tokens(self.weights.encoder, eva_model, arcface, pixels.to(next(eva_model.parameters())))
            return {"id": cond.float().cpu(), "uncond": uncond.float().cpu()}
        finally:
            self.release_encoders()

    def example_tensors(self) -> dict[str, torch.Tensor]:
        """Id tokens of the shapes ``compute`` returns (``[1, num_queries, output_dim]``, cond and uncond), random
        numbers of a fixed seed: what a warm-up renders with to trace the identity path (no face involved)."""
        config = self.weights.encoder.config
        generator = torch.Generator().manual_seed(0)
        shape = (1, config.num_queries, config.output_dim)
        return {"id": torch.randn(shape, generator=generator), "uncond": torch.randn(shape, generator=generator)}

    def _stack(self, samples: list[IdentitySample], key: str) -> torch.Tensor:
        template = next(s.tensors[key] for s in samples if s.tensors is not None)[0]
        tokens, _ = stack_batch([s.tensors[key] if s.tensors is not None else None for s in samples], template)
        return tokens.to(device=self.device, dtype=self.dtype)

    def detach(self, pipe) -> None:
        # the handle keeps its processors for the next attach (imagegen.identity.reattach)
        if self.handle is not None:
            self.handle.detach()

    def _reattached(self) -> bool:
        """Whether the handle of an earlier attach is on the model again (False: build a new one)."""
        return self.handle is not None and self.handle.reattach()


class PulidFluxMethod(PulidMethod):
    name: ClassVar[str] = pulid_weights.FLUX_METHOD
    family: ClassVar[str] = "flux"
    #: the cross-attention hooks add nothing on a step the cache answers from its residual (which holds them), and
    #: a sample's start step makes the cache compute (:mod:`.flux_ca`); tests/identity_profiles checks each
    step_caches: ClassVar[frozenset[str]] = frozenset({"first-block", "magcache"})

    def _load_weights(self):
        return pulid_weights.load_pulid_flux(self.files["weights"], dtype=self.dtype, device=self.device)

    def attach(self, pipe) -> None:
        if not self._reattached():
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
            yield BatchConditioning(on_step_end=state.callback, select_rows=state.select_rows)


class PulidSDXLMethod(PulidMethod):
    name: ClassVar[str] = pulid_weights.SDXL_METHOD
    family: ClassVar[str] = "sdxl"

    def _load_weights(self):
        weights = pulid_weights.load_pulid_sdxl(self.files["weights"], dtype=self.dtype, device=self.device)
        weights.encoder.to(self._component_dtype("idformer"))  # the reference runs SDXL's IDFormer in float32
        return weights

    def attach(self, pipe) -> None:
        if not self._reattached():
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
            yield BatchConditioning(on_step_end=state.callback, select_rows=state.select_rows)
