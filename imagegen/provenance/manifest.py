"""The signed C2PA manifest every served image carries (``c2pa-python``), and its validation.

A manifest says, signed by the deployment's certificate: this asset was *created* (the
``c2pa.created`` action) by a trained algorithm (``digitalSourceType`` =
``trainedAlgorithmicMedia``), by imagegen at this version with this preset and method, of this
character and version, for this request. The signature binds the manifest to the file's bytes
(a hash of everything but the manifest), so any pixel edit makes validation fail; a
re-encode drops the manifest altogether (the watermark is what survives that).

Validation (:func:`read_manifest`) trusts the CAs of ``keys.trust_anchors``: a signer they
issued validates as ``Trusted``; a correct signature by anyone else as ``Valid`` (the C2PA
validation states); a broken binding or signature as ``Invalid``.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

from imagegen.provenance.c2pa_embed import sign_into
from imagegen.provenance.keys import ALGORITHM, SignerConfigError, SignerMaterial, signer_material, trust_anchors

log = logging.getLogger(__name__)

IPTC_AI_GENERATED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
#: our own assertion: what rendered the image and for whom
RENDER_ASSERTION = "org.imagegen.render"
MIME = {"png": "image/png", "jpeg": "image/jpeg"}


def manifest_definition(record: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The manifest of one stamped image (``record``: the provenance record ``stamp`` builds)."""
    version = (record.get("versions") or {}).get("imagegen", "unknown")
    generator = {"name": "imagegen", "version": version}
    parameters = {
        "preset": record.get("preset"),
        "method": record.get("method"),
        "character": record.get("character"),
        "character_version": record.get("character_version"),
        "request_id": record.get("request_id"),
    }
    return {
        "claim_generator_info": [generator],
        "title": f"imagegen {record.get('image_id')}",
        "format": MIME[fmt],
        "assertions": [
            {
                "label": "c2pa.actions.v2",
                "data": {
                    "actions": [
                        {
                            "action": "c2pa.created",
                            "digitalSourceType": IPTC_AI_GENERATED,
                            "softwareAgent": generator,
                            "parameters": parameters,
                        }
                    ]
                },
            },
            {
                "label": RENDER_ASSERTION,
                "data": {
                    "generator": generator,
                    **parameters,
                    "image_id": record.get("image_id"),
                    "created_at": record.get("created_at"),
                    "watermark": record.get("watermark"),
                },
            },
        ],
    }


def sign(data: bytes, fmt: str, record: dict[str, Any], material: SignerMaterial | None = None) -> bytes:
    """``data`` (an encoded PNG or JPEG) with the signed manifest of ``record`` embedded.

    The signature is not read back after each image (c2pa's ``verify_after_sign``, ~60% of a
    signature's time): the thread's signer proved once, when it was made, that what it signs
    validates (``_thread_signing``), and nothing that could break it changes between images.
    """
    return _sign_with(_thread_signing(material or signer_material()), data, fmt, record)


def _sign_with(signing: ThreadSigning, data: bytes, fmt: str, record: dict[str, Any]) -> bytes:
    # by data hash, the manifest placed here: see imagegen.provenance.c2pa_embed
    definition = manifest_definition(record, fmt)
    return sign_into(signing.context, signing.signer, signing.reserve_size, definition, data, MIME[fmt])


class SignerCheckFailed(SignerConfigError):
    """The signing pair makes manifests that do not validate (a key that does not match its certificate)."""


@dataclass(frozen=True)
class ThreadSigning:
    """One thread's native signer and signing context for a signing pair (``_thread_signing``)."""

    material: SignerMaterial
    signer: Any
    context: Any
    #: bytes the signer's signature needs in a manifest (a native call: asked once)
    reserve_size: int

    def close(self) -> None:
        self.signer.close()
        self.context.close()


_signers = threading.local()
#: the c2pa settings of every signature: no thumbnail (the asset is the image), no read-back (see ``sign``)
SIGNING_SETTINGS = {"builder": {"thumbnail": {"enabled": False}}, "verify": {"verify_after_sign": False}}


