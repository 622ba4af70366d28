"""IP-Adapter identity methods through diffusers' own loaders: SDXL plus-face, SDXL FaceID-PlusV2, FLUX.1 (XLabs).

- :mod:`.weights`: the released files' layouts and reading them (the asset store fetches and converts them).
- :mod:`.adapter`: ``load_ip_adapter`` made per-sample (embeddings, scales, FaceID's LoRA), attach / detach.
- :mod:`.method`: the three ``IdentityMethod`` implementations.
"""

from imagegen.identity.ipadapter.weights import FACEID_PLUSV2_SDXL_METHOD, FLUX_METHOD, PLUS_FACE_SDXL_METHOD

__all__ = ["FACEID_PLUSV2_SDXL_METHOD", "FLUX_METHOD", "PLUS_FACE_SDXL_METHOD"]
