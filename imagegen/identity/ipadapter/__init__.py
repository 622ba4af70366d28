"""IP-Adapter identity methods through diffusers' own loaders: SDXL plus-face, SDXL FaceID-PlusV2, FLUX.1 (XLabs).

- :mod:`.weights`: released files (hub → model cache), the FaceID pickle conversion, tiny seeded files in the
  released layouts.
- :mod:`.adapter`: ``load_ip_adapter`` made per-sample (embeddings, scales, FaceID's LoRA), attach / detach.
- :mod:`.method`: the three ``IdentityMethod`` implementations.
"""

from imagegen.identity.ipadapter.weights import (
    FACEID_PLUSV2_SDXL_METHOD,
    FLUX_METHOD,
    PLUS_FACE_SDXL_METHOD,
    convert_faceid_checkpoint,
    ensure_tiny_ipadapter,
)

__all__ = [
    "FACEID_PLUSV2_SDXL_METHOD",
    "FLUX_METHOD",
    "PLUS_FACE_SDXL_METHOD",
    "convert_faceid_checkpoint",
    "ensure_tiny_ipadapter",
]
