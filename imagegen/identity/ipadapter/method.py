"""IP-Adapter methods as ``IdentityMethod``: SDXL plus-face, SDXL FaceID-PlusV2 and FLUX.1 (XLabs).

``compute`` turns a character's references into image embeddings once (cached in the registry); ``attach`` loads
the adapter into the pipeline with diffusers' ``load_ip_adapter`` (:mod:`.adapter` makes it per-sample);
``conditioning`` hands one batch's embeddings to the pipeline as ``ip_adapter_image_embeds``.

What each method computes from a reference (the face found by the face analyser, its 5 landmarks):

- ``ipadapter-plus-face-sdxl``: ``clip``, CLIP ViT-H's penultimate hidden states ``[1, 257, 1280]`` of the
  FFHQ-aligned face crop.
- ``ipadapter-faceid-plusv2-sdxl``: ``id``, the buffalo_l ArcFace embedding (normalised, ``[1, 512]``), and
  ``clip`` as above of the ArcFace-aligned 224 px crop (insightface ``norm_crop``, as FaceID was trained).
- ``ipadapter-flux``: ``image``, CLIP ViT-L/14's image embedding ``[1, 768]`` of the FFHQ-aligned face crop.

Several references are **averaged** (ArcFace embeddings re-normalised after the mean, CLIP features averaged
token by token over aligned crops): every sample then has the same number of IP tokens, so characters with
different numbers of references batch together, and a sample renders the same alone or in any batch.

Negatives (classifier-free guidance) follow diffusers: CLIP of an all-zero pixel tensor for the SDXL hidden
states, a zero ArcFace vector for FaceID, CLIP of a black image for FLUX's true CFG. They are the same for every
character and are computed once per loaded method.

Every file comes from the asset manifest (``configs/assets.yaml``) through :func:`method_files`, checked before
anything loads; the same code reads the released files and the tiny presets' stand-ins. The face detector is the
method's ``faces`` asset: insightface's ``buffalo_l`` pack for FaceID (what it was trained with; its ``w600k_r50``
gives the ArcFace embedding), dlib for plus-face and FLUX, which only crop the face (public domain, no
non-commercial face models needed). The image encoder is needed only to compute a character's embeddings and the
negatives: it is loaded on demand and released after ``compute``. The cache key is made of the files' digests.
"""

from __future__ import annotations

import gc
import hashlib
import json
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from imagegen.faces import FaceAnalyzer
from imagegen.identity.conditioning import IdentityMethod
from imagegen.identity.faceprep import ArcFaceRecognizer, align_face, method_analyzer
from imagegen.identity.ipadapter.adapter import (
    IPAdapterHandle,
    IPAdapterState,
    LoadSpec,
    attach_ip_adapter,
    split_faceid_lora,
)
from imagegen.identity.ipadapter.weights import (
    ARCFACE_DIM,
    FACEID_PLUSV2_SDXL,
    FACEID_PLUSV2_SDXL_METHOD,
    FLUX_METHOD,
    FLUX_XLABS,
    PLUS_FACE_SDXL,
    PLUS_FACE_SDXL_METHOD,
    AdapterFiles,
    AdapterSource,
    IPAdapterWeightsError,
    adapter_files,
    read_adapter_state_dict,
)
from imagegen.pipelines.assets import MethodFiles, method_files
from imagegen.pipelines.conditioning import BatchConditioning, IdentitySample
from imagegen.pipelines.presets import Preset
from imagegen.settings import Settings, get_settings

#: FaceID's CLIP crop: insightface's ArcFace alignment at this size (``face_align.norm_crop``)
FACEID_CROP_SIZE = 224
#: recorded in the cache key: how references become the encoders' inputs
CROP_RECIPE = "ffhq512+arcface224"


def load_image_encoder(folder: Path, device: torch.device, dtype: torch.dtype):
    """A ``CLIPVisionModelWithProjection`` from a released folder (``config.json`` + ``model.safetensors``)."""
    from transformers import CLIPVisionModelWithProjection
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    # a full CLIPModel folder (openai's) reports its unused text tower at length: expected, not a problem
    transformers_logging.set_verbosity_error()
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(
            str(folder), dtype=dtype, local_files_only=True, use_safetensors=True
        )
    finally:
        transformers_logging.set_verbosity(level)
    return model.to(device).eval().requires_grad_(False)


def encoder_config(folder: Path) -> dict:
    """The vision config of a CLIP image-encoder folder (its ``config.json``, read without loading the weights)."""
    config = json.loads((folder / "config.json").read_text())
    return {**config.get("vision_config", config), "projection_dim": config.get("projection_dim")}


