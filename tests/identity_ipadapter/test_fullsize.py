"""Full-size architecture checks of the IP-Adapter files, on the meta device (nothing is allocated).

The released files cannot be downloaded here, so their key layouts are recorded as manifests (key -> shape) in
``tests/fixtures/ipadapter/*.keys.json``. The manifests are *derived* from diffusers' own modules by
``bench/make_ipadapter_manifests.py`` (see its docstring and each manifest's ``source``), not read from the
released files. These tests then:

- serve every manifest key as an empty **meta** tensor of its full-size shape, in place of the file's bytes (the
  only stand-in: ``safetensors.safe_open`` on that one path), and run imagegen's own loading path against the
  full-size SDXL base UNet / FLUX.1-dev transformer built on the meta device: the method's ``_load_spec``
  (``read_adapter_state_dict`` + ``split_faceid_lora`` for FaceID) and ``attach_ip_adapter`` (diffusers'
  ``load_ip_adapter`` underneath, the per-sample wrappers, FaceID's LoRA hooks);
- check it strictly: every key of the file is read, every module diffusers fills gets exactly its own keys and
  shapes (diffusers' default loading path skips unknown keys silently, so each of its loads is recorded and
  compared), every parameter of the file ends up in a module or a LoRA hook, and everything stays on meta;
- check that the tiny stand-in files of the tiny presets have the same key pattern as the full-size manifests
  (the same keys up to layer counts, the same tensor ranks, IP weights on exactly the cross-attentions);
- check that the committed manifests are what the generator derives from the installed diffusers.
"""

from __future__ import annotations

import importlib.util
import json
import re
import resource
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from imagegen.identity.ipadapter.adapter import attach_ip_adapter, describe
from imagegen.identity.ipadapter.method import FaceIDPlusV2SDXLMethod, FluxIPAdapterMethod, PlusFaceSDXLMethod
from imagegen.identity.ipadapter.weights import AdapterFiles

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "ipadapter"
GENERATOR = ROOT / "bench" / "make_ipadapter_manifests.py"
#: the SDXL base UNet: 140 attention processors, 70 of them cross-attentions; FLUX.1-dev: 19 double blocks
SDXL_PROCESSORS, SDXL_CROSS, FLUX_DOUBLE = 140, 70, 19


@dataclass(frozen=True)
class Case:
    method: type
    family: str
    ip_processor: str
    projection: str
    wrapped_layers: int
    lora_hooks: int
    tensors: int


CASES = {
    "plus_face_sdxl": Case(
        PlusFaceSDXLMethod, "sdxl", "IPAdapterAttnProcessor2_0", "IPAdapterPlusImageProjection", SDXL_CROSS, 0, 191
    ),
    "faceid_plusv2_sdxl": Case(
        FaceIDPlusV2SDXLMethod,
        "sdxl",
        "IPAdapterAttnProcessor2_0",
        "IPAdapterFaceIDPlusImageProjection",
        SDXL_CROSS,
        SDXL_PROCESSORS * 4,  # to_q / to_k / to_v / to_out.0 of every processor
        1316,
    ),
    "xlabs_flux": Case(
        FluxIPAdapterMethod, "flux", "FluxIPAdapterAttnProcessor", "ImageProjection", FLUX_DOUBLE, 0, 80
    ),
}


def manifest(kind: str) -> dict:
    return json.loads((FIXTURES / f"{kind}.keys.json").read_text())


def shapes(kind: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in manifest(kind)["keys"].items()}


def numel(shape) -> int:
    return int(torch.Size(shape).numel())


def module_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# full-size models on the meta device ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def configs() -> dict:
    return json.loads((FIXTURES / "full_size_configs.json").read_text())


@pytest.fixture(scope="module")
def full_unet(configs):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(configs["sdxl_unet"])


@pytest.fixture(scope="module")
def full_flux(configs):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(configs["flux_transformer"])


def test_full_size_models_are_the_released_architectures(full_unet, full_flux):
    assert sum(p.numel() for p in full_unet.parameters()) == 2_567_463_684  # SDXL base UNet
    assert sum(p.numel() for p in full_flux.parameters()) == 11_901_408_320  # FLUX.1-dev transformer
    names = list(full_unet.attn_processors)
    cross = [i for i, n in enumerate(names) if n.endswith("attn2.processor")]
    assert len(names) == SDXL_PROCESSORS and cross == list(range(1, SDXL_PROCESSORS, 2))
    # the same processor numbering PuLID's released SDXL file uses (recorded from the official implementation)
    pulid = json.loads((ROOT / "tests/fixtures/parity/pulid_sdxl_v1.1.keys.json").read_text())
    assert all(names[i] == name for i, name in pulid["attn_processor_index_to_name"])
    for kind in ("plus_face_sdxl", "faceid_plusv2_sdxl"):
        assert [list(x) for x in manifest(kind)["attn_processor_index_to_name"]] == [
            [i, n] for i, n in enumerate(names)
        ]
    assert full_flux.config.num_layers == FLUX_DOUBLE and full_flux.config.num_single_layers == 38


