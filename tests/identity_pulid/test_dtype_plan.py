"""The dtype plan (which part runs in which dtype, following PuLID's reference) and releasing the encoders."""

from __future__ import annotations

import pytest
import torch

from imagegen.identity.ipadapter.method import PlusFaceSDXLMethod
from imagegen.identity.pulid.method import DTYPE_PLAN, PulidFluxMethod, PulidSDXLMethod, plan_dtype
from imagegen.pipelines.presets import get_preset
from tests.photos import astronaut_set


def test_the_plan_follows_the_reference():
    assert plan_dtype("flux", "eva_clip", torch.bfloat16) == torch.bfloat16
    assert plan_dtype("flux", "idformer", torch.bfloat16) == torch.bfloat16
    assert plan_dtype("sdxl", "idformer", torch.float16) == torch.float32  # pipeline_v1_1 keeps IDFormer fp32
    assert plan_dtype("sdxl", "eva_clip", torch.float16) == torch.float16
    assert all(plan_dtype(f, c, torch.float32) == torch.float32 for f in DTYPE_PLAN for c in DTYPE_PLAN[f])


@pytest.mark.parametrize(
    ("cls", "preset", "dtype", "idformer", "layers"),
    [
        (PulidFluxMethod, "tiny-flux", torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (PulidSDXLMethod, "tiny-sdxl", torch.float16, torch.float32, torch.float16),
    ],
)
def test_loaded_parts_are_in_their_planned_dtypes(cls, preset, dtype, idformer, layers):
    method = cls(get_preset(preset), torch.device("cpu"), dtype)
    assert next(method.weights.encoder.parameters()).dtype == idformer
    if cls is PulidFluxMethod:
        assert {p.dtype for p in method.weights.cross_attentions.parameters()} == {layers}
    else:
        assert {t.dtype for t in method.weights.layer_weights.values()} <= {layers, torch.float32}
    encoders = method._load_encoders()
    assert next(encoders.eva.model.parameters()).dtype == dtype
    method.release_encoders()


def test_face_models_and_encoders_are_released_after_compute():
    import io

    from PIL import Image

    images = [Image.open(io.BytesIO(data)).convert("RGB") for _, data in astronaut_set(2)]
    pulid = PulidFluxMethod(get_preset("tiny-flux"), torch.device("cpu"), torch.float32)
    key = pulid.weights_hash
    tokens = pulid.compute(images)
    assert pulid._encoders is None and tokens["id"].shape[0] == 1
    assert pulid.weights_hash == key  # the cache key came from the files' digests, before anything loaded
    again = pulid.compute(images)  # reloaded on demand, same result
    assert torch.equal(tokens["id"], again["id"]) and pulid._encoders is None

    plus = PlusFaceSDXLMethod(get_preset("tiny-sdxl"), torch.device("cpu"), torch.float32)
    assert plus._encoder is None  # nothing loaded until a character is computed
    plus.compute(images)
    assert plus._encoder is None and "hidden" in plus._uncond  # the negatives stay, the encoder goes


def test_a_render_never_loads_the_image_encoder():
    """Attaching computes the negatives and frees the encoder: conditioning a batch touches no face model."""
    from imagegen.identity.provider import identity_renderer
    from imagegen.pipelines.conditioning import IdentitySample

    renderer = identity_renderer("tiny-sdxl")
    method = renderer.identity_method("ipadapter-plus-face-sdxl")
    assert method._encoder is None and "hidden" in method._uncond
    tensors = {"clip": torch.zeros_like(method._uncond["hidden"])}
    with method.conditioning(renderer.pipe, [IdentitySample(tensors=tensors, weight=1.0, start_step=0)], cfg=True):
        pass
    assert method._encoder is None