def _thread_signing(material: SignerMaterial) -> ThreadSigning:
    """This thread's ``c2pa.Signer``, signing context and the signer's reserve size for ``material``.

    Parsing the key and chain costs ~0.4 ms a signature, and a replica signs every image it serves
    with the same pair: one signer per thread (a native handle, not shared between threads). A new
    signer first signs a probe image and validates it (``SignerCheckFailed`` if that fails), which
    is the check every signature would otherwise repeat.
    """
    import c2pa

    cached: ThreadSigning | None = getattr(_signers, "pair", None)
    if cached is None or cached.material is not material:
        if cached is not None:  # never left cached once closed, even if the new pair fails its check
            _signers.pair = None
            cached.close()
        info = c2pa.C2paSignerInfo(ALGORITHM, material.chain_pem.encode(), material.key_pem.encode(), None)
        try:
            signer = c2pa.Signer.from_info(info)
        except c2pa.C2paError as exc:
            raise SignerCheckFailed(f"the C2PA signing pair ({material.source}) is refused by c2pa: {exc}") from None
        signing = ThreadSigning(
            material, signer, c2pa.Context(settings=c2pa.Settings.from_dict(SIGNING_SETTINGS)), signer.reserve_size()
        )
        try:
            _check_signer(signing)
        except BaseException:
            signing.close()
            raise
        cached = _signers.pair = signing
    return cached


def verify_signer(material: SignerMaterial | None = None) -> None:
    """Check that ``material`` (default: this process's pair) makes manifests that validate
    (``SignerCheckFailed`` in one line otherwise): what ``imagegen serve`` and a replica run at start,
    so a key that does not match its certificate is refused before any image is served."""
    _thread_signing(material or signer_material())


def _check_signer(signing: ThreadSigning) -> None:
    """Sign a probe PNG with ``signing`` and validate it: a pair that cannot make a valid manifest fails here."""
    from PIL import Image

    probe = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(probe, "PNG")
    record = {"image_id": "signer-check", "preset": "signer-check", "method": "none"}
    signed = _sign_with(signing, probe.getvalue(), "png", record)
    report = read_manifest(signed, MIME["png"])
    if not report.get("valid"):
        failures = ", ".join(report.get("failures") or []) or report.get("state")
        raise SignerCheckFailed(
            f"the C2PA signing pair ({signing.material.source}) makes manifests that do not validate: {failures}; "
            "check that IMAGEGEN_C2PA_KEY is the key of IMAGEGEN_C2PA_CERT's first certificate"
        )


def _reader_settings() -> tuple[dict[str, Any], list[str]]:
    anchors = trust_anchors()
    pem = "\n".join(text for _, text in anchors)
    settings: dict[str, Any] = {"verify": {"verify_trust": bool(anchors)}}
    if anchors:
        settings["trust"] = {"user_anchors": pem}
    return settings, [label for label, _ in anchors]


def read_manifest(data: bytes, mime: str) -> dict[str, Any]:
    """Validate the C2PA manifest in ``data``: present, state, signer, what it says, and why not valid."""
    import c2pa

    settings, anchors = _reader_settings()
    try:
        with c2pa.Context(settings=c2pa.Settings.from_dict(settings)) as context:
            reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, context)
            if reader is None:
                return {"present": False}
            with reader:
                store = json.loads(reader.json())
    except c2pa.C2paError as exc:
        return {"present": True, "valid": False, "state": "Unreadable", "errors": [str(exc)]}
    active = store.get("manifests", {}).get(store.get("active_manifest") or "", {})
    state = store.get("validation_state") or ("Invalid" if store.get("validation_status") else "Valid")
    failures = _failures(store)
    signature = active.get("signature_info") or {}
    assertions = {a.get("label"): a.get("data") for a in active.get("assertions", [])}
    render = assertions.get(RENDER_ASSERTION) or {}
    actions = (assertions.get("c2pa.actions.v2") or assertions.get("c2pa.actions") or {}).get("actions", [])
    created = next((a for a in actions if a.get("action") == "c2pa.created"), {})
    issuer = signature.get("issuer") or ""
    common_name = signature.get("common_name") or ""
    return {
        "present": True,
        "valid": state in ("Valid", "Trusted"),
        "state": state,
        "trusted": state == "Trusted",
        "trust_anchors": anchors,
        "failures": failures,
        "signer": {
            "common_name": common_name,
            "issuer": issuer,
            "time": signature.get("time"),
            "algorithm": signature.get("alg"),
            "development": "DEVELOPMENT" in f"{issuer} {common_name}",
        },
        "digital_source_type": created.get("digitalSourceType"),
        "generator": render.get("generator"),
        "preset": render.get("preset"),
        "method": render.get("method"),
        "character": render.get("character"),
        "character_version": render.get("character_version"),
        "request_id": render.get("request_id"),
        "image_id": render.get("image_id"),
    }


def _failures(store: dict[str, Any]) -> list[str]:
    """The failure codes of a validation (empty when it validated)."""
    codes = [s.get("code") for s in store.get("validation_status") or []]
    results = store.get("validation_results") or {}
    for part in [results.get("activeManifest") or {}, *(results.get("ingredientDeltas") or [])]:
        codes += [s.get("code") for s in part.get("failure", [])]
    return sorted({c for c in codes if c})