# the released file, served as meta tensors -----------------------------------------------------------------------


class MetaCheckpoint:
    """``safetensors.safe_open`` for one path: the manifest's keys as empty meta tensors; other paths are real."""

    def __init__(self, path: Path, keys: Mapping[str, tuple[int, ...]], real_open):
        self.path = Path(path)
        self.keys = dict(keys)
        self.real_open = real_open
        self.reads: Counter = Counter()

    def __call__(self, filename, framework: str = "pt", device: str = "cpu"):
        if Path(filename) != self.path:
            return self.real_open(filename, framework=framework, device=device)
        return _MetaHandle(self)


class _MetaHandle:
    def __init__(self, checkpoint: MetaCheckpoint):
        self.checkpoint = checkpoint

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def keys(self) -> list[str]:
        return list(self.checkpoint.keys)

    def metadata(self) -> dict:
        return {"format": "pt"}

    def get_tensor(self, key: str) -> torch.Tensor:
        self.checkpoint.reads[key] += 1
        return torch.empty(self.checkpoint.keys[key], device="meta")


@pytest.fixture
def recorded_loads(monkeypatch) -> list[tuple[torch.nn.Module, dict[str, tuple[int, ...]]]]:
    """Every ``(module, {key: shape})`` diffusers' IP-Adapter loaders put into a module.

    With its default ``low_cpu_mem_usage=True`` diffusers fills modules through ``load_model_dict_into_meta``,
    which skips keys the module does not have and leaves missing ones unset; recording the calls lets the test
    compare each with the module's own state dict (what ``load_state_dict(strict=True)`` would).
    """
    import diffusers.loaders.transformer_flux as flux_loader
    import diffusers.loaders.unet as unet_loader

    calls = []
    for loader in (unet_loader, flux_loader):
        original = loader.load_model_dict_into_meta

        def spy(model, state_dict, *args, _original=original, **kwargs):
            calls.append((model, {k: tuple(v.shape) for k, v in state_dict.items()}))
            return _original(model, state_dict, *args, **kwargs)

        monkeypatch.setattr(loader, "load_model_dict_into_meta", spy)
    return calls


def meta_pipeline(family: str, model):
    """The diffusers pipeline class the presets use, around the full-size meta model (no other component)."""
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=None,
            text_encoder=None,
            text_encoder_2=None,
            tokenizer=None,
            tokenizer_2=None,
            unet=model,
            scheduler=None,
            add_watermarker=False,
        )
    return FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=model,
    )


def meta_method(case: Case, files: AdapterFiles):
    """The method with only what its loading path reads (``files``): its ``__init__`` also loads the image encoder
    and the face analyser, which are not part of the adapter file."""
    method = object.__new__(case.method)
    method.files = files
    method.handle = None
    return method