def encoder_image_size(folder: Path) -> int:
    """The input size of a CLIP image-encoder folder, read from its ``config.json`` without loading the weights."""
    return int(encoder_config(folder).get("image_size", 224))


class IPAdapterMethod(IdentityMethod):
    """What the IP-Adapter methods share: files, image encoder, face crops, per-sample batches."""

    version: ClassVar[str] = "2"
    source: ClassVar[AdapterSource]
    #: the tensors ``compute`` returns per character (their shapes: :meth:`example_tensors`)
    tensor_keys: ClassVar[tuple[str, ...]]

    def __init__(self, preset: Preset, device: torch.device, dtype: torch.dtype, settings: Settings | None = None):
        from transformers import CLIPImageProcessor

        self.preset = preset
        self.device = torch.device(device)
        self.dtype = dtype
        self.settings = settings or get_settings()
        self.method_files: MethodFiles = method_files(preset, self.name, self.settings)  # every file checked first
        self.files: AdapterFiles = adapter_files(
            self.source, self.method_files["weights"], self.method_files["image_encoder"]
        )
        self._encoder = None
        size = encoder_image_size(self.files.encoder_dir)
        # what diffusers' load_ip_adapter registers as the pipeline's feature extractor
        self.image_processor = CLIPImageProcessor(size=size, crop_size=size)
        self.image_size = size
        self.analyzer: FaceAnalyzer = method_analyzer(self.method_files)
        #: reference faces prepared so far (a render that hits the cache never adds to it)
        self.calls = 0
        self.handle: IPAdapterHandle | None = None
        self._uncond: dict[str, torch.Tensor] = {}
        parts = [self.method_files.digest, CROP_RECIPE]
        self._weights_hash = hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]

    @property
    def encoder(self):
        """The image encoder, loaded on demand (only ``compute`` and the negatives need it)."""
        if self._encoder is None:
            self._encoder = load_image_encoder(self.files.encoder_dir, self.device, self.dtype)
        return self._encoder

    def release_encoders(self) -> None:
        """Free the image encoder once the negatives are computed (reloaded by the next ``compute``)."""
        self._negatives()
        if self._encoder is not None:
            self._encoder = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _negatives(self) -> None:
        """Compute (once) the negatives ``conditioning`` needs, so the encoder can go."""
        self._uncond_hidden_states()

    def _load_spec(self) -> LoadSpec:
        return LoadSpec(self.files)

    @abstractmethod
    def _compute(self, references: list[Image.Image]) -> dict[str, torch.Tensor]:
        """This method's tensors of one character's references (the encoder is loaded)."""

    @abstractmethod
    def _embeds(self, samples: list[IdentitySample], cfg: bool) -> dict:
        """The pipeline-call keyword arguments (``ip_adapter_image_embeds``) of one batch."""

    def _layer_inputs(self, samples: list[IdentitySample]) -> dict:
        return {}

    def example_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors of the shapes ``compute`` returns, random numbers of a fixed seed: what a warm-up renders with to
        trace the identity path (no face and no image encoder involved: shapes from the encoder's config)."""
        config = encoder_config(self.files.encoder_dir)
        generator = torch.Generator().manual_seed(0)
        tokens = (int(config["image_size"]) // int(config["patch_size"])) ** 2 + 1  # patches + the class token
        examples = {
            "clip": torch.randn(1, tokens, int(config["hidden_size"]), generator=generator),
            "id": torch.nn.functional.normalize(torch.randn(1, ARCFACE_DIM, generator=generator), dim=-1),
            "image": torch.randn(1, int(config.get("projection_dim") or config["hidden_size"]), generator=generator),
        }
        return {key: examples[key] for key in self.tensor_keys}

    # IdentityMethod ------------------------------------------------------------------------------------------

    def compute(self, references: list[Image.Image]) -> dict[str, torch.Tensor]:
        try:
            return self._compute(references)
        finally:
            self.release_encoders()

    @property
    def weights_hash(self) -> str:
        return self._weights_hash

    def attach(self, pipe) -> None:
        # a switch back to this method puts the layers of its first attach back (imagegen.identity.reattach)
        if self.handle is None or not self.handle.reattach():
            self.handle = attach_ip_adapter(pipe, self.family, self._load_spec())
            # the negatives are computed now, so a render never loads the image encoder (it is freed again)
            self.release_encoders()

    def detach(self, pipe) -> None:
        if self.handle is not None:
            self.handle.detach()

    @contextmanager
    def conditioning(self, pipe, samples: list[IdentitySample], cfg: bool = False) -> Iterator[BatchConditioning]:
        weights = [s.weight if s.tensors is not None else 0.0 for s in samples]
        if not any(w != 0 for w in weights):
            # nobody takes identity: the plain pipeline call, not even the projection runs
            yield BatchConditioning()
        else:
            if self.handle is None:
                raise RuntimeError(f"{self.name} is not attached to the pipeline; call attach(pipe) first")
            state = IPAdapterState(
                weights, len(samples), [s.start_step for s in samples], layer_inputs=self._layer_inputs(samples)
            )
            with self.handle.armed(state):
                yield BatchConditioning(
                    kwargs=self._embeds(samples, cfg), on_step_end=state.callback, select_rows=state.select_rows
                )

    # shared helpers ------------------------------------------------------------------------------------------

    def _faces(self, references: list[Image.Image]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(RGB array, 5 landmarks)`` of the largest face of every reference."""
        out = []
        for i, image in enumerate(references):
            self.calls += 1
            rgb = np.asarray(image.convert("RGB"))
            face = self.analyzer.largest(rgb).require(f"reference {i}")
            out.append((rgb, np.asarray(face.landmarks, dtype=np.float32)))
        return out

    def _pixels(self, crops: list[np.ndarray]) -> torch.Tensor:
        pixels = self.image_processor(images=crops, return_tensors="pt").pixel_values
        return pixels.to(device=self.device, dtype=self.encoder.dtype)

    def _hidden_states(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP's penultimate hidden states (what IP-Adapter Plus reads), float32 ``[N, T, C]``."""
        return self.encoder(pixels, output_hidden_states=True).hidden_states[-2].float()

    def _uncond_hidden_states(self) -> torch.Tensor:
        """diffusers' negative for hidden-state adapters: CLIP of an all-zero pixel tensor (CPU ``[1, T, C]``)."""
        if "hidden" not in self._uncond:
            size = self.image_size
            zeros = torch.zeros(1, 3, size, size, device=self.device, dtype=self.encoder.dtype)
            with torch.inference_mode():
                self._uncond["hidden"] = self._hidden_states(zeros).cpu()
        return self._uncond["hidden"]

    def _stack(self, samples: list[IdentitySample], key: str) -> torch.Tensor:
        """``[B, ...]`` of every sample's ``key`` tensor (``[1, ...]`` each; zeros for a sample without one)."""
        template = next(s.tensors[key] for s in samples if s.tensors is not None)
        rows = [s.tensors[key] if s.tensors is not None else torch.zeros_like(template) for s in samples]
        return torch.cat(rows).to(device=self.device, dtype=self.dtype)

    def _as_images(self, per_sample: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
        """Per-sample embeddings ``[B, ...]`` as the pipeline's "B images" ``[1, B, ...]`` (``[2, B, ...]`` with
        SDXL's CFG negatives first)."""
        images = per_sample.unsqueeze(0)
        if negative is None:
            return images
        return torch.cat([negative.to(per_sample).expand_as(per_sample).unsqueeze(0), images])


class PlusFaceSDXLMethod(IPAdapterMethod):
    """``h94/IP-Adapter`` plus-face for SDXL (ViT-H): CLIP hidden states of the face through the Resampler."""

    name: ClassVar[str] = PLUS_FACE_SDXL_METHOD
    family: ClassVar[str] = "sdxl"
    source: ClassVar[AdapterSource] = PLUS_FACE_SDXL
    tensor_keys: ClassVar[tuple[str, ...]] = ("clip",)

    @torch.inference_mode()
    def _compute(self, references: list[Image.Image]) -> dict[str, torch.Tensor]:
        crops = [align_face(rgb, landmarks) for rgb, landmarks in self._faces(references)]
        hidden = self._hidden_states(self._pixels(crops))
        return {"clip": hidden.mean(dim=0, keepdim=True).cpu()}

    def _embeds(self, samples: list[IdentitySample], cfg: bool) -> dict:
        negative = self._uncond_hidden_states() if cfg else None
        return {"ip_adapter_image_embeds": [self._as_images(self._stack(samples, "clip"), negative)]}


class FaceIDPlusV2SDXLMethod(IPAdapterMethod):
    """``h94/IP-Adapter-FaceID`` FaceID-PlusV2 for SDXL: ArcFace (buffalo_l) + CLIP ViT-H face crop + its LoRA."""

    name: ClassVar[str] = FACEID_PLUSV2_SDXL_METHOD
    family: ClassVar[str] = "sdxl"
    source: ClassVar[AdapterSource] = FACEID_PLUSV2_SDXL
    tensor_keys: ClassVar[tuple[str, ...]] = ("id", "clip")

    #: FaceID-PlusV2's shortcut: the ArcFace tokens are added to the resampler's output, times this
    shortcut_scale: ClassVar[float] = 1.0

    def __init__(self, preset: Preset, device: torch.device, dtype: torch.dtype, settings: Settings | None = None):
        super().__init__(preset, device, dtype, settings)
        # the pack's own ArcFace (buffalo_l's w600k_r50): FaceID reads its embedding of the detected face
        self.recognizer = ArcFaceRecognizer(self.analyzer.recognizer_file)

    def _load_spec(self) -> LoadSpec:
        weights = read_adapter_state_dict(self.files.weight_file)
        ip_weights, lora = split_faceid_lora(weights["ip_adapter"])
        if not lora:
            raise IPAdapterWeightsError(
                f"{self.files.weight_file} holds no FaceID LoRA (ip_adapter.*_lora.*): not a FaceID-PlusV2 checkpoint"
            )
        return LoadSpec(
            self.files,
            state_dict={"image_proj": weights["image_proj"], "ip_adapter": ip_weights},
            lora=lora,
            projection_attrs={"shortcut": True, "shortcut_scale": self.shortcut_scale},
        )

    @torch.inference_mode()
    def _compute(self, references: list[Image.Image]) -> dict[str, torch.Tensor]:
        from insightface.utils import face_align

        faces = self._faces(references)
        ids = []
        for rgb, landmarks in faces:
            raw = self.recognizer.raw_embedding(rgb, landmarks)
            ids.append(raw / max(float(np.linalg.norm(raw)), 1e-12))  # insightface's normed_embedding
        mean = np.mean(ids, axis=0)
        identity = torch.from_numpy(mean / max(float(np.linalg.norm(mean)), 1e-12)).float()[None]
        crops = [face_align.norm_crop(rgb, landmark=lm, image_size=FACEID_CROP_SIZE) for rgb, lm in faces]
        hidden = self._hidden_states(self._pixels(crops))
        return {"id": identity, "clip": hidden.mean(dim=0, keepdim=True).cpu()}

    def _embeds(self, samples: list[IdentitySample], cfg: bool) -> dict:
        identity = self._stack(samples, "id")
        negative = torch.zeros_like(identity[:1]) if cfg else None
        return {"ip_adapter_image_embeds": [self._as_images(identity, negative)]}

    def _layer_inputs(self, samples: list[IdentitySample]) -> dict:
        clip = self._stack(samples, "clip").unsqueeze(1)  # [B, 1, T, C]: one image per row
        uncond = self._uncond_hidden_states().to(clip).unsqueeze(1).expand_as(clip)
        return {"clip_embeds": (clip, uncond)}


class FluxIPAdapterMethod(IPAdapterMethod):
    """``XLabs-AI/flux-ip-adapter`` through diffusers' ``FluxIPAdapterMixin`` (CLIP ViT-L/14 image embedding)."""

    name: ClassVar[str] = FLUX_METHOD
    family: ClassVar[str] = "flux"
    source: ClassVar[AdapterSource] = FLUX_XLABS
    tensor_keys: ClassVar[tuple[str, ...]] = ("image",)
    #: the IP processors sit inside the blocks a residual cache skips (its residual carries their output), and a
    #: sample's start step makes the cache compute (:mod:`.adapter`); tests/identity_profiles checks each
    step_caches: ClassVar[frozenset[str]] = frozenset({"first-block", "magcache"})

    @torch.inference_mode()
    def _compute(self, references: list[Image.Image]) -> dict[str, torch.Tensor]:
        crops = [align_face(rgb, landmarks) for rgb, landmarks in self._faces(references)]
        embeds = self.encoder(self._pixels(crops)).image_embeds.float()
        return {"image": embeds.mean(dim=0, keepdim=True).cpu()}

    def _negatives(self) -> None:
        self._uncond_image()

    def _uncond_image(self) -> torch.Tensor:
        """diffusers' FLUX negative: the CLIP embedding of a black image (CPU ``[1, D]``)."""
        if "image" not in self._uncond:
            size = self.image_size
            with torch.inference_mode():
                black = self._pixels([np.zeros((size, size, 3), dtype=np.uint8)])
                self._uncond["image"] = self.encoder(black).image_embeds.float().cpu()
        return self._uncond["image"]

    def _embeds(self, samples: list[IdentitySample], cfg: bool) -> dict:
        images = self._stack(samples, "image")
        negative = self._uncond_image().to(images).expand_as(images)
        # always given: without it the pipeline would encode a black image itself (it has no image encoder)
        return {
            "ip_adapter_image_embeds": [self._as_images(images, None)],
            "negative_ip_adapter_image_embeds": [self._as_images(negative, None)],
        }
