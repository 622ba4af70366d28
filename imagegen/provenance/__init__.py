"""Provenance on every served image: a signed C2PA manifest, metadata and a robust invisible watermark.

- ``watermark``: dwtDctSvd at a canonical scale with a Reed-Solomon coded 48-bit payload (marker
  + the 32-bit tag that finds the audit record); survives JPEG down to quality 50, resizes
  between 0.5x and 2x and centred crops (see the module for what is searched).
- ``manifest``: the C2PA manifest (``c2pa.created``, ``trainedAlgorithmicMedia``, generator,
  character, request), signed and validated with ``c2pa-python``.
- ``keys``: the signer: ``IMAGEGEN_C2PA_CERT`` / ``IMAGEGEN_C2PA_KEY``, or a development pair.
- ``stamp``: what the renderer calls on every image (watermark, metadata, encode once, sign).
- ``check``: ``imagegen provenance check``: which layers survived, the signer, the audit record.
"""

from __future__ import annotations

from imagegen.provenance import keys, manifest, watermark
from imagegen.provenance.check import DEVELOPMENT_SIGNER, check_image
from imagegen.provenance.keys import (
    SignerConfigError,
    SignerMaterial,
    load_signer,
    make_development_pair,
    signer_material,
)
from imagegen.provenance.manifest import IPTC_AI_GENERATED, SignerCheckFailed, read_manifest, verify_signer
from imagegen.provenance.stamp import (
    EXEMPT_REASON,
    FORMATS,
    MIN_WATERMARK_SIDE,
    PAYLOAD_BITS,
    PROVENANCE_CHUNKS,
    WATERMARK_METHOD,
    embed_watermark,
    prompt_sha256,
    read_metadata,
    read_watermark,
    stamp,
    tag_for,
    watermarkable,
    without_prompt,
)

__all__ = [
    "DEVELOPMENT_SIGNER",
    "EXEMPT_REASON",
    "FORMATS",
    "IPTC_AI_GENERATED",
    "MIN_WATERMARK_SIDE",
    "PAYLOAD_BITS",
    "PROVENANCE_CHUNKS",
    "WATERMARK_METHOD",
    "SignerCheckFailed",
    "SignerConfigError",
    "SignerMaterial",
    "check_image",
    "embed_watermark",
    "keys",
    "load_signer",
    "make_development_pair",
    "manifest",
    "prompt_sha256",
    "read_manifest",
    "read_metadata",
    "read_watermark",
    "signer_material",
    "stamp",
    "tag_for",
    "verify_signer",
    "watermark",
    "watermarkable",
    "without_prompt",
]