@pytest.mark.parametrize("kind", list(CASES))
def test_released_layout_loads_strictly_at_full_size_on_meta(
    kind, full_unet, full_flux, recorded_loads, monkeypatch, tmp_path
):
    import diffusers.loaders.ip_adapter
    import safetensors

    case = CASES[kind]
    keys = shapes(kind)
    assert len(keys) == case.tensors == manifest(kind)["tensors"]
    model = full_unet if case.family == "sdxl" else full_flux
    files = AdapterFiles(case.method.source, tmp_path / "adapter", tmp_path / "encoder")
    files.weight_file.parent.mkdir(parents=True)
    files.weight_file.write_bytes(b"")  # where the file would be: its tensors come from the manifest
    checkpoint = MetaCheckpoint(files.weight_file, keys, safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", checkpoint)  # imagegen's read_adapter_state_dict
    monkeypatch.setattr(diffusers.loaders.ip_adapter, "safe_open", checkpoint)  # diffusers' load_ip_adapter
    pipe = meta_pipeline(case.family, model)
    before = dict(model.attn_processors)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    spec = meta_method(case, files)._load_spec()
    handle = attach_ip_adapter(pipe, case.family, spec)
    try:
        peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        info = describe(handle)
        assert info["ip_processors"] == [case.ip_processor] and info["projections"] == [case.projection]
        assert info["wrapped_layers"] == case.wrapped_layers and info["lora_hooks"] == case.lora_hooks

        # every key of the file was read, once
        assert set(checkpoint.reads) == set(keys) and set(checkpoint.reads.values()) == {1}
        # every module diffusers filled got exactly its own keys and shapes: none missing, none unexpected
        assert recorded_loads, "diffusers did not load through load_model_dict_into_meta"
        for module, loaded in recorded_loads:
            assert loaded == module_shapes(module), type(module).__name__
        projection = handle.projection.image_projection_layers[0]
        assert any(module is projection for module, _ in recorded_loads)
        ip_layers = [p.ip for p in model.attn_processors.values() if hasattr(p, "ip")]
        assert len(ip_layers) == case.wrapped_layers
        assert {id(p) for p in ip_layers} <= {id(module) for module, _ in recorded_loads}
        # every parameter of the file went somewhere: diffusers' modules or FaceID's LoRA hooks
        lora = spec.lora or {}
        lora_numel = sum(t.numel() for layers in lora.values() for pair in layers.values() for t in pair)
        loaded_numel = sum(numel(s) for _, loaded in recorded_loads for s in loaded.values())
        assert loaded_numel + lora_numel == sum(numel(s) for s in keys.values()) == manifest(kind)["parameters"]
        if case.lora_hooks:
            assert sorted(lora) == list(range(SDXL_PROCESSORS))
            assert {frozenset(layers) for layers in lora.values()} == {frozenset({"to_q", "to_k", "to_v", "to_out"})}
            assert {down.shape[0] for layers in lora.values() for down, _ in layers.values()} == {128}  # rank
        # nothing was allocated: every tensor involved is on the meta device
        built = [projection, *ip_layers]
        assert all(t.is_meta for module in built for t in module.state_dict().values())
        assert all(t.is_meta for layers in lora.values() for pair in layers.values() for t in pair)
        assert peak_after - peak_before < 512 * 1024  # KiB: far below the file's size at any dtype
    finally:
        handle.detach()
    assert all(model.attn_processors[name] is processor for name, processor in before.items())
    assert getattr(model, "encoder_hid_proj", None) is None


# the tiny stand-ins have the same key pattern -------------------------------------------------------------------


def key_pattern(keys: Mapping[str, tuple[int, ...]]) -> dict[str, set[int]]:
    """Key -> tensor ranks, with processor / double-block indices replaced by ``*`` (layer counts differ)."""
    pattern: dict[str, set[int]] = {}
    for key, shape in keys.items():
        general = re.sub(r"^(ip_adapter|double_blocks)\.\d+\.", r"\1.*.", key)
        pattern.setdefault(general, set()).add(len(shape))
    return pattern


def indices(keys, suffix: str) -> list[int]:
    found = {int(k.split(".")[1]) for k in keys if k.endswith(suffix) and k.startswith(("ip_adapter.", "double_"))}
    return sorted(found)


@pytest.fixture(scope="module")
def tiny_models():
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from imagegen.pipelines.tiny import ensure_tiny_repo

    unet_config = UNet2DConditionModel.load_config(str(ensure_tiny_repo("sdxl") / "unet"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    flux_config = FluxTransformer2DModel.load_config(str(ensure_tiny_repo("flux") / "transformer"))
    return unet, flux_config


def tiny_keys(kind: str, tiny_models) -> dict[str, tuple[int, ...]]:
    from imagegen.standins import identity as standins

    unet, flux_config = tiny_models
    tensors = {
        "plus_face_sdxl": lambda: standins.tiny_plus_face_state_dict(unet),
        "faceid_plusv2_sdxl": lambda: standins.tiny_faceid_state_dict(unet),
        "xlabs_flux": lambda: standins.tiny_xlabs_flux_state_dict(flux_config),
    }[kind]()
    return {k: tuple(v.shape) for k, v in tensors.items()}


def cross_indices(unet) -> list[int]:
    return [i for i, name in enumerate(unet.attn_processors) if name.endswith("attn2.processor")]


@pytest.mark.parametrize("kind", list(CASES))
def test_tiny_stand_ins_have_the_full_size_key_pattern(kind, tiny_models, full_unet):
    full, tiny = shapes(kind), tiny_keys(kind, tiny_models)
    assert key_pattern(tiny) == key_pattern(full)
    tiny_unet, flux_config = tiny_models
    if kind == "xlabs_flux":
        assert indices(full, "k_proj.weight") == list(range(FLUX_DOUBLE))
        assert indices(tiny, "k_proj.weight") == list(range(flux_config["num_layers"]))
        return
    # IP weights on exactly the cross-attention processors, numbered among all processors, in both
    assert indices(full, "to_k_ip.weight") == cross_indices(full_unet)
    assert indices(tiny, "to_k_ip.weight") == cross_indices(tiny_unet)
    if kind == "faceid_plusv2_sdxl":  # the LoRA on every processor, self-attentions included
        assert indices(full, "to_out_lora.up.weight") == list(range(len(full_unet.attn_processors)))
        assert indices(tiny, "to_out_lora.up.weight") == list(range(len(tiny_unet.attn_processors)))


# the manifests are what diffusers derives ---------------------------------------------------------------------


def test_manifests_are_what_the_generator_derives_from_diffusers():
    spec = importlib.util.spec_from_file_location("make_ipadapter_manifests", GENERATOR)
    generator = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = generator
    try:
        spec.loader.exec_module(generator)
        derived = generator.build_manifests()  # also loads each one with diffusers' forward conversion, strict
    finally:
        sys.modules.pop(spec.name, None)
    for kind in CASES:
        committed = manifest(kind)
        assert derived[kind]["keys"] == committed["keys"], f"regenerate with python {GENERATOR.relative_to(ROOT)}"
        assert "NOT read from the released file" in committed["source"]
        assert committed["diffusers_version"] in committed["source"]
