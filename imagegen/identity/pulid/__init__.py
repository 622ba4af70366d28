"""PuLID identity conditioning for FLUX.1 (v0.9.1) and SDXL (v1.1).

Modules:

- :mod:`~imagegen.identity.pulid.encoder`: the IDFormer id encoder (ArcFace + EVA-CLIP features → id tokens).
- :mod:`~imagegen.identity.pulid.eva_clip`: the EVA02-CLIP-L-14-336 visual tower (timm) and its hidden states.
- :mod:`~imagegen.identity.pulid.flux_ca`: the FLUX cross-attentions and the hooks that attach them to
  diffusers' ``FluxTransformer2DModel`` with per-sample weights and a start-step gate.
- :mod:`~imagegen.identity.pulid.convert`: BFL single-file FLUX state dict → diffusers, any width and depth.
- :mod:`~imagegen.identity.pulid.sdxl_processor`: PuLID v1.1's SDXL cross-attention processors.
- :mod:`~imagegen.identity.pulid.weights`: released checkpoints (hub or local, safetensors only) and the tiny
  seeded weights of the tiny presets.
"""
